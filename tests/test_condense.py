"""CondenseNet: learned group convolution, condensation schedule, conversion, the fused
condensed_conv op against the step-by-step reference, and the paper's FLOP/parameter counts."""
import collections
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dense_ops
from dense_ops import CondensedConv, CondensedLinear, LearnedGroupConv, condense, group_lasso_loss, reference
from dense_ops.condense import _learned_group_convs as learned_group_convs, condensation_stage, fold_batch_norm
from dense_ops.models import condensenet74, condensenet_cifar
from dense_ops.models.condensenet import GroupConv2d, average_pool_2x2_into
from dense_ops.flops import count_flops_params
from conftest import DEVICES
from helpers import randomize_batch_norms as randomize


def condensed_layer(in_channels=12, out_channels=8, groups=4, kept=2, dtype=torch.float64, device="cpu"):
    """A CondensedConv with random weights, BN and an index that repeats channels across groups."""
    layer = randomize(CondensedConv(in_channels, out_channels, groups, kept))
    with torch.no_grad():
        layer.index.copy_(torch.randint(0, in_channels, (groups * kept,)))
    return layer.to(device, dtype).eval()


def op_args(layer: CondensedConv):
    scale, shift = layer.folded_norm()
    return layer.index, scale.detach(), shift.detach(), layer.weight.detach(), layer.groups


class CountOps(TorchDispatchMode):
    """Counts the operators that run, by name (e.g. "dense_ops::condensed_conv", "aten::cat")."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._schema.name] += 1  # without the overload
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- the fused op

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice", "spatial_stride"])
def test_condensed_conv_matches_reference(device, dtype, layout):
    layer = condensed_layer(dtype=dtype, device=device)
    x = torch.randn(3, 16, 5, 6, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x = x[:, 2:14] if layout == "channel_slice" else x[:, :12]
    if layout == "spatial_stride":
        x = x[:, :, ::2, 1::2]
    with torch.no_grad():
        expected = reference.condensed_conv(x, layer.index, layer.norm, layer.weight, layer.groups)
        actual = dense_ops.ops.condensed_conv(x, *op_args(layer))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    if layout == "channels_last":
        assert actual.is_contiguous(memory_format=torch.channels_last)



@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "spatial_stride"])
def test_condensed_conv_matches_reference_across_pixel_tiles(layout):
    """The CPU kernel works on tiles of a few hundred pixels here (64 kept + 16 output rows of
    float64 each): tiles that start and end inside images, and a short last one."""
    layer = condensed_layer(in_channels=96, out_channels=64, groups=4, kept=64)
    x = torch.randn(3, 96, 38, 29, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if layout == "spatial_stride":
        x = x[:, :, ::2, 1::2]
    following = randomize(nn.BatchNorm2d(64)).to(torch.float64).eval()
    with torch.no_grad():
        expected = reference.condensed_conv(x, layer.index, layer.norm, layer.weight, layer.groups)
        torch.testing.assert_close(dense_ops.ops.condensed_conv(x, *op_args(layer)), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.forward_bn_relu(x, following), torch.relu(following(expected)),
                                   rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_condensed_conv_applies_the_next_batch_norm_and_relu(device, channels_last):
    layer = condensed_layer(device=device)
    following = randomize(nn.BatchNorm2d(layer.out_channels)).to(device, torch.float64).eval()
    x = torch.randn(3, 12, 5, 6, dtype=torch.float64, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out_scale, out_shift = fold_batch_norm(following)
    with torch.no_grad():
        expected = torch.relu(following(reference.condensed_conv(x, layer.index, layer.norm, layer.weight,
                                                                 layer.groups)))
        actual = dense_ops.ops.condensed_conv(x, *op_args(layer), out_scale, out_shift)
        module_output = layer.forward_bn_relu(x, following)
    assert (expected == 0).any() and (expected > 0).any()  # the ReLU is exercised
    for result in (actual, module_output):
        torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    without_affine = nn.BatchNorm2d(8, affine=False)
    without_affine.running_mean.uniform_(-0.5, 0.5)
    for plain in (without_affine, nn.BatchNorm2d(8, track_running_stats=False)):
        plain = plain.to(device, torch.float64).eval()
        with torch.no_grad():
            torch.testing.assert_close(layer.forward_bn_relu(x, plain), torch.relu(plain(layer(x))))


@pytest.mark.parametrize("device", DEVICES)
def test_condensed_conv_low_precision_accumulates_in_float(device):
    """512 products per output, each about 1: a bfloat16 running sum stalls once it passes 256 (where
    its spacing is 2), a float32 one leaves only the output's own rounding (2^-8 relative)."""
    groups, kept, out_channels = 2, 512, 4
    index = torch.arange(groups * kept, device=device)
    scale, shift = torch.ones(groups * kept, device=device), torch.zeros(groups * kept, device=device)
    weight = (torch.rand(out_channels, kept) + 0.5).bfloat16().to(device)
    x = (torch.rand(2, groups * kept, 2, 3) + 0.5).bfloat16().to(device)
    actual = dense_ops.ops.condensed_conv(x, index, scale, shift, weight, groups)
    exact = dense_ops.ops.channel_shuffle(
        F.conv2d(x.double(), weight.double().view(out_channels, kept, 1, 1), groups=groups), groups)
    torch.testing.assert_close(actual.double(), exact, rtol=2 ** -8, atol=0)
    # The bound above tells the accumulators apart: a bfloat16 running sum misses it by far.
    running = torch.zeros((), dtype=torch.bfloat16)
    for term in (weight[0].double() * x[0, :kept, 0, 0].double()).cpu():
        running = running + term.bfloat16()
    first_output = exact[0, 0, 0, 0].item()  # shuffled channel 0 is group 0's output 0
    assert abs(running.item() - first_output) > 10 * 2 ** -8 * first_output


