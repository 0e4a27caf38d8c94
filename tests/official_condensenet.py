"""The reference for the loader tests: a minimal re-implementation of the official CondenseNet code
(github.com/ShichenLiu/CondenseNet), written from reading, and mirroring:

- layers.py: LearnedGroupConv (forward, _check_drop, _dropping), CondensingConv, CondensingLinear
  (whose state dicts equal CondenseConv's and CondenseLinear's), ShuffleLayer, Conv;
- models/condensenet.py (CondenseNet), models/densenet_LGC.py (DenseNet_LGC: a learned group conv in
  each transition), models/condensenet_converted.py (what convert_model's output loads into);
- utils.py: convert_model; main.py: the options (Args) and how checkpoints are saved.

Module names, buffer names, shapes and dtypes are the official ones, so ``state_dict()`` is in the
official format. Nothing here imports dense_ops: it is the independent side of the comparison.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Args:
    """main.py's options (its defaults), plus `pool_size`: the official code fixes the final pooling at
    8 (CIFAR) or 7 (ImageNet at 224x224), the global pooling at those input sizes."""
    stages: tuple = (14, 14, 14)
    growth: tuple = (8, 16, 32)
    data: str = "cifar10"
    num_classes: int = 10
    bottleneck: int = 4
    group_1x1: int = 4
    group_3x3: int = 4
    condense_factor: int = 4
    dropout_rate: float = 0.0
    reduction: float = 0.5
    model: str = "condensenet"  # or "densenet_LGC"
    pool_size: int | None = None

    @property
    def cifar(self) -> bool:
        return self.data in ("cifar10", "cifar100")


class LearnedGroupConv(nn.Module):
    """layers.py LearnedGroupConv (1x1 only, as the official models use it)."""
    global_progress = 0.0

    def __init__(self, in_channels, out_channels, groups, condense_factor, dropout_rate=0.0):
        super().__init__()
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.dropout_rate = dropout_rate
        if dropout_rate > 0:
            self.drop = nn.Dropout(dropout_rate, inplace=False)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.condense_factor = groups, condense_factor
        self.register_buffer("_count", torch.zeros(1))
        self.register_buffer("_stage", torch.zeros(1))
        self.register_buffer("_mask", torch.ones(self.conv.weight.size()))

    def forward(self, x):
        self._check_drop()
        x = self.relu(self.norm(x))
        if self.dropout_rate > 0:
            x = self.drop(x)
        return F.conv2d(x, self.conv.weight * self._mask)

    def _check_drop(self):
        progress = LearnedGroupConv.global_progress
        for i in range(self.condense_factor - 1):
            if progress * 2 < (i + 1) / (self.condense_factor - 1):
                stage = i
                break
        else:
            stage = self.condense_factor - 1
        if not (self._stage >= stage).all():  # entering a new stage drops in_channels // C inputs per group
            self._stage.fill_(stage)
            self._dropping(self.in_channels // self.condense_factor)

    @torch.no_grad()
    def _dropping(self, delta):
        weight = (self.conv.weight * self._mask).abs().squeeze(-1).squeeze(-1)
        d_out = self.out_channels // self.groups
        # Output o belongs to group o % groups: rows of group i are i, i + G, i + 2G, ...
        weight = weight.view(d_out, self.groups, self.in_channels).transpose(0, 1).contiguous()
        weight = weight.view(self.out_channels, self.in_channels)
        count = int(self._count[0])
        for i in range(self.groups):
            importance = weight[i * d_out:(i + 1) * d_out].sum(0)
            dropped = importance.sort()[1][count:count + delta]
            self._mask[i::self.groups, dropped] = 0  # the official code fills each of these in a loop
        self._count.fill_(count + delta)


def shuffle(x, groups):
    """layers.py ShuffleLayer."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


