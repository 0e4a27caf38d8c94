"""CondenseNet (Huang et al., CVPR 2018) for CIFAR and ImageNet, following the official architecture.

Each dense layer is LearnedGroupConv(1x1, bottleneck*k, group_1x1 groups) -> BN-ReLU-Conv3x3(k,
group_3x3 groups); growth rates increase exponentially from stage to stage; the transitions are
"fully dense" (2x2 average pooling only, so every stage sees all earlier features), or, in the
DenseNet-LGC variant, learned group convs that compress before the pooling. The options, module and
parameter names are the official code's (``load_official_condensenet`` loads its checkpoints).
``dense_ops.condense(model)`` turns a trained model into its inference form.

In inference (no gradient needed: grad mode off, or neither the input nor any parameter requires
grad, as in the output of ``dense_ops.condense``), a block writes every layer's new features into
one preallocated [N, C_total, H, W] buffer and each layer reads a prefix view of it: no torch.cat;
the 2x2 transition pools are strided adds (average_pool_2x2_into), and the 3x3 grouped convs run as
dense_ops.ops.group_conv3x3 (on CPU a direct kernel for thin groups). Training concatenates, since
autograd needs the earlier layers' inputs unchanged. ``reference.unfused_condensenet`` turns all of this off.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torch._prims_common import suggest_memory_format

from .. import ops
from .._common import check_positive, has_hooks, needs_grad, needs_grad_through
from ..condense import CondensedConv, LearnedGroupConv

INIT_MODES = ("fan_in", "fan_out")


class GroupConv2d(nn.Conv2d):
    """nn.Conv2d (the official code's) that, called with `inference=True`, runs as
    dense_ops.ops.group_conv3x3 when no gradient is needed and it is a 3x3 conv of stride 1 with zero
    padding 1 and no bias, as CondenseNet's are."""

    def forward(self, x: torch.Tensor, inference: bool = False) -> torch.Tensor:
        if not inference or needs_grad(x, self.weight) or not self._is_group_conv3x3():
            return super().forward(x)
        return ops.group_conv3x3(x, self.weight, self.groups)

    def _is_group_conv3x3(self) -> bool:
        return (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1)
                and self.dilation == (1, 1) and self.bias is None and self.padding_mode == "zeros")


@dataclass(frozen=True)
class LayerOptions:
    """What every dense layer of a CondenseNet shares (the official code's command-line options)."""
    group_1x1: int = 4  # groups of the learned 1x1 conv (G)
    group_3x3: int = 4  # groups of the 3x3 conv
    condense_factor: int = 4  # C: the learned 1x1 conv keeps 1/C of its inputs per group
    bottleneck: int = 4  # the 1x1 conv's output width is bottleneck * growth rate
    dropout_rate: float = 0.0  # dropout before the learned 1x1 conv

    def __post_init__(self):
        for name in ("group_1x1", "group_3x3", "condense_factor", "bottleneck"):
            check_positive(name, getattr(self, name))