def test_condensed_conv_opcheck():
    layer = condensed_layer(dtype=torch.float32)
    x = torch.randn(2, 12, 3, 4)
    torch.library.opcheck(torch.ops.dense_ops.condensed_conv.default, (x, *op_args(layer)))
    torch.library.opcheck(torch.ops.dense_ops.condensed_conv.default,
                          (x.to(memory_format=torch.channels_last), *op_args(layer)))
    epilogue = (torch.rand(8) + 0.5, torch.randn(8))
    torch.library.opcheck(torch.ops.dense_ops.condensed_conv.default, (x, *op_args(layer), *epilogue))


def test_condensed_conv_empty_batch():
    layer = condensed_layer(dtype=torch.float32)
    out = dense_ops.ops.condensed_conv(torch.randn(0, 12, 3, 3), *op_args(layer))
    assert out.shape == (0, 8, 3, 3)


def test_condensed_conv_bad_arguments():
    layer = condensed_layer(dtype=torch.float32)
    index, scale, shift, weight, groups = op_args(layer)
    x = torch.randn(1, 12, 2, 2)
    bad_index = index.clone()
    bad_index[3] = 12
    with pytest.raises(RuntimeError, match=r"index\[3\] = 12 is out of range"):
        dense_ops.ops.condensed_conv(x, bad_index, scale, shift, weight, groups)
    with pytest.raises(RuntimeError, match="not divisible by groups"):
        dense_ops.ops.condensed_conv(x, index, scale, shift, weight, 3)
    with pytest.raises(RuntimeError, match="weight dtype"):
        dense_ops.ops.condensed_conv(x, index, scale, shift, weight.double(), groups)
    with pytest.raises(RuntimeError, match="index must be a 1-D int64 tensor"):
        dense_ops.ops.condensed_conv(x, index.int(), scale, shift, weight, groups)
    with pytest.raises(RuntimeError, match="out_scale and out_shift must be given together"):
        dense_ops.ops.condensed_conv(x, index, scale, shift, weight, groups, torch.ones(8))
    with pytest.raises(RuntimeError, match="out_scale and out_shift must be floating 1-D tensors of out_channels=8"):
        dense_ops.ops.condensed_conv(x, index, scale, shift, weight, groups, torch.ones(7), torch.zeros(7))
    with pytest.raises(ValueError, match=r"expected input \[N, 12, H, W\]"):
        layer(torch.randn(1, 11, 2, 2))


def test_condensed_conv_meta_argument_is_a_device_mismatch():
    # A meta tensor among the arguments routes the call to the fake kernel, which must refuse it.
    layer = condensed_layer(dtype=torch.float32)
    index, scale, shift, weight, groups = op_args(layer)
    x = torch.randn(1, 12, 2, 2)
    with pytest.raises(RuntimeError, match="condensed_conv: index is on meta, but the input is on cpu"):
        dense_ops.ops.condensed_conv(x, index.to("meta"), scale, shift, weight, groups)


