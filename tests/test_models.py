"""dense_ops.models: torchvision's DenseNets (keys, outputs, grads) and the paper's CIFAR networks."""
import math

import pytest
import torch
import torchvision
from torch import nn

import dense_ops
from dense_ops import models
from helpers import randomize_batch_norms
from model_helpers import assert_same_step

TORCHVISION_PAIRS = [
    (models.densenet121, torchvision.models.densenet121),
    (models.densenet161, torchvision.models.densenet161),
    (models.densenet169, torchvision.models.densenet169),
    (models.densenet201, torchvision.models.densenet201),
]


@pytest.mark.slow
@pytest.mark.parametrize("ours_fn, theirs_fn", TORCHVISION_PAIRS, ids=lambda f: getattr(f, "__name__", ""))
def test_torchvision_state_dict_loads_both_ways(ours_fn, theirs_fn):
    theirs = theirs_fn(weights=None)
    ours = ours_fn()
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    theirs_state = theirs.state_dict()
    ours.load_state_dict(theirs_state, strict=True)
    for name, value in ours.state_dict().items():
        assert torch.equal(value, theirs_state[name]), name
    ours.classifier.weight.data.add_(1.0)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(theirs.classifier.weight, ours.classifier.weight)


def test_densenet121_uses_dense_ops_modules():
    model = models.densenet121()
    blocks = [m for m in model.modules() if isinstance(m, dense_ops.DenseBlock)]
    transitions = [m for m in model.modules() if isinstance(m, dense_ops.Transition)]
    assert [len(b) for b in blocks] == [6, 12, 24, 16]
    assert len(transitions) == 3


@pytest.mark.slow
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_densenet121_matches_torchvision(training):
    torch.manual_seed(0)
    theirs = randomize_batch_norms(torchvision.models.densenet121(weights=None, num_classes=7)).double()
    ours = models.densenet121(num_classes=7).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    assert_same_step(ours, theirs, x, atol=1e-8)


def test_kwargs_and_block_types_build_one_architecture():
    kwargs = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2, num_classes=5)
    built = {t: models.densenet121(block_type=t, **kwargs) for t in models.BLOCK_TYPES}
    theirs = torchvision.models.DenseNet(**kwargs)
    for model in built.values():
        assert model.state_dict().keys() == theirs.state_dict().keys()
    assert isinstance(built["naive"].features.denseblock1, dense_ops.reference.DenseBlock)
    assert isinstance(built["checkpoint"].features.denseblock1, torchvision.models.densenet._DenseBlock)
    assert built["checkpoint"].features.denseblock1.denselayer1.memory_efficient

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    reference_model = randomize_batch_norms(built["naive"]).double()
    # Checkpointing recomputes BN in backward and so updates running statistics twice in
    # training: compare it in eval mode.
    for block_type, training in (("dense_ops", True), ("checkpoint", False)):
        model = built[block_type].double().train(training)
        model.load_state_dict(reference_model.state_dict(), strict=True)
        assert_same_step(model, reference_model.train(training), x, atol=1e-8)


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_recompute_reaches_every_block(recompute):
    model = models.densenet_cifar(depth=40, recompute=recompute)
    blocks = [m for m in model.modules() if isinstance(m, dense_ops.DenseBlock)]
    assert len(blocks) == 3 and all(b.recompute == recompute for b in blocks)


def _cifar_pair(depth, growth_rate, bottleneck, **kwargs):
    torch.manual_seed(0)
    naive = models.densenet_cifar(depth, growth_rate, bottleneck, block_type="naive", **kwargs)
    naive = randomize_batch_norms(naive).double()
    ours = models.densenet_cifar(depth, growth_rate, bottleneck, **kwargs).double()
    ours.load_state_dict(naive.state_dict(), strict=True)
    return ours, naive


@pytest.mark.parametrize("bottleneck, depth", [(True, 22), (False, 16)], ids=["BC", "basic"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_densenet_cifar_matches_naive(bottleneck, depth, training):
    ours, naive = _cifar_pair(depth, 6, bottleneck, num_classes=4)
    ours.train(training)
    naive.train(training)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert_same_step(ours, naive, x, atol=1e-8)


def test_densenet_cifar_structure():
    bc = models.densenet_cifar(depth=100, growth_rate=12)
    assert [len(getattr(bc.features, f"denseblock{i}")) for i in (1, 2, 3)] == [16, 16, 16]
    assert bc.features.conv0.out_channels == 24 and bc.features.conv0.kernel_size == (3, 3)
    # 24 + 16*12 = 216 -> 108; 108 + 192 = 300 -> 150; 150 + 192 = 342
    assert bc.features.transition1.conv.out_channels == 108
    assert bc.features.transition2.conv.out_channels == 150
    assert bc.classifier.in_features == 342
    assert bc(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    basic = models.densenet_cifar(depth=40, growth_rate=12, bottleneck=False)
    assert [len(getattr(basic.features, f"denseblock{i}")) for i in (1, 2, 3)] == [12, 12, 12]
    assert basic.features.conv0.out_channels == 16
    assert not basic.features.denseblock1.denselayer1.bottleneck
    assert basic.features.transition1.conv.out_channels == 16 + 12 * 12  # theta = 1
    compressed = models.densenet_cifar(depth=40, bottleneck=False, compression=0.5)
    assert compressed.features.transition1.conv.out_channels == (16 + 12 * 12) // 2


def _count_cifar_params(depth, k, bottleneck, num_classes=10):
    """Counts parameters from the paper's description, independently of the model code."""
    n = (depth - 4) // (6 if bottleneck else 3)
    theta = 0.5 if bottleneck else 1.0
    channels = 2 * k if bottleneck else 16
    total = 3 * 9 * channels
    for block in range(3):
        for _ in range(n):
            total += 2 * channels  # BN1
            total += channels * 4 * k + 2 * 4 * k + 9 * 4 * k * k if bottleneck else 9 * channels * k
            channels += k
        if block < 2:
            out = math.floor(theta * channels)
            total += 2 * channels + channels * out
            channels = out
    return total + 2 * channels + channels * num_classes + num_classes


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth, k, bottleneck, paper_millions", [
    (40, 12, False, 1.0), (100, 12, False, 7.0), (100, 24, False, 27.2),
    (100, 12, True, 0.8), (250, 24, True, 15.3), (190, 40, True, 25.6),
])
def test_densenet_cifar_param_counts(depth, k, bottleneck, paper_millions):
    model = models.densenet_cifar(depth, k, bottleneck)
    count = _num_params(model)
    assert count == _count_cifar_params(depth, k, bottleneck)
    # The paper's Table 2 rounds to 0.1M (0.8M for 0.77M, 1.0M for 1.06M).
    assert abs(count / 1e6 - paper_millions) / paper_millions < 0.07


@pytest.mark.parametrize("depth, bottleneck", [(41, False), (38, True), (4, False), (7, True), (100.0, True),
                                               (-2, False)])
def test_densenet_cifar_rejects_bad_depth(depth, bottleneck):
    with pytest.raises(ValueError, match="depth"):
        models.densenet_cifar(depth=depth, bottleneck=bottleneck)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block_type"):
        models.densenet121(block_type="fast")
    with pytest.raises(ValueError, match="bottleneck"):
        models.densenet_cifar(depth=40, bottleneck=False, block_type="checkpoint")
    with pytest.raises(ValueError, match="recompute"):
        models.densenet_cifar(recompute="all")
    with pytest.raises(ValueError, match="compression"):
        models.densenet_cifar(compression=0.0)
