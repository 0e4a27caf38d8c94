"""dense_ops.swap_dense_blocks on torchvision models and on users' own models."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.densenet import _DenseBlock, _Transition

import dense_ops
from helpers import randomize_batch_norms
from model_helpers import assert_same_step


def _swapped_copy(model, **kwargs):
    """(original, swapped deep copy) with identical weights."""
    return model, dense_ops.swap_dense_blocks(copy.deepcopy(model), **kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_swap_torchvision_densenet121(training):
    torch.manual_seed(0)
    original = randomize_batch_norms(torchvision.models.densenet121(weights=None, num_classes=5)).double()
    original.train(training)
    original, swapped = _swapped_copy(original)
    blocks = [m for m in swapped.modules() if isinstance(m, dense_ops.DenseBlock)]
    assert [len(b) for b in blocks] == [6, 12, 24, 16]
    assert not any(isinstance(m, _DenseBlock) for m in swapped.modules())
    assert [type(m) for m in swapped.modules() if isinstance(m, _Transition) or "Transition" in type(m).__name__] \
        == [dense_ops.Transition] * 3
    assert all(m.training == training for m in swapped.modules())
    assert swapped.state_dict().keys() == original.state_dict().keys()
    assert_same_step(swapped, original, torch.randn(3, 3, 32, 32, dtype=torch.float64), atol=1e-8)


class UserNet(nn.Module):
    """A user's own model from torchvision's classes, with dropout, nested in a Sequential."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.body = nn.Sequential(_DenseBlock(3, 8, 2, 4, drop_rate=0.0), _Transition(20, 10),
                                  _DenseBlock(2, 10, 2, 4, drop_rate=0.25, memory_efficient=True))
        self.head = nn.Linear(18, 3)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_swap_user_model(training, recompute):
    torch.manual_seed(0)
    original = randomize_batch_norms(UserNet()).double().train(training)
    for layer in original.body[2].values():
        layer.drop_rate = 0.0  # dropout draws differ: tested on its own below
        layer.memory_efficient = False  # checkpointing updates running statistics twice
    original, swapped = _swapped_copy(original, recompute=recompute)
    assert all(b.recompute == recompute for b in (swapped.body[0], swapped.body[2]))
    assert_same_step(swapped, original, torch.randn(2, 3, 8, 8, dtype=torch.float64), atol=1e-8)


def test_swap_keeps_parameter_objects_mode_and_drop_rate():
    model = UserNet().eval()
    model.body[0].train()
    params_before = dict(model.named_parameters())
    buffers_before = dict(model.named_buffers())
    returned = dense_ops.swap_dense_blocks(model)
    assert returned is model
    assert isinstance(model.body[0], dense_ops.DenseBlock) and isinstance(model.body[2], dense_ops.DenseBlock)
    assert type(model.body[1]) is dense_ops.Transition and not model.body[1].training
    assert model.body[0].training and not model.body[2].training
    assert [l.drop_rate for l in model.body[2].values()] == [0.25, 0.25]
    assert model.body[2].memory_efficient
    assert dict(model.named_parameters()).keys() == params_before.keys()
    for name, p in model.named_parameters():
        assert p is params_before[name], name
    for name, b in model.named_buffers():
        assert b is buffers_before[name], name