@pytest.mark.needs_cuda
def test_condensed_conv_device_mismatch():
    layer = condensed_layer(dtype=torch.float32, device="cuda")
    index, scale, shift, weight, groups = op_args(layer)
    x = torch.randn(1, 12, 2, 2, device="cuda")
    with pytest.raises(RuntimeError, match="condensed_conv: index must be a CUDA tensor, got one on cpu"):
        dense_ops.ops.condensed_conv(x, index.cpu(), scale, shift, weight, groups)
    with pytest.raises(RuntimeError, match="condensed_conv: out_scale must be a CUDA tensor, got one on cpu"):
        dense_ops.ops.condensed_conv(x, index, scale, shift, weight, groups, torch.ones(8), torch.zeros(8, device="cuda"))


def test_condensed_conv_module_is_differentiable_through_reference_path():
    layer = condensed_layer(in_channels=6, out_channels=4, groups=2, kept=2)
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda inp, w: CondensedConv.forward(layer, inp), (x, layer.weight))
    with torch.no_grad():  # the fused op gives the same values
        torch.testing.assert_close(layer(x), reference.condensed_conv(x, layer.index, layer.norm, layer.weight, 2))


# ------------------------------------------------------------------ learned group convolution

def test_learned_group_conv_argument_errors():
    with pytest.raises(ValueError, match="in_channels .* divisible by groups"):
        LearnedGroupConv(10, 8, 4, 2)
    with pytest.raises(ValueError, match="in_channels .* divisible by condense_factor"):
        LearnedGroupConv(12, 8, 4, 8)
    with pytest.raises(ValueError, match="out_channels .* divisible by groups"):
        LearnedGroupConv(12, 6, 4, 4)
    layer = LearnedGroupConv(12, 8, 4, 4)
    for progress in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"progress must be a number in \[0, 1\]"):
            dense_ops.update_condensation(layer, progress)


def test_learned_group_conv_gradcheck():
    layer = randomize(LearnedGroupConv(8, 4, 2, 2)).double().eval()
    dense_ops.update_condensation(layer, 0.6)
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda inp, w: layer(inp), (x, layer.conv.weight))
    # dropped connections get no gradient
    layer(x).sum().backward()
    assert torch.all(layer.conv.weight.grad[layer.mask == 0] == 0)


