"""Naive pure-PyTorch implementations: the ground truth for tests and the benchmark baseline.

The dense layer, block and transition concatenate every layer's inputs with torch.cat and let
autograd keep every intermediate, exactly like torchvision's DenseNet with memory_efficient=False,
with the same module and parameter names: they are dense_ops.nn's module-by-module forms. The
CondenseNet forms run the official code's inference layer step by step. Nothing in dense_ops
imports this module: it depends on the package, never the other way round.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .condense import CondensedConv as FusedCondensedConv
from .condense import unfused_condensed_conv as condensed_conv
from .models.condensenet import AvgPool2x2
from .nn.unfused import UnfusedTransition as Transition
from .nn.unfused import UnfusedDenseBlock as DenseBlock
from .nn.unfused import UnfusedDenseLayer as DenseLayer
from .ops import channel_shuffle

__all__ = ["CondensedConv", "DenseBlock", "DenseLayer", "Transition", "channel_shuffle", "condensed_conv",
           "unfused_condensenet"]


class CondensedConv(nn.Module):
    """The step-by-step form of dense_ops.CondensedConv, sharing its parameters and buffers."""

    def __init__(self, fused: FusedCondensedConv):
        super().__init__()
        self.norm, self.weight, self.groups = fused.norm, fused.weight, fused.groups
        self.register_buffer("index", fused.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return condensed_conv(x, self.index, self.norm, self.weight, self.groups)


def unfused_condensenet(model: nn.Module) -> nn.Module:
    """A copy of a converted CondenseNet in the naive inference form of the official code: every
    CondensedConv as index_select/BN/ReLU/grouped conv/shuffle, every block concatenating with torch.cat,
    every 2x2 pool ATen's."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        if isinstance(module, FusedCondensedConv):
            setattr(model.get_submodule(parent), child, CondensedConv(module))
        if isinstance(module, AvgPool2x2):
            setattr(model.get_submodule(parent), child, nn.AvgPool2d(kernel_size=2, stride=2))
        if hasattr(module, "preallocate"):
            module.preallocate = False
    return model
