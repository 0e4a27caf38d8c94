"""Naive pure-PyTorch implementations: the ground truth for tests and the benchmark baseline.

They concatenate every layer's inputs with torch.cat and let autograd keep every
intermediate, exactly like torchvision's DenseNet with memory_efficient=False, and
use the same module and parameter names.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k), or BN-ReLU-Conv3x3(k) when bn_size is falsy."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int | None, drop_rate: float = 0.0):
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


class DenseBlock(nn.ModuleDict):
    """x -> cat(x, H_1(x), H_2([x, H_1(x)]), ...) with layers named denselayer1..denselayerL."""

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int | None, growth_rate: int,
                 drop_rate: float = 0.0):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}",
                            DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1-AvgPool2x2 between dense blocks."""

    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(num_input_features)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
        ]))


# --- CondenseNet ------------------------------------------------------------------------------

def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Channel g*D + j moves to j*groups + g (ShuffleNet's shuffle, as CondenseNet applies it)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def condensed_conv(input: torch.Tensor, index: torch.Tensor, norm: nn.BatchNorm2d, weight: torch.Tensor,
                   groups: int) -> torch.Tensor:
    """CondenseNet's inference layer step by step: index_select -> BN -> ReLU -> grouped 1x1 conv -> shuffle."""
    x = F.relu(norm(torch.index_select(input, 1, index)))
    return channel_shuffle(F.conv2d(x, weight.view(weight.shape[0], -1, 1, 1), groups=groups), groups)


class CondensedConv(nn.Module):
    """The step-by-step form of dense_ops.CondensedConv, sharing its parameters and buffers."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.norm, self.weight, self.groups = fused.norm, fused.weight, fused.groups
        self.register_buffer("index", fused.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return condensed_conv(x, self.index, self.norm, self.weight, self.groups)


def unfused_condensenet(model: nn.Module) -> nn.Module:
    """A copy of a converted CondenseNet in the naive inference form of the official code: every
    CondensedConv as index_select/BN/ReLU/grouped conv/shuffle, every block concatenating with torch.cat."""
    import copy

    from .condense import CondensedConv as FusedCondensedConv

    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, FusedCondensedConv):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, CondensedConv(module))
        if hasattr(module, "preallocate"):
            module.preallocate = False
    return model