class CondenseLayer(nn.Module):
    """conv_1: LearnedGroupConv 1x1 (in -> bottleneck*k, group_1x1 groups); conv_2: BN-ReLU-Conv3x3
    (bottleneck*k -> k, group_3x3 groups)."""

    def __init__(self, in_channels: int, growth_rate: int, options: LayerOptions):
        super().__init__()
        width = options.bottleneck * growth_rate
        self.conv_1 = LearnedGroupConv(in_channels, width, options.group_1x1, options.condense_factor,
                                       options.dropout_rate)
        self.conv_2 = nn.Sequential(OrderedDict([
            ("norm", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", GroupConv2d(width, growth_rate, kernel_size=3, padding=1, groups=options.group_3x3,
                                 bias=False)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_2(self.conv_1(x))

    def inference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """forward() when no gradient is needed: a condensed conv_1 applies conv_2's BN and ReLU as it writes
        its output (the 3x3 conv is group_conv3x3 through GroupConv2d)."""
        if isinstance(self.conv_1, CondensedConv) and not has_hooks(self.conv_1, self.conv_2.norm, self.conv_2.relu):
            z = self.conv_1.forward_bn_relu(x, self.conv_2.norm)
        else:
            z = self.conv_2.relu(self.conv_2.norm(self.conv_1(x)))
        return self.conv_2.conv(z, inference=True)


def average_pool_2x2_into(x: torch.Tensor, out: torch.Tensor) -> None:
    """F.avg_pool2d(x, 2) written into `out` as three strided adds and a scale: on CPU about 3x
    faster than ATen's NCHW pooling kernel on CondenseNet-74's transitions (equal up to rounding)."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    torch.add(x[..., 0:h:2, 0:w:2], x[..., 1:h:2, 0:w:2], out=out)
    out.add_(x[..., 0:h:2, 1:w:2]).add_(x[..., 1:h:2, 1:w:2]).mul_(0.25)


class AvgPool2x2(nn.AvgPool2d):
    """2x2 average pooling with stride 2; without autograd, through average_pool_2x2_into."""

    def __init__(self):
        super().__init__(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x):
            return super().forward(x)
        out = torch.empty((*x.shape[:2], x.shape[2] // 2, x.shape[3] // 2), dtype=x.dtype, device=x.device,
                          memory_format=suggest_memory_format(x))
        average_pool_2x2_into(x, out)
        return out


class LearnedTransition(nn.Module):
    """DenseNet-LGC's transition: a LearnedGroupConv 1x1 (group_1x1 groups, no dropout) that compresses,
    then 2x2 average pooling."""

    def __init__(self, in_channels: int, out_channels: int, options: LayerOptions):
        super().__init__()
        self.conv = LearnedGroupConv(in_channels, out_channels, options.group_1x1, options.condense_factor)
        self.pool = AvgPool2x2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(x))


class CondenseBlock(nn.ModuleDict):
    """x -> [x, H_1(x), H_2([x, H_1(x)]), ...]; layers named denselayer_1..denselayer_L."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, options: LayerOptions):
        super().__init__()
        self.in_channels, self.growth_rate = in_channels, growth_rate
        self.out_channels = in_channels + num_layers * growth_rate
        self.preallocate = True  # inference writes into one buffer; False forces torch.cat (reference form)
        for i in range(num_layers):
            self.add_module(f"denselayer_{i + 1}", CondenseLayer(in_channels + i * growth_rate, growth_rate, options))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preallocate and not needs_grad_through(x, self):
            with torch.no_grad():  # changes nothing here, but spares the layers the same check
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
            buffer[:, c:c + self.growth_rate].copy_(layer.inference_forward(buffer[:, :c]))
            c += self.growth_rate
        return buffer


def compressed_width(channels: int, reduction: float, groups: int) -> int:
    """DenseNet-LGC's transition width: ceil(channels * reduction) rounded up to a multiple of `groups`."""
    width = math.ceil(channels * reduction)
    return -(-width // groups) * groups


class CondenseNet(nn.Module):
    """Stem conv (2*k_0 channels) -> dense stages joined by transitions -> BN-ReLU-pool -> linear.

    The transitions are 2x2 average pooling (CondenseNet's fully dense connectivity) or, with
    `transition_reduction`, DenseNet-LGC's: a learned group conv compressing to
    ``compressed_width(channels, transition_reduction, group_1x1)`` channels, then the pooling.
    `init_mode` is the fan of the He-normal init of every conv weight: "fan_in" (the default) or
    "fan_out", the official code's (std sqrt(2 / (k*k*out_channels)); it changes training from scratch
    and the group lasso's scale). Either way BN weights are 1, biases 0, the classifier's bias 0.
    """

    def __init__(self, stages, growth_rates, num_classes: int, stem_stride: int,
                 options: LayerOptions = LayerOptions(), transition_reduction: float | None = None,
                 init_mode: str = "fan_in"):
        super().__init__()
        if len(stages) != len(growth_rates) or not stages:
            raise ValueError(f"stages {tuple(stages)} and growth_rates {tuple(growth_rates)} must be non-empty "
                             "and of equal length")
        if transition_reduction is not None and not 0.0 < transition_reduction <= 1.0:
            raise ValueError("transition_reduction (densenet_lgc's reduction) must be in (0, 1] or None, "
                             f"got {transition_reduction!r}")
        if init_mode not in INIT_MODES:
            raise ValueError(f"init_mode must be one of {INIT_MODES}, got {init_mode!r}")
        channels = 2 * growth_rates[0]
        self.features = nn.Sequential()
        self.features.add_module("init_conv", nn.Conv2d(3, channels, kernel_size=3, stride=stem_stride, padding=1,
                                                        bias=False))
        for i, (num_layers, growth) in enumerate(zip(stages, growth_rates)):
            if i > 0:
                transition, channels = self._transition(channels, options, transition_reduction)
                self.features.add_module(f"transition_{i}", transition)
            block = CondenseBlock(num_layers, channels, growth, options)
            self.features.add_module(f"denseblock_{i + 1}", block)
            channels = block.out_channels
        self.features.add_module("norm_last", nn.BatchNorm2d(channels))
        self.features.add_module("relu_last", nn.ReLU(inplace=True))
        self.features.add_module("pool_last", nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Linear(channels, num_classes)
        self._initialize(init_mode)

    @staticmethod
    def _transition(channels: int, options: LayerOptions, reduction: float | None) -> tuple[nn.Module, int]:
        """The transition module and its output width."""
        if reduction is None:
            return AvgPool2x2(), channels
        width = compressed_width(channels, reduction, options.group_1x1)
        return LearnedTransition(channels, width, options), width

    def _initialize(self, init_mode: str):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode=init_mode)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad_through(x, self):
            features = self.features(x)
        else:
            with torch.no_grad():  # changes nothing here, but spares every module below the same check
                features = self.features(x)
        return self.classifier(torch.flatten(features, 1))


def _options(groups: int, condense_factor: int, dropout_rate: float, group_1x1: int | None,
             group_3x3: int | None, bottleneck: int) -> LayerOptions:
    """`groups` is the default of both group_1x1 and group_3x3."""
    return LayerOptions(group_1x1=groups if group_1x1 is None else group_1x1,
                        group_3x3=groups if group_3x3 is None else group_3x3,
                        condense_factor=condense_factor, bottleneck=bottleneck, dropout_rate=dropout_rate)


def condensenet_cifar(depth: int = 86, growth_rates=(8, 16, 32), groups: int = 4, condense_factor: int = 4,
                      num_classes: int = 10, dropout_rate: float = 0.0, *, group_1x1: int | None = None,
                      group_3x3: int | None = None, bottleneck: int = 4, init_mode: str = "fan_in") -> CondenseNet:
    """CondenseNet-(6n+2) for 32x32 inputs: 3 stages of n layers, 3x3 stem of 2*growth_rates[0].

    The official code's options: `group_1x1` and `group_3x3` (both default to `groups`),
    `condense_factor`, `bottleneck`, `dropout_rate`; `init_mode="fan_out"` is its weight init
    (see CondenseNet)."""
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(f"depth must be 6n+2 with n >= 1 (e.g. 50, 86, 182), got {depth}")
    if len(growth_rates) != 3:
        raise ValueError(f"growth_rates must have 3 entries (one per stage), got {tuple(growth_rates)}")
    n = (depth - 2) // 6
    options = _options(groups, condense_factor, dropout_rate, group_1x1, group_3x3, bottleneck)
    return CondenseNet((n, n, n), growth_rates, num_classes, stem_stride=1, options=options, init_mode=init_mode)


def condensenet74(condense_factor: int = 4, groups: int | None = None, num_classes: int = 1000, *,
                  group_1x1: int | None = None, group_3x3: int | None = None, bottleneck: int = 4,
                  dropout_rate: float = 0.0, init_mode: str = "fan_in") -> CondenseNet:
    """ImageNet CondenseNet-74: stages 4-6-8-10-8, growth 8-16-32-64-128, stride-2 3x3 stem.

    `groups` defaults to `condense_factor` (C = G, as in the paper) and is the default of `group_1x1`
    and `group_3x3`; the other options as in condensenet_cifar."""
    groups = condense_factor if groups is None else groups
    options = _options(groups, condense_factor, dropout_rate, group_1x1, group_3x3, bottleneck)
    return CondenseNet((4, 6, 8, 10, 8), (8, 16, 32, 64, 128), num_classes, stem_stride=2, options=options,
                       init_mode=init_mode)


def densenet_lgc(stages, growth_rates, num_classes: int = 10, stem_stride: int = 1, reduction: float = 0.5, *,
                 group_1x1: int = 4, group_3x3: int = 4, condense_factor: int = 4, bottleneck: int = 4,
                 dropout_rate: float = 0.0, init_mode: str = "fan_in") -> CondenseNet:
    """The official code's DenseNet-LGC: CondenseNet's layers, but each transition is a learned group
    conv compressing by `reduction` before the pooling (see CondenseNet). `stem_stride` 1 for CIFAR,
    2 for ImageNet."""
    options = LayerOptions(group_1x1=group_1x1, group_3x3=group_3x3, condense_factor=condense_factor,
                           bottleneck=bottleneck, dropout_rate=dropout_rate)
    return CondenseNet(stages, growth_rates, num_classes, stem_stride, options, transition_reduction=reduction,
                       init_mode=init_mode)
