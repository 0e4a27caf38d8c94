"""torchvision's dense layer, dense block and transition, run module by module.

These are the naive forms (torch.cat per layer, autograd keeps every intermediate, exactly
torchvision's DenseNet with memory_efficient=False): dense_ops.reference exposes them as the
ground truth of the tests and the baseline of the benchmarks, and the fused modules of
dense_ops.nn.dense build on them (same modules and names) and fall back to their forward
when they cannot run as one op.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .._common import check_positive


def check_layer_arguments(num_input_features: int, growth_rate: int, bn_size: int | None, drop_rate: float) -> None:
    check_positive("num_input_features", num_input_features)
    check_positive("growth_rate", growth_rate)
    if bn_size is not None and bn_size != 0:
        check_positive("bn_size", bn_size)
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")


class UnfusedDenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k), or BN-ReLU-Conv3x3(k) when bn_size is falsy.
    forward(inputs) returns the k new channels."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int | None, drop_rate: float = 0.0):
        check_layer_arguments(num_input_features, growth_rate, bn_size, drop_rate)
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        if bn_size:
            self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
            self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(num_input_features, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.bottleneck = bool(bn_size)
        self.drop_rate = float(drop_rate)

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(inputs, 1) if isinstance(inputs, (list, tuple)) else inputs
        out = self.conv1(self.relu1(self.norm1(x)))
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class UnfusedDenseBlock(nn.ModuleDict):
    """x -> cat(x, H_1(x), H_2([x, H_1(x)]), ...) with layers named denselayer1..denselayerL, each
    an instance of `layer_type`."""

    layer_type = UnfusedDenseLayer

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int | None, growth_rate: int,
                 drop_rate: float = 0.0):
        check_positive("num_layers", num_layers)
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            self.layer_type(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class UnfusedTransition(nn.Sequential):
    """torchvision's _Transition: BN-ReLU-Conv1x1-AvgPool2x2 between dense blocks (same names)."""

    def __init__(self, num_input_features: int, num_output_features: int):
        check_positive("num_input_features", num_input_features)
        check_positive("num_output_features", num_output_features)
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(num_input_features)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
        ]))
