"""DenseNet models: torchvision's ImageNet networks and the paper's CIFAR networks.

The ImageNet models have torchvision's architecture and state-dict keys, so weights load
both ways with strict=True. `block_type` picks the dense block implementation, so the
benchmarks can build one architecture three ways:

- "dense_ops":  dense_ops.DenseBlock (shared buffer, recomputation; the default),
- "naive":      the module-by-module block (dense_ops.reference.DenseBlock: torch.cat, keeps every intermediate),
- "checkpoint": torchvision's _DenseBlock with memory_efficient=True (torch.utils.checkpoint).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional
from ..nn import DenseBlock, Transition
from ..nn.unfused import UnfusedDenseBlock

BLOCK_TYPES = ("dense_ops", "naive", "checkpoint")


def _check_block_type(block_type: str, bn_size: int | None) -> None:
    if block_type not in BLOCK_TYPES:
        raise ValueError(f"block_type must be one of {BLOCK_TYPES}, got {block_type!r}")
    if block_type == "checkpoint" and not bn_size:
        raise ValueError("block_type='checkpoint' (torchvision's _DenseBlock) needs a bottleneck (bn_size > 0)")


def _torchvision_densenet():
    """torchvision is optional: only block_type='checkpoint' needs it."""
    try:
        from torchvision.models import densenet
    except ImportError as error:
        raise ImportError("block_type='checkpoint' needs torchvision (pip install torchvision)") from error
    return densenet


def _make_block(block_type: str, num_layers: int, num_input_features: int, bn_size: int | None, growth_rate: int,
                drop_rate: float, memory_efficient: bool, recompute: str) -> nn.Module:
    if block_type == "dense_ops":
        return DenseBlock(num_layers, num_input_features, bn_size, growth_rate, drop_rate, memory_efficient,
                          recompute=recompute)
    if block_type == "naive":
        return UnfusedDenseBlock(num_layers, num_input_features, bn_size, growth_rate, drop_rate)
    return _torchvision_densenet()._DenseBlock(num_layers, num_input_features, bn_size, growth_rate, drop_rate,
                                             memory_efficient=True)


def _make_transition(block_type: str, num_input_features: int, num_output_features: int) -> nn.Module:
    if block_type in ("dense_ops", "naive"):
        return Transition(num_input_features, num_output_features)
    return _torchvision_densenet()._Transition(num_input_features, num_output_features)


class DenseNet(nn.Module):
    """stem -> (dense block -> transition) * (B-1) -> dense block -> BN-ReLU-global avgpool -> linear.

    Module names follow torchvision: features.{stem modules, denseblockI, transitionI,
    <final_norm_name>} and classifier. Each transition keeps floor(compression * C) channels.
    """

    def __init__(self, stem: Sequence[tuple[str, nn.Module]], num_init_features: int, block_config: Sequence[int],
                 growth_rate: int, bn_size: int | None, drop_rate: float, num_classes: int, compression: float,
                 memory_efficient: bool, recompute: str, block_type: str, final_norm_name: str):
        super().__init__()
        functional.check_recompute(recompute)
        _check_block_type(block_type, bn_size)
        if not 0.0 < compression <= 1.0:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if len(block_config) == 0:
            raise ValueError("block_config must list at least one dense block")

        self.features = nn.Sequential(OrderedDict(stem))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _make_block(block_type, num_layers, num_features, bn_size, growth_rate, drop_rate,
                                memory_efficient, recompute)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                num_output_features = int(math.floor(compression * num_features))
                self.features.add_module(f"transition{i + 1}",
                                         _make_transition(block_type, num_features, num_output_features))
                num_features = num_output_features
        self.features.add_module(final_norm_name, nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's initialization."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x), inplace=True)
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def _imagenet_densenet(growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                       num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                       num_classes: int = 1000, memory_efficient: bool = False, *, recompute: str = "bn_relu",
                       block_type: str = "dense_ops") -> DenseNet:
    stem = [
        ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(num_init_features)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]
    return DenseNet(stem, num_init_features, block_config, growth_rate, bn_size, drop_rate, num_classes,
                    compression=0.5, memory_efficient=memory_efficient, recompute=recompute,
                    block_type=block_type, final_norm_name="norm5")


def densenet121(**kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16): torchvision.models.densenet121's architecture and keys."""
    return _imagenet_densenet(**{"growth_rate": 32, "block_config": (6, 12, 24, 16), "num_init_features": 64,
                                 **kwargs})


def densenet161(**kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem channels)."""
    return _imagenet_densenet(**{"growth_rate": 48, "block_config": (6, 12, 36, 24), "num_init_features": 96,
                                 **kwargs})


def densenet169(**kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    return _imagenet_densenet(**{"growth_rate": 32, "block_config": (6, 12, 32, 32), "num_init_features": 64,
                                 **kwargs})


def densenet201(**kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    return _imagenet_densenet(**{"growth_rate": 32, "block_config": (6, 12, 48, 32), "num_init_features": 64,
                                 **kwargs})


def cifar_layers_per_block(depth: int, bottleneck: bool) -> int:
    """Layers per dense block of the paper's CIFAR networks: (depth - 4) / 3, or / 6 with bottlenecks.

    depth counts the stem conv, the transitions' convs, the final linear layer and every
    conv inside the three blocks (two per layer with a bottleneck).
    """
    convs_per_layer = 2 if bottleneck else 1
    if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 4 or (depth - 4) % (3 * convs_per_layer):
        raise ValueError(f"depth must be 3 * {convs_per_layer} * n + 4 for some n >= 1 "
                         f"({'DenseNet-BC' if bottleneck else 'basic DenseNet'}), got {depth!r}")
    return (depth - 4) // (3 * convs_per_layer)


def densenet_cifar(depth: int = 100, growth_rate: int = 12, bottleneck: bool = True, compression: float | None = None,
                   num_classes: int = 10, drop_rate: float = 0.0, *, recompute: str = "bn_relu",
                   block_type: str = "dense_ops") -> DenseNet:
    """The DenseNet paper's CIFAR/SVHN networks (Huang et al., 2017, section 3).

    Three dense blocks of n layers for 32x32 inputs (feature maps 32x32, 16x16, 8x8), a 3x3
    stem conv with 16 channels (basic) or 2k (BC), transitions BN-ReLU-Conv1x1-AvgPool that
    keep floor(compression * C) channels, and BN-ReLU-global avgpool-linear at the end.
    bottleneck=True is DenseNet-BC with 4k-wide 1x1 convs. compression=None means the
    paper's choice: 0.5 for DenseNet-BC, 1.0 (no compression) for the basic DenseNet.
    drop_rate applies after each dense layer's last conv, as in torchvision. Paper
    configurations: basic L=40/100 with k=12 and L=100 with k=24; BC L=100 k=12, L=250 k=24,
    L=190 k=40.
    """
    num_layers = cifar_layers_per_block(depth, bottleneck)
    if compression is None:
        compression = 0.5 if bottleneck else 1.0
    num_init_features = 2 * growth_rate if bottleneck else 16
    stem = [("conv0", nn.Conv2d(3, num_init_features, kernel_size=3, stride=1, padding=1, bias=False))]
    return DenseNet(stem, num_init_features, (num_layers,) * 3, growth_rate, 4 if bottleneck else None, drop_rate,
                    num_classes, compression=compression, memory_efficient=True, recompute=recompute,
                    block_type=block_type, final_norm_name="norm_final")