class CondensingConv(nn.Module):
    """layers.py CondensingConv: the converted LearnedGroupConv (same state dict as CondenseConv)."""

    @torch.no_grad()
    def __init__(self, model: LearnedGroupConv):
        super().__init__()
        self.in_channels = model.conv.in_channels * model.groups // model.condense_factor
        self.out_channels = model.conv.out_channels
        self.groups = model.groups
        self.norm = nn.BatchNorm2d(self.in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(self.in_channels, self.out_channels, 1, groups=self.groups, bias=False)
        self.register_buffer("index", torch.zeros(self.in_channels, dtype=torch.long))
        kept, d_out = self.in_channels // self.groups, self.out_channels // self.groups
        mask = model._mask.mean(-1).mean(-1)
        index = 0
        for i in range(self.groups):
            for j in range(model.conv.in_channels):
                if index < kept * (i + 1) and mask[i, j] == 1:
                    for k in range(d_out):
                        self.conv.weight[k + i * d_out, index % kept] = model.conv.weight[i + k * self.groups, j]
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(self.norm, name)[index] = getattr(model.norm, name)[j]
                    self.index[index] = j
                    index += 1

    def forward(self, x):
        x = torch.index_select(x, 1, self.index)
        return shuffle(self.conv(self.relu(self.norm(x))), self.groups)


class CondensingLinear(nn.Module):
    """layers.py CondensingLinear (same state dict as CondenseLinear): keeps the inputs of largest L1 column norm."""

    @torch.no_grad()
    def __init__(self, model: nn.Linear, drop_rate=0.5):
        super().__init__()
        self.in_features = int(model.in_features * drop_rate)
        self.linear = nn.Linear(self.in_features, model.out_features)
        self.register_buffer("index", torch.zeros(self.in_features, dtype=torch.long))
        order = model.weight.abs().sum(0).sort()[1][model.in_features - self.in_features:]
        self.linear.bias.copy_(model.bias)
        for i in range(self.in_features):
            self.index[i] = order[i]
            self.linear.weight[:, i] = model.weight[:, order[i]]

    def forward(self, x):
        return self.linear(torch.index_select(x, 1, self.index))


def conv(in_channels, out_channels, kernel_size, padding=0, groups=1):
    """layers.py Conv: BN-ReLU-conv as an nn.Sequential."""
    return nn.Sequential(OrderedDict(
        norm=nn.BatchNorm2d(in_channels), relu=nn.ReLU(inplace=True),
        conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False, groups=groups)))


class DenseLayer(nn.Module):
    def __init__(self, in_channels, growth_rate, args: Args):
        super().__init__()
        self.conv_1 = LearnedGroupConv(in_channels, args.bottleneck * growth_rate, args.group_1x1,
                                       args.condense_factor, args.dropout_rate)
        self.conv_2 = conv(args.bottleneck * growth_rate, growth_rate, 3, padding=1, groups=args.group_3x3)

    def forward(self, x):
        return torch.cat([x, self.conv_2(self.conv_1(x))], 1)


class Transition(nn.Module):
    """condensenet.py _Transition (pool only) or, with out_channels, densenet_LGC.py _Transition."""

    def __init__(self, in_channels, args: Args, out_channels=None):
        super().__init__()
        if out_channels is not None:
            self.conv = LearnedGroupConv(in_channels, out_channels, args.group_1x1, args.condense_factor)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x):
        if hasattr(self, "conv"):
            x = self.conv(x)
        return self.pool(x)