def test_stage_formula():
    assert [condensation_stage(p, 4) for p in (0.0, 0.16, 0.17, 0.33, 0.34, 0.49, 0.5, 1.0)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [condensation_stage(p, 2) for p in (0.0, 0.49, 0.5)] == [0, 0, 1]


@pytest.mark.parametrize("in_channels,groups,condense_factor", [(16, 4, 4), (24, 2, 4), (12, 3, 3), (8, 4, 8)])
def test_condensation_schedule(in_channels, groups, condense_factor):
    layer = LearnedGroupConv(in_channels, 2 * groups, groups, condense_factor)
    delta = in_channels // condense_factor
    previous = layer.kept_inputs().clone()
    for step in range(101):
        progress = step / 100
        dense_ops.update_condensation(layer, progress)
        stage = condensation_stage(progress, condense_factor)
        kept = layer.kept_inputs()
        assert int(layer.stage) == stage
        assert torch.all(kept.sum(1) == in_channels - stage * delta)  # every group the same count
        assert not torch.any(kept & ~previous)  # never revived
        mask = layer.group_view(layer.mask)
        assert torch.all(mask == mask[:1])  # one pattern per group, shared by its outputs
        previous = kept.clone()
    assert torch.all(layer.kept_inputs().sum(1) == in_channels // condense_factor)


def test_condensation_drops_least_important_and_skips_stages():
    layer = LearnedGroupConv(8, 4, 2, 4)  # 2 inputs dropped per stage; outputs 0, 2 -> group 0
    with torch.no_grad():
        w = torch.arange(1.0, 9.0).repeat(4, 1)  # input i has importance i + 1 ...
        w[1] = w[1].flip(0)  # ... except group 1 (outputs 1, 3), where output 1 reverses the order
        w[3] = w[3].flip(0) * 3
        layer.conv.weight.copy_(w.view(4, 8, 1, 1))
    dense_ops.update_condensation(layer, 0.4)  # stage 0 -> 2 at once: two drops per group
    kept = layer.kept_inputs()
    assert kept[0].nonzero().flatten().tolist() == [4, 5, 6, 7]
    assert kept[1].nonzero().flatten().tolist() == [0, 1, 2, 3]
    with torch.no_grad():  # the weights change: already dropped inputs stay dropped
        layer.conv.weight.zero_()
    dense_ops.update_condensation(layer, 0.9)
    assert torch.all(layer.kept_inputs().sum(1) == 2)
    assert not torch.any(layer.kept_inputs() & ~kept)


def test_group_lasso_loss_matches_definition():
    model = nn.Sequential(LearnedGroupConv(8, 6, 2, 2), LearnedGroupConv(6, 4, 2, 3))
    for layer in model:
        nn.init.normal_(layer.conv.weight)
    dense_ops.update_condensation(model, 0.3)  # layer 2 (C=3) enters stage 1; layer 1 (C=2) stays at 0
    expected = 0.0
    for layer in model:
        w = (layer.conv.weight * layer.mask).view(layer.out_channels, layer.in_channels)
        for g in range(layer.groups):
            for i in range(layer.in_channels):
                expected += w[g::layer.groups, i].norm()
    loss = group_lasso_loss(model)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(torch.isfinite(layer.conv.weight.grad).all() for layer in model)
    dense_ops.update_condensation(model, 0.5)
    assert float(group_lasso_loss(model)) == 0.0


def test_condensation_state_survives_save_load_and_copy():
    model = condensenet_cifar(depth=8)
    dense_ops.update_condensation(model, 0.3)
    stream = io.BytesIO()
    torch.save(model.state_dict(), stream)
    stream.seek(0)
    fresh = condensenet_cifar(depth=8)
    fresh.load_state_dict(torch.load(stream))
    for a, b in zip(learned_group_convs(model), learned_group_convs(fresh)):
        assert torch.equal(a.mask, b.mask) and b._host_stage == a._host_stage == 1
    copied = copy.deepcopy(model)
    dense_ops.update_condensation(copied, 1.0)  # the copy condenses; the original does not change
    assert learned_group_convs(model)[0]._host_stage == 1


def copy_in_place(target: nn.Module, source: nn.Module) -> None:
    """What DDP's buffer broadcast, an EMA copy or `buf.copy_` do: no load_state_dict involved."""
    with torch.no_grad():
        for a, b in zip(list(target.parameters()) + list(target.buffers()),
                        list(source.parameters()) + list(source.buffers())):
            a.copy_(b)


@pytest.mark.parametrize("progress", [0.4, 1.0])
def test_condensation_continues_from_buffers_copied_in_place(progress):
    original = LearnedGroupConv(16, 8, 4, 4)  # 4 inputs dropped per stage
    dense_ops.update_condensation(original, 0.4)  # stage 2: 8 inputs kept per group
    fresh = LearnedGroupConv(16, 8, 4, 4)
    copy_in_place(fresh, original)
    dense_ops.update_condensation(fresh, progress)
    dense_ops.update_condensation(original, progress)
    stage = condensation_stage(progress, 4)
    assert torch.equal(fresh.mask, original.mask)
    assert torch.all(fresh.kept_inputs().sum(1) == 16 - 4 * stage)
    assert int(fresh.stage) == fresh._host_stage == stage


def test_condensation_follows_buffers_rewound_in_place():
    checkpoint = LearnedGroupConv(16, 8, 4, 4)
    dense_ops.update_condensation(checkpoint, 0.2)  # stage 1: 12 inputs kept per group
    layer = copy.deepcopy(checkpoint)
    dense_ops.update_condensation(layer, 1.0)  # trained on to the end ...
    copy_in_place(layer, checkpoint)  # ... then restarted from the stage-1 checkpoint
    dense_ops.update_condensation(layer, 0.2)
    assert layer.kept_per_group == 12 and not layer.fully_condensed
    dense_ops.update_condensation(layer, 0.4)  # condensation goes on from the restored stage
    assert torch.all(layer.kept_inputs().sum(1) == 8) and int(layer.stage) == 2


def test_condensation_refuses_inconsistent_buffers():
    condensed = LearnedGroupConv(16, 8, 4, 4)
    dense_ops.update_condensation(condensed, 1.0)
    layer = LearnedGroupConv(16, 8, 4, 4)
    with torch.no_grad():
        layer.mask.copy_(condensed.mask)  # the mask of stage 3 without its stage
    with pytest.raises(RuntimeError, match=r"fewer than in_channels // condense_factor = 4"):
        dense_ops.update_condensation(layer, 0.2)
    with torch.no_grad():
        layer.stage.fill_(4)
    with pytest.raises(RuntimeError, match="the stage buffer holds 4, expected 0 to 3"):
        dense_ops.update_condensation(layer, 0.4)


def test_update_condensation_touches_the_device_only_when_the_stage_changes():
    model = condensenet_cifar(depth=8, growth_rates=(4, 4, 4), num_classes=3)
    layers = len(learned_group_convs(model))
    dense_ops.update_condensation(model, 0.0)
    with CountOps() as counts:
        for step in range(1, 10):
            dense_ops.update_condensation(model, step / 100)  # still stage 0
    assert not counts.calls  # no stage write, no device sync
    with CountOps() as counts:
        dense_ops.update_condensation(model, 0.2)  # enters stage 1
    assert counts.calls["aten::_local_scalar_dense"] == 2 * layers  # reads the stage back, checks the mask
    assert counts.calls["aten::fill_"] == layers


def train_condensing(model, steps, total):
    """Plain SGD steps `steps` of a `total`-step run, condensing as the paper's schedule says."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator))
               for _ in range(total)]
    for step in steps:
        dense_ops.update_condensation(model, step / total)
        x, y = batches[step]
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * group_lasso_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("resume", ["deepcopy", "load_state_dict", "copy_in_place"])
def test_condensation_resumed_mid_training_matches_uninterrupted(resume):
    total = 12  # C = 4: stages 1, 2, 3 start at steps 2, 4, 6
    model = condensenet_cifar(depth=8, growth_rates=(4, 4, 4), num_classes=3)
    train_condensing(model, range(3), total)  # stops in stage 1
    if resume == "deepcopy":
        resumed = copy.deepcopy(model)
    else:
        resumed = condensenet_cifar(depth=8, growth_rates=(4, 4, 4), num_classes=3)
        if resume == "load_state_dict":
            resumed.load_state_dict(model.state_dict())
        else:
            copy_in_place(resumed, model)
    train_condensing(model, range(3, total), total)
    train_condensing(resumed, range(3, total), total)
    for a, b in zip(learned_group_convs(model), learned_group_convs(resumed)):
        assert torch.equal(a.mask, b.mask) and int(b.stage) == 3
        assert torch.all(b.kept_inputs().sum(1) == b.in_channels // 4)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


# -------------------------------------------------------------------------- condense / models

def trained_like_cifar(depth=14, stage_progress=1.0):
    torch.manual_seed(0)
    model = randomize(condensenet_cifar(depth=depth, growth_rates=(4, 8, 8), num_classes=10))
    dense_ops.update_condensation(model, stage_progress)
    with torch.no_grad():
        model.classifier.bias.uniform_(-1, 1)
    return model.eval()


@pytest.mark.parametrize("progress", [0.2, 1.0])
def test_condense_is_exact_without_classifier_pruning(progress):
    model = trained_like_cifar(stage_progress=progress)
    state = copy.deepcopy(model.state_dict())
    converted = condense(model, prune_classifier=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            torch.testing.assert_close(converted(x.to(memory_format=memory_format)), expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # original untouched
    assert not any(isinstance(m, CondensedConv) for m in model.modules())
    assert not any(isinstance(m, LearnedGroupConv) for m in converted.modules())
    assert not converted.training


def test_condense_prunes_classifier_to_largest_columns():
    model = trained_like_cifar()
    converted = condense(model)
    linear = model.classifier
    assert isinstance(converted.classifier, CondensedLinear)
    kept = converted.classifier.index
    assert kept.numel() == linear.in_features // 2
    norms = linear.weight.abs().sum(0)
    dropped = torch.ones(linear.in_features, dtype=torch.bool)
    dropped[kept] = False
    assert norms[kept].min() >= norms[dropped].max()
    features = torch.randn(3, linear.in_features)
    torch.testing.assert_close(converted.classifier(features),
                               features[:, kept] @ linear.weight[:, kept].T + linear.bias)


def test_inference_block_uses_one_buffer_and_matches_concatenation(monkeypatch):
    converted = condense(trained_like_cifar(), prune_classifier=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.unfused_condensenet(converted)(x)  # index_select/shuffle/torch.cat form

        def no_cat(*args, **kwargs):
            raise AssertionError("torch.cat called in an inference block")

        monkeypatch.setattr(torch, "cat", no_cat)
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)


def test_condensed_model_takes_the_fused_path_without_no_grad():
    fast = condense(trained_like_cifar())
    assert not any(p.requires_grad for p in fast.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference.unfused_condensenet(fast)(x)
    with CountOps() as counts:
        actual = fast(x)  # grad mode on, but nothing requires grad
    assert counts.calls["dense_ops::condensed_conv"] == sum(isinstance(m, CondensedConv) for m in fast.modules())
    assert counts.calls["aten::cat"] == 0 and not actual.requires_grad
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    # An input that asks for gradients gets them, through the differentiable reference path.
    x.requires_grad_()
    with CountOps() as counts:
        actual = fast(x)
    assert counts.calls["dense_ops::condensed_conv"] == 0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    actual.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_inference_forward_hooks_still_run():
    converted = condense(trained_like_cifar(), prune_classifier=False)
    layer = converted.features.denseblock_1.denselayer_1
    seen = []
    layer.conv_2.norm.register_forward_hook(lambda module, inputs, output: seen.append(output.shape))
    with torch.no_grad():
        converted(torch.randn(2, 3, 32, 32))
    assert seen == [(2, layer.conv_2.norm.num_features, 32, 32)]  # the fused BN-ReLU path stepped aside


def test_inference_paths_match_training_model_on_odd_sizes():
    # Growth 4 and 16 with 4 groups: 4 and 16 inputs per group in the 3x3 convs; 30x30 makes the second
    # transition pool an odd size.
    torch.manual_seed(0)
    model = randomize(condensenet_cifar(depth=8, growth_rates=(4, 16, 8), num_classes=5))
    dense_ops.update_condensation(model, 1.0)
    model.eval()
    converted = condense(model, prune_classifier=False)
    x = torch.randn(3, 3, 30, 30)
    expected = model(x)  # grad enabled: torch.cat blocks, grouped convs, nn.AvgPool2d
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ the 3x3 grouped conv op

# (batch, in_channels, height, width, out_channels, groups, the CPU kernel for float32/float64)
GROUP_CONV_SHAPES = [
    (2, 32, 12, 11, 8, 4, "direct"),  # CondenseNet-74 stage 1's thin groups (8 inputs, 2 outputs each)
    (1, 16, 40, 33, 6, 1, "direct"),  # one image, one group: the rows split into bands
    (3, 12, 7, 5, 9, 3, "direct"),  # 3 outputs per group: a 2-channel and a 1-channel register tile
    (2, 8, 1, 1, 4, 2, "direct"),
    (2, 4, 1, 9, 2, 2, "direct"),
    (2, 6, 9, 1, 3, 3, "direct"),
    (2, 64, 6, 7, 16, 2, "aten"),  # 32 inputs per group: oneDNN's grouped kernel
]


def group_conv_case(shape, dtype, device, layout):
    n, c, h, w, out_channels, groups, _ = shape
    x = torch.randn(n, c + 3, 2 * h, 2 * w, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x[:, 1:c + 1] if layout == "channel_slice" else x[:, :c]
    x = x[:, :, ::2, 1::2] if layout == "spatial_stride" else x[:, :, :h, :w]
    if layout in ("contiguous", "channels_last"):
        x = x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    weight = torch.randn(out_channels, c // groups, 3, 3, dtype=dtype, device=device)
    return x, weight, groups


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channel_slice", "spatial_stride"])
@pytest.mark.parametrize("shape", GROUP_CONV_SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_group_conv3x3_matches_conv2d(device, dtype, layout, shape):
    x, weight, groups = group_conv_case(shape, dtype, device, layout)
    assert dense_ops._C.group_conv3x3_direct(x.shape[1] // groups, dtype) == (shape[-1] == "direct")
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # CUDA: float32 in float32, as on the CPU
        actual = dense_ops.ops.group_conv3x3(x, weight, groups)
    # Against the float64 conv, within 16 roundings of the sum of the terms' magnitudes: any wrong
    # tap, channel or padding value is off by a whole term.
    exact = F.conv2d(x.double(), weight.double(), padding=1, groups=groups)
    magnitudes = F.conv2d(x.double().abs(), weight.double().abs(), padding=1, groups=groups)
    assert actual.dtype == dtype
    assert ((actual.double() - exact).abs() <= 16 * torch.finfo(dtype).eps * magnitudes).all()
    channels_last = layout == "channels_last"
    assert actual.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_conv3x3_low_precision_runs_atens_conv(dtype):
    x, weight = torch.randn(2, 8, 5, 6, dtype=dtype), torch.randn(4, 4, 3, 3, dtype=dtype)
    assert not dense_ops._C.group_conv3x3_direct(4, dtype)
    assert torch.equal(dense_ops.ops.group_conv3x3(x, weight, 2), F.conv2d(x, weight, padding=1, groups=2))


def test_group_conv3x3_under_autocast_runs_in_the_autocast_dtype():
    x, weight = torch.randn(2, 8, 5, 6), torch.randn(4, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = dense_ops.ops.group_conv3x3(x, weight, 2)
        expected = F.conv2d(x, weight, padding=1, groups=2)
    assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected)


def test_group_conv3x3_opcheck():
    x, weight = torch.randn(2, 8, 5, 6), torch.randn(6, 4, 3, 3)
    for args in ((x, weight, 2), (x.to(memory_format=torch.channels_last), weight, 2), (torch.randn(1, 64, 3, 3),
                                                                                       torch.randn(4, 32, 3, 3), 2)):
        torch.library.opcheck(torch.ops.dense_ops.group_conv3x3.default, args)


def test_group_conv3x3_empty_batch():
    assert dense_ops.ops.group_conv3x3(torch.randn(0, 8, 3, 3), torch.randn(4, 4, 3, 3), 2).shape == (0, 4, 3, 3)


def test_group_conv3x3_bad_arguments():
    x, weight = torch.randn(1, 8, 4, 4), torch.randn(4, 4, 3, 3)
    cases = [
        ((x[0], weight, 2), "input must be 4-D"),
        ((x, weight, 0), "groups must be positive, got 0"),
        ((x, weight, 3), "input's channels 8 are not divisible by groups=3"),
        ((x, torch.randn(4, 4, 1, 1), 2), r"weight must be \[out_channels, 4, 3, 3\]"),
        ((x, torch.randn(3, 2, 3, 3), 4), "weight's out_channels 3 is not divisible by groups=4"),
        ((x, weight.double(), 2), "weight dtype"),
        ((x.int(), weight, 2), "input must be floating point"),
        ((x, weight.to("meta"), 2), "group_conv3x3: weight is on meta, but the input is on cpu"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            dense_ops.ops.group_conv3x3(*args)


def test_group_conv3x3_has_no_backward():
    weight = torch.randn(4, 4, 3, 3, requires_grad=True)
    out = torch.ops.dense_ops.group_conv3x3(torch.randn(1, 8, 4, 4), weight, 2)
    with pytest.raises(RuntimeError, match="group_conv3x3 is an inference kernel"):
        out.sum().backward()


def test_group_conv2d_runs_the_op_only_in_inference():
    conv = GroupConv2d(12, 6, kernel_size=3, padding=1, groups=3, bias=False).double()
    x = torch.randn(2, 12, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        expected = F.conv2d(x, conv.weight, padding=1, groups=3)
        with CountOps() as counts:
            torch.testing.assert_close(conv(x, inference=True), expected)
            torch.testing.assert_close(conv(x), expected)
    assert counts.calls["dense_ops::group_conv3x3"] == 1
    with CountOps() as counts:
        y = conv(x, inference=True)  # with autograd: nn.Conv2d, and gradients reach the weight
    assert counts.calls["dense_ops::group_conv3x3"] == 0
    y.sum().backward()
    assert conv.weight.grad is not None
    unpadded = GroupConv2d(12, 6, kernel_size=3, groups=3, bias=False)
    with torch.no_grad(), CountOps() as counts:
        assert unpadded(torch.randn(1, 12, 5, 5), inference=True).shape == (1, 6, 3, 3)
    assert counts.calls["dense_ops::group_conv3x3"] == 0


@pytest.mark.parametrize("size", [(8, 6), (7, 9)])
def test_average_pool_into_a_channel_slice(size):
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    buffer = torch.full((2, 9, size[0] // 2, size[1] // 2), float("nan"), dtype=torch.float64)
    average_pool_2x2_into(x, buffer[:, 2:7])
    torch.testing.assert_close(buffer[:, 2:7], nn.functional.avg_pool2d(x, 2))
    assert buffer[:, :2].isnan().all() and buffer[:, 7:].isnan().all()


def test_model_builders_reject_zero_groups():
    for build in (lambda: condensenet74(groups=0), lambda: condensenet_cifar(depth=8, groups=0),
                  lambda: condensenet74(condense_factor=0)):
        with pytest.raises(ValueError, match="must be a positive integer, got 0"):
            build()


def test_training_with_condensation():
    """A short run through every condensation stage: the masks keep 1/C of each group's inputs, the
    dropped connections get no gradient, the loss on the batch falls, and the condensed model computes
    what the trained one does."""
    model = condensenet_cifar(depth=8, growth_rates=(4, 4, 4), num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    losses = []
    for step in range(8):
        dense_ops.update_condensation(model, step / 7)
        loss = nn.functional.cross_entropy(model(x), y) + 1e-3 * group_lasso_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    layers = learned_group_convs(model)
    for layer in layers:
        assert layer.fully_condensed
        assert (layer.kept_inputs().sum(1) == layer.in_channels // layer.condense_factor).all()
        assert (layer.conv.weight.grad[layer.mask == 0] == 0).all()
    assert losses[-1] < losses[0], losses
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(condense(model, prune_classifier=False)(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("builder,input_size,flops,params", [
    (lambda: condensenet_cifar(), (3, 32, 32), 65.8e6, 0.52e6),
    (lambda: condensenet74(4), (3, 224, 224), 529e6, 4.8e6),
    (lambda: condensenet74(8), (3, 224, 224), 274e6, 2.9e6),
])
def test_flops_and_params_match_the_paper(builder, input_size, flops, params):
    model = builder()
    dense_ops.update_condensation(model, 1.0)
    measured_flops, measured_params = count_flops_params(condense(model), input_size)
    assert measured_flops == pytest.approx(flops, rel=0.02)
    assert measured_params == pytest.approx(params, rel=0.02)


def test_count_flops_params_of_plain_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5))
    flops, params = count_flops_params(model, (3, 8, 8))
    assert flops == 3 * 8 * 9 * 64 + 8 * 64 + 8 * 16 * 4 + (128 * 5 + 5)
    assert params == sum(p.numel() for p in model.parameters())


@pytest.mark.needs_cuda
def test_condensed_model_on_cuda_matches_cpu():
    converted = condense(trained_like_cifar(), prune_classifier=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = converted(x)
        actual = copy.deepcopy(converted).cuda()(x.cuda()).cpu()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_condensed_conv_rejects_a_bad_index_when_loaded():
    layer = condensed_layer()
    state = layer.state_dict()
    state["index"] = state["index"].clone()
    state["index"][3] = 12  # in_channels is 12
    with pytest.raises(RuntimeError, match=r"index: indices must be in \[0, 12\), got \[\d+, 12\]"):
        layer.load_state_dict(state)
    state["index"] = state["index"][:-1]
    with pytest.raises(RuntimeError, match="index: expected 8 int64 input-channel indices"):
        layer.load_state_dict(state)


def test_folded_norm_is_cached_until_the_norm_changes():
    layer = condensed_layer()
    scale, shift = layer.folded_norm()
    assert layer.folded_norm()[0] is scale  # cached
    with torch.no_grad():
        layer.norm.running_var.mul_(4)  # in place, as load_state_dict, EMA or DDP broadcast do
    refolded = fold_batch_norm(layer.norm)
    torch.testing.assert_close(layer.folded_norm()[0], refolded[0], rtol=0, atol=0)
    assert not torch.allclose(refolded[0], scale)
    layer.float()  # a cast replaces the storage
    assert layer.folded_norm()[0].dtype == torch.float32


def test_forward_bn_relu_refolds_the_next_norm_when_it_changes():
    layer = condensed_layer()
    following = randomize(nn.BatchNorm2d(layer.out_channels)).to(torch.float64).eval()
    x = torch.randn(2, 12, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        layer.forward_bn_relu(x, following)
        following.running_mean.add_(1.0)  # in place: the cached fold is stale
        torch.testing.assert_close(layer.forward_bn_relu(x, following), torch.relu(following(layer(x))))


def test_condensed_model_built_under_inference_mode():
    """Parameters created under torch.inference_mode() have no version counter to cache against:
    the folded BN is computed on every call, and changes made in place still count."""
    with torch.inference_mode():
        layer = condensed_layer()
        following = randomize(nn.BatchNorm2d(layer.out_channels)).to(torch.float64).eval()
        x = torch.randn(2, 12, 3, 4, dtype=torch.float64)
        expected = torch.relu(following(reference.condensed_conv(x, layer.index, layer.norm, layer.weight,
                                                                 layer.groups)))
        torch.testing.assert_close(layer.forward_bn_relu(x, following), expected, rtol=1e-12, atol=1e-12)
        layer.norm.running_var.mul_(4)
        expected = reference.condensed_conv(x, layer.index, layer.norm, layer.weight, layer.groups)
        torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