def test_swap_keeps_dtype_and_device():
    model = dense_ops.swap_dense_blocks(UserNet().to(torch.float64))
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}
    assert model(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_swap_with_dropout_keeps_scaling():
    """Same distribution as torchvision: each new value is dropped or scaled by 1 / (1 - p)."""
    torch.manual_seed(0)
    block = _DenseBlock(1, 4, 2, 64, drop_rate=0.5).double()
    undropped = copy.deepcopy(block)
    undropped.denselayer1.drop_rate = 0.0
    swapped = dense_ops.swap_dense_blocks(copy.deepcopy(block))
    x = torch.randn(4, 4, 6, 6, dtype=torch.float64)
    expected = undropped(x)[:, 4:]
    out = swapped(x)
    torch.testing.assert_close(out[:, :4], x, atol=0, rtol=0)
    kept = out[:, 4:] != 0
    torch.testing.assert_close(out[:, 4:][kept], 2 * expected[kept], atol=1e-10, rtol=0)
    assert 0.45 < kept.double().mean().item() < 0.55


def test_swap_naive_reference_blocks_and_root_block():
    torch.manual_seed(0)
    naive = randomize_batch_norms(dense_ops.reference.DenseBlock(3, 5, None, 4)).double()
    model = nn.Sequential(copy.deepcopy(naive), nn.ReLU())
    dense_ops.swap_dense_blocks(model)
    assert isinstance(model[0], dense_ops.DenseBlock) and not model[0].denselayer1.bottleneck
    root = dense_ops.swap_dense_blocks(copy.deepcopy(naive))
    assert isinstance(root, dense_ops.DenseBlock)
    assert_same_step(root, naive, torch.randn(2, 5, 6, 6, dtype=torch.float64), atol=1e-8)


def test_swap_transition_root_and_reference():
    torch.manual_seed(0)
    theirs = randomize_batch_norms(_Transition(12, 5)).double()
    ours = dense_ops.swap_dense_blocks(copy.deepcopy(theirs))
    assert type(ours) is dense_ops.Transition
    assert_same_step(ours, theirs, torch.randn(2, 12, 6, 6, dtype=torch.float64), atol=1e-8)
    model = nn.Sequential(dense_ops.reference.Transition(12, 5))
    assert type(dense_ops.swap_dense_blocks(model)[0]) is dense_ops.Transition


def test_swap_leaves_other_modules_and_swapped_blocks_alone():
    model = dense_ops.models.densenet121(growth_rate=4, block_config=(2, 2), num_init_features=8)
    blocks = [m for m in model.modules() if isinstance(m, dense_ops.DenseBlock)]
    assert dense_ops.swap_dense_blocks(model) is model
    assert [m for m in model.modules() if isinstance(m, dense_ops.DenseBlock)] == blocks


def test_swap_bad_input():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dense_ops.swap_dense_blocks(torch.randn(3))
    with pytest.raises(ValueError, match="recompute"):
        dense_ops.swap_dense_blocks(UserNet(), recompute="everything")
    odd = _DenseBlock(2, 4, 2, 4, 0.0)
    odd.denselayer2.conv2 = nn.Conv2d(8, 4, 3, padding=1, bias=True)
    with pytest.raises(ValueError, match="no bias"):
        dense_ops.swap_dense_blocks(nn.Sequential(odd))
    mixed = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(_DenseBlock(2, 4, 2, 4, 0.0)))
    mixed[0].denselayer1.norm1 = nn.BatchNorm2d(4)
    with pytest.raises(ValueError, match="mixes BatchNorm2d and SyncBatchNorm"):
        dense_ops.swap_dense_blocks(mixed)
    odd_norm = nn.Sequential(_DenseBlock(2, 4, 2, 4, 0.0))
    odd_norm[0].denselayer2.norm2 = nn.GroupNorm(2, 8)
    with pytest.raises(ValueError, match="GroupNorm"):
        dense_ops.swap_dense_blocks(odd_norm)


def test_swap_sync_batchnorm_block_becomes_synchronized_block():
    torch.manual_seed(0)
    plain = _DenseBlock(2, 4, 2, 4, 0.0).double()
    group = object()  # any process group object; nothing is synchronized outside a distributed run
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(copy.deepcopy(plain)), process_group=group)
    dense_ops.swap_dense_blocks(synced)
    assert isinstance(synced[0], dense_ops.DenseBlock)
    assert synced[0].sync_batchnorm and synced[0].process_group is group
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(synced(x), plain(x), atol=1e-10, rtol=0)
