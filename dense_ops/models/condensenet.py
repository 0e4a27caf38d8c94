"""CondenseNet (Huang et al., CVPR 2018) for CIFAR and ImageNet, following the official architecture.

Each dense layer is LearnedGroupConv(1x1, bottleneck*k) -> BN-ReLU-Conv3x3(k, groups); growth
rates increase exponentially from stage to stage; the transitions are "fully dense" (2x2 average
pooling only, so every stage sees all earlier features). ``dense_ops.condense(model)`` turns a
trained model into its inference form.

In inference (no autograd), a block writes every layer's new features into one preallocated
[N, C_total, H, W] buffer and each layer reads a prefix view of it: no torch.cat. Training
concatenates, since autograd needs the earlier layers' inputs unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torch._prims_common import suggest_memory_format

from ..condense import LearnedGroupConv

BOTTLENECK = 4


class CondenseLayer(nn.Module):
    """conv_1: LearnedGroupConv 1x1 (in -> 4k); conv_2: BN-ReLU-Conv3x3 (4k -> k) with `groups` groups."""

    def __init__(self, in_channels: int, growth_rate: int, groups: int, condense_factor: int,
                 dropout_rate: float = 0.0):
        super().__init__()
        width = BOTTLENECK * growth_rate
        self.conv_1 = LearnedGroupConv(in_channels, width, groups, condense_factor, dropout_rate)
        self.conv_2 = nn.Sequential(OrderedDict([
            ("norm", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(width, growth_rate, kernel_size=3, padding=1, groups=groups, bias=False)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_2(self.conv_1(x))


class CondenseBlock(nn.ModuleDict):
    """x -> [x, H_1(x), H_2([x, H_1(x)]), ...]; layers named denselayer_1..denselayer_L."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, groups: int, condense_factor: int,
                 dropout_rate: float = 0.0):
        super().__init__()
        self.in_channels, self.growth_rate = in_channels, growth_rate
        self.out_channels = in_channels + num_layers * growth_rate
        self.preallocate = True  # inference writes into one buffer; False forces torch.cat (reference form)
        for i in range(num_layers):
            self.add_module(f"denselayer_{i + 1}", CondenseLayer(in_channels + i * growth_rate, growth_rate, groups,
                                                                 condense_factor, dropout_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preallocate and not torch.is_grad_enabled():
            return self._forward_into_buffer(x)
        for layer in self.values():
            x = torch.cat([x, layer(x)], 1)
        return x

    def _forward_into_buffer(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        buffer = torch.empty((n, self.out_channels, h, w), dtype=x.dtype, device=x.device,
                             memory_format=suggest_memory_format(x))
        buffer[:, :c].copy_(x)
        for layer in self.values():
            buffer[:, c:c + self.growth_rate].copy_(layer(buffer[:, :c]))
            c += self.growth_rate
        return buffer


class CondenseNet(nn.Module):
    """Stem conv (2*k_0 channels) -> dense stages joined by 2x2 average pooling -> BN-ReLU-pool -> linear."""

    def __init__(self, stages, growth_rates, groups: int, condense_factor: int, num_classes: int, stem_stride: int,
                 dropout_rate: float = 0.0):
        super().__init__()
        if len(stages) != len(growth_rates) or not stages:
            raise ValueError(f"stages {tuple(stages)} and growth_rates {tuple(growth_rates)} must be non-empty "
                             "and of equal length")
        channels = 2 * growth_rates[0]
        self.features = nn.Sequential()
        self.features.add_module("init_conv", nn.Conv2d(3, channels, kernel_size=3, stride=stem_stride, padding=1,
                                                        bias=False))
        for i, (num_layers, growth) in enumerate(zip(stages, growth_rates)):
            if i > 0:
                self.features.add_module(f"transition_{i}", nn.AvgPool2d(kernel_size=2, stride=2))
            block = CondenseBlock(num_layers, channels, growth, groups, condense_factor, dropout_rate)
            self.features.add_module(f"denseblock_{i + 1}", block)
            channels = block.out_channels
        self.features.add_module("norm_last", nn.BatchNorm2d(channels))
        self.features.add_module("relu_last", nn.ReLU(inplace=True))
        self.features.add_module("pool_last", nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(channels, num_classes)
        self._initialize()

    def _initialize(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def condensenet_cifar(depth: int = 86, growth_rates=(8, 16, 32), groups: int = 4, condense_factor: int = 4,
                      num_classes: int = 10, dropout_rate: float = 0.0) -> CondenseNet:
    """CondenseNet-(6n+2) for 32x32 inputs: 3 stages of n layers, 3x3 stem of 2*growth_rates[0]."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (e.g. 50, 86, 182), got {depth}")
    if len(growth_rates) != 3:
        raise ValueError(f"growth_rates must have 3 entries (one per stage), got {tuple(growth_rates)}")
    n = (depth - 2) // 6
    return CondenseNet((n, n, n), growth_rates, groups, condense_factor, num_classes, stem_stride=1,
                       dropout_rate=dropout_rate)


def condensenet74(condense_factor: int = 4, groups: int | None = None, num_classes: int = 1000) -> CondenseNet:
    """ImageNet CondenseNet-74: stages 4-6-8-10-8, growth 8-16-32-64-128, stride-2 3x3 stem."""
    return CondenseNet((4, 6, 8, 10, 8), (8, 16, 32, 64, 128), groups or condense_factor, condense_factor,
                       num_classes, stem_stride=2)