def make_divisible(x, y):
    """densenet_LGC.py make_divisible."""
    return int((x // y + 1) * y if x % y else x)


class CondenseNet(nn.Module):
    """models/condensenet.py CondenseNet, or models/densenet_LGC.py DenseNet_LGC with args.model == "densenet_LGC"."""

    def __init__(self, args: Args):
        super().__init__()
        lgc = args.model == "densenet_LGC"
        init_stride, pool_size = (1, 8) if args.cifar else (2, 7)
        pool_size = args.pool_size or pool_size
        self.features = nn.Sequential()
        channels = 2 * args.growth[0]
        self.features.add_module("init_conv", nn.Conv2d(3, channels, 3, stride=init_stride, padding=1, bias=False))
        for i, (num_layers, growth) in enumerate(zip(args.stages, args.growth)):
            block = nn.Sequential()
            for j in range(num_layers):
                block.add_module(f"denselayer_{j + 1}", DenseLayer(channels + j * growth, growth, args))
            self.features.add_module(f"denseblock_{i + 1}", block)
            channels += num_layers * growth
            if i < len(args.stages) - 1:
                out = make_divisible(math.ceil(channels * args.reduction), args.group_1x1) if lgc else None
                self.features.add_module(f"transition_{i + 1}", Transition(channels, args, out))
                channels = out or channels
        self.features.add_module("norm_last", nn.BatchNorm2d(channels))
        self.features.add_module("relu_last", nn.ReLU(inplace=True))
        self.features.add_module("pool_last", nn.AvgPool2d(pool_size))
        self.classifier = nn.Linear(channels, args.num_classes)
        for m in self.modules():  # the official initialization
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2. / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()
            elif isinstance(m, nn.Linear):
                m.bias.data.zero_()

    def forward(self, x):
        features = self.features(x)
        return self.classifier(features.view(features.size(0), -1))


def convert_model(model: nn.Module) -> None:
    """utils.py convert_model: in place, every LearnedGroupConv -> CondensingConv, every Linear -> CondensingLinear."""
    for name, child in model._modules.items():
        if not any(True for _ in child.children()):
            if isinstance(child, nn.Linear):
                model._modules[name] = CondensingLinear(child, 0.5)
        elif isinstance(child, LearnedGroupConv):
            model._modules[name] = CondensingConv(child)
        else:
            convert_model(child)


def condense_to_stage(model: nn.Module, stage: int, condense_factor: int) -> None:
    """What training does to the masks up to `stage`: each forward's _check_drop at a progress inside
    every stage in turn (the official code enters one stage per call)."""
    try:
        for s in range(1, stage + 1):
            LearnedGroupConv.global_progress = (s + 0.5) / (2 * (condense_factor - 1))
            for m in model.modules():
                if isinstance(m, LearnedGroupConv):
                    m._check_drop()
    finally:
        LearnedGroupConv.global_progress = 0.0


@torch.no_grad()
def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Trained-looking values: random BN affine and statistics, a random classifier bias."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(t, low, high):
        t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            uniform(m.weight, 0.5, 1.5)
            uniform(m.bias, -0.5, 0.5)
            uniform(m.running_mean, -0.5, 0.5)
            uniform(m.running_var, 0.5, 2.0)
            m.num_batches_tracked.fill_(7)
        elif isinstance(m, nn.Linear):
            uniform(m.bias, -1.0, 1.0)
    return model


def official_model(args: Args, seed: int, stage: int) -> CondenseNet:
    """An official-format model with random (trained-looking) values, condensed up to `stage`, eval mode."""
    torch.manual_seed(seed)
    model = randomize(CondenseNet(args), seed)
    condense_to_stage(model, stage, args.condense_factor)
    return model.eval()


def converted(model: CondenseNet) -> CondenseNet:
    """main.py --convert-from: a copy of `model` (fully condensed) run through convert_model."""
    model = copy.deepcopy(model)
    convert_model(model)
    return model.eval()


def as_main_saves(state_dict: dict, **extra) -> dict:
    """The checkpoint main.py writes: the state dict of nn.DataParallel(model) ("module." prefixes)."""
    return {**extra, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}


# The committed fixtures (tests/fixtures/<name>.pth, made by tests/fixtures/make_official_condensenet.py):
# name -> (options, seed, stage reached, converted). The options differ between fixtures so that each
# of ours (group_1x1 != group_3x3, group_1x1 != condense_factor, bottleneck, DenseNet-LGC) is read.
FIXTURES = {
    # CIFAR CondenseNet-14 mid-training (stage 1), group_3x3 != group_1x1.
    "condensenet_cifar14_train": (Args(stages=(2, 2, 2), growth=(4, 8, 16), group_3x3=2), 1, 1, False),
    # The same configuration fully condensed and converted (main.py --convert-from).
    "condensenet_cifar14_converted": (Args(stages=(2, 2, 2), growth=(4, 8, 16), group_3x3=2), 2, 3, True),
    # ImageNet configuration (stride-2 stem, 5 stages, AvgPool2d(7) at 224x224), small: G = 2 != C = 4,
    # bottleneck 2, 5 classes; stage 2, and fully condensed + converted.
    "condensenet_imagenet_small_train": (Args(stages=(1, 1, 1, 1, 1), growth=(4, 4, 8, 8, 16), data="imagenet",
                                              num_classes=5, bottleneck=2, group_1x1=2, group_3x3=2), 3, 2, False),
    "condensenet_imagenet_small_converted": (Args(stages=(1, 1, 1, 1, 1), growth=(4, 4, 8, 8, 16), data="imagenet",
                                                  num_classes=5, bottleneck=2, group_1x1=2, group_3x3=2), 4, 3, True),
    # DenseNet-LGC (learned group convs in the transitions too), CIFAR, stage 2.
    "densenet_lgc_cifar14_train": (Args(stages=(2, 2, 2), growth=(4, 4, 4), model="densenet_LGC"), 5, 2, False),
}


def fixture_checkpoint(name: str) -> dict:
    """The checkpoint FIXTURES[name] describes, as main.py saves it."""
    args, seed, stage, is_converted = FIXTURES[name]
    model = official_model(args, seed, stage)
    if is_converted:
        return as_main_saves(converted(model).state_dict())
    return as_main_saves(model.state_dict(), epoch=seed, model=args.model, best_prec1=50.0)


def fixture_model(name: str) -> CondenseNet:
    """The official model (training or converted form) that the fixture's state dict loads into, eval mode."""
    args, seed, stage, is_converted = FIXTURES[name]
    model = CondenseNet(args)
    if is_converted:
        condense_to_stage(model, args.condense_factor - 1, args.condense_factor)
        convert_model(model)
    return model.eval()
