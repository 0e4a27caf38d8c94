"""dense_ops.swap_dense_blocks on timm's DenseNets, checked against timm itself (random weights, no downloads)."""
import copy
import io

import pytest
import torch
from torch import nn

import dense_ops
from helpers import randomize_batch_norms
from model_helpers import assert_same_step

timm = pytest.importorskip("timm")
from timm.layers import convert_sync_batchnorm  # noqa: E402
from timm.models.densenet import DenseBlock as TimmDenseBlock  # noqa: E402

# Every DenseNet timm registers: all are BN-ReLU-conv (densenetblur121d and densenet264d differ in stem
# and transitions only), so all swap.
VARIANTS = timm.list_models("*densenet*")


def test_the_variants_are_the_known_ones():
    # A new variant fails here first: check whether its layers are BN-ReLU-conv before listing it in README.
    assert set(VARIANTS) == {"densenet121", "densenet161", "densenet169", "densenet201", "densenet264d",
                             "densenetblur121d"}


# Each variant's own stem, transitions, growth rate and bottleneck, with 2-3 layers per block instead of up to 64:
# the swap works block by block and layer by layer, so depth adds nothing to check but minutes on 2 cores
# (one full-size model is checked below).
FEW_LAYERS = dict(block_config=(2, 3, 2, 2))


def timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs)
    return randomize_batch_norms(model).double()


def swapped_copy(model: nn.Module) -> nn.Module:
    swapped = copy.deepcopy(model)
    assert dense_ops.swap_dense_blocks(swapped) is swapped
    return swapped


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", VARIANTS)
def test_swapped_variant_equals_timm(name, training):
    """Outputs, input gradients, parameter gradients and running statistics (after a training step)
    equal timm's in float64. 32x32 inputs leave 1x1 pixels in the last block: batch statistics of 3 values."""
    original = timm_model(name, **FEW_LAYERS).train(training)
    swapped = swapped_copy(original)
    blocks = [m for m in swapped.modules() if isinstance(m, dense_ops.DenseBlock)]
    assert len(blocks) == 4 and not any(isinstance(m, TimmDenseBlock) for m in swapped.modules())
    assert swapped.state_dict().keys() == original.state_dict().keys()
    assert_same_step(swapped, original, torch.randn(3, 3, 32, 32, dtype=torch.float64), atol=1e-9)


@pytest.mark.slow
def test_full_size_densenet121_training_step_equals_timm():
    original = timm_model("densenet121").train()
    swapped = swapped_copy(original)
    assert [len(m) for m in swapped.modules() if isinstance(m, dense_ops.DenseBlock)] == [6, 12, 24, 16]
    assert_same_step(swapped, original, torch.randn(3, 3, 32, 32, dtype=torch.float64), atol=1e-9)


def test_swap_keeps_parameter_objects_names_and_strict_loading():
    model = timm.create_model("densenet121", pretrained=False, num_classes=3)
    params_before, buffers_before = dict(model.named_parameters()), dict(model.named_buffers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dense_ops.swap_dense_blocks(model)
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())
    assert all(b is buffers_before[n] for n, b in model.named_buffers())
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}

    fresh_timm = timm.create_model("densenet121", pretrained=False, num_classes=3)
    fresh_timm.load_state_dict(model.state_dict(), strict=True)  # swapped -> timm
    buffer = io.BytesIO()
    torch.save(fresh_timm.state_dict(), buffer)
    buffer.seek(0)
    fresh_swapped = dense_ops.swap_dense_blocks(timm.create_model("densenet121", pretrained=False, num_classes=3))
    fresh_swapped.load_state_dict(torch.load(buffer, weights_only=True), strict=True)  # timm -> swapped
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fresh_swapped.eval()(x), model.eval()(x), atol=0, rtol=0)


def test_swap_of_grad_checkpointed_timm_model_equals_timm_without_checkpointing():
    """memory_efficient=True (timm's grad checkpointing) swaps too: our blocks never keep concatenations.
    Compared with timm without checkpointing, since timm's recomputation updates running statistics twice."""
    plain = timm_model("densenet121", **FEW_LAYERS).train()
    checkpointed = timm_model("densenet121", memory_efficient=True, **FEW_LAYERS).train()
    checkpointed.load_state_dict(plain.state_dict())
    swapped = swapped_copy(checkpointed)
    assert not any(isinstance(m, TimmDenseBlock) for m in swapped.modules())
    assert_same_step(swapped, plain, torch.randn(3, 3, 32, 32, dtype=torch.float64), atol=1e-9)


def test_proj_dropout_carries_over():
    swapped = swapped_copy(timm_model("densenet121", proj_drop_rate=0.2, **FEW_LAYERS))
    layers = [m for m in swapped.modules() if isinstance(m, dense_ops.DenseLayer)]
    assert layers and {layer.drop_rate for layer in layers} == {0.2}


@pytest.mark.parametrize("options, reason", [
    (dict(act_layer="silu"), "activation is SiLU"),
    (dict(act_layer="leaky_relu"), "activation is LeakyReLU"),
    (dict(norm_layer="groupnorm"), "norm is GroupNormAct"),
    (dict(norm_layer="evonormb0"), "norm is EvoNorm2dB0"),
], ids=["silu", "leaky_relu", "groupnorm", "evonorm"])
def test_variants_that_are_not_bn_relu_stay_timm_with_a_warning(options, reason):
    model = timm.create_model("densenet121", pretrained=False, num_classes=3, **options).eval()
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=rf"{reason}.*; this timm block is left unchanged") as record:
        dense_ops.swap_dense_blocks(model)
    named = [f"features.denseblock{i}" for i in range(1, 5)]
    assert [str(w.message).split()[1] for w in record] == named  # one warning per block, naming it
    assert sum(isinstance(m, TimmDenseBlock) for m in model.modules()) == 4
    assert not any(isinstance(m, dense_ops.DenseBlock) for m in model.modules())
    assert model.state_dict().keys() == state.keys()


def test_sync_batchnorm_timm_model_becomes_synchronized_blocks():
    original = timm_model("densenet121", **FEW_LAYERS).train()
    synced = convert_sync_batchnorm(copy.deepcopy(original))
    dense_ops.swap_dense_blocks(synced)
    blocks = [m for m in synced.modules() if isinstance(m, dense_ops.DenseBlock)]
    assert len(blocks) == 4 and all(b.sync_batchnorm for b in blocks)
    # Outside a distributed run nothing is synchronized: the step equals timm's.
    assert_same_step(synced, original, torch.randn(3, 3, 32, 32, dtype=torch.float64), atol=1e-9)


def test_timm_block_as_root_and_mixed_block_warns():
    torch.manual_seed(0)
    block = randomize_batch_norms(timm.create_model("densenet121", pretrained=False).features.denseblock1).double()
    root = dense_ops.swap_dense_blocks(copy.deepcopy(block))
    assert isinstance(root, dense_ops.DenseBlock)
    assert_same_step(root, block, torch.randn(2, 64, 6, 6, dtype=torch.float64), atol=1e-9)
    block.denselayer3.norm2.act = nn.GELU()
    with pytest.warns(UserWarning, match="DenseBlock has a BatchNormAct2d whose activation is GELU.*left unchanged"):
        assert dense_ops.swap_dense_blocks(block) is block
