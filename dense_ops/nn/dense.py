"""Drop-in replacements for torchvision's _DenseLayer, _DenseBlock and _Transition.

Same constructor signatures, same module, parameter and buffer names, so state dicts
load both ways with strict=True; the block runs as one compiled op over a shared buffer,
the transition as one step that keeps only its input for backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .. import functional, ops
from .._common import has_hooks
from .unfused import UnfusedDenseBlock, UnfusedDenseLayer, UnfusedTransition

__all__ = ["DenseBlock", "DenseLayer", "Transition", "run_layers", "sync_group_name"]


def _layer_params(layer: nn.Module) -> list[torch.Tensor]:
    names = ops.PARAM_NAMES[:ops.params_per_layer(layer.bottleneck)]
    return [layer.get_parameter(n) if n.endswith(("weight", "bias")) else layer.get_buffer(n) for n in names]


def _norms(layer: nn.Module) -> list[nn.BatchNorm2d]:
    return [layer.norm1, layer.norm2] if layer.bottleneck else [layer.norm1]


def _momentum_factors(norms: list[nn.BatchNorm2d]) -> list[float]:
    """The averaging factor of this training step in every BN, as nn.BatchNorm2d computes it."""
    return [1.0 / float(bn.num_batches_tracked + 1) if bn.momentum is None else bn.momentum for bn in norms]


def _norms_of(layers: list[nn.Module]) -> list[nn.BatchNorm2d]:
    return [norm for layer in layers for norm in _norms(layer)]


def _why_not_fused(layers: list[nn.Module], norms: list[nn.BatchNorm2d]) -> str | None:
    """Why the layers must run module by module for the block op to mean the same, or None when
    they can run as one op."""
    if len({bn.training for bn in norms}) > 1 or len({layer.training for layer in layers}) > 1:
        return ("its layers or batch norms differ in train/eval mode (a batch norm frozen with .eval() in a "
                "training model uses its running statistics)")
    if len({layer.drop_rate for layer in layers}) > 1:
        return "its layers differ in drop_rate"
    if any(not (bn.affine and bn.track_running_stats) for bn in norms):
        return "a batch norm lacks affine parameters or running statistics"
    if any(bn.eps != norms[0].eps for bn in norms):
        return "its batch norms differ in eps"
    if has_hooks(*(m for layer in layers for m in layer.children())):
        return "hooks are registered on its layers' modules"
    return None


def sync_group_name(module: nn.Module) -> str | None:
    """The process group whose batch statistics `module` uses in training (see
    dense_ops.convert_sync_batchnorm), or None for this rank's own batch. Like
    nn.SyncBatchNorm, nothing is synchronized outside a distributed run of several ranks."""
    if not getattr(module, "sync_batchnorm", False) or not (dist.is_available() and dist.is_initialized()):
        return None
    group = module.process_group or dist.group.WORLD
    return group.group_name if dist.get_world_size(group) > 1 else None


def run_layers(layers: list[nn.Module], x: torch.Tensor, recompute: str, sync_group: str | None = None
               ) -> torch.Tensor | None:
    """Runs consecutive dense layers (DenseLayer or torchvision-compatible) as one block op;
    returns None when they cannot run as one (see _why_not_fused) and must run module by module."""
    norms = _norms_of(layers)
    reason = _why_not_fused(layers, norms)
    if reason is not None:
        if sync_group is not None:
            raise ValueError(f"dense_ops: a synchronized dense block must run as one op, but {reason}")
        return None
    bn_training, dropout_training = norms[0].training, layers[0].training
    params = [t for layer in layers for t in _layer_params(layer)]
    features = functional.dense_block(
        x, params, bottleneck=layers[0].bottleneck, training=bn_training,
        momentum=_momentum_factors(norms) if bn_training else [], eps=norms[0].eps,
        drop_rate=layers[0].drop_rate, dropout_training=dropout_training, recompute=recompute,
        sync_group=sync_group if bn_training else None)
    if bn_training:  # counted once the step succeeded: a rejected input leaves the block untouched
        for bn in norms:
            bn.num_batches_tracked.add_(1)
    return features


class DenseLayer(UnfusedDenseLayer):
    """torchvision's _DenseLayer (same names); forward(inputs) returns the k new channels.

    `memory_efficient` is kept for signature compatibility: this layer never keeps
    concatenations, so it changes nothing.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int | None, drop_rate: float = 0.0,
                 memory_efficient: bool = False):
        super().__init__(num_input_features, growth_rate, bn_size, drop_rate)
        self.memory_efficient = memory_efficient
        self.sync_batchnorm, self.process_group = False, None  # see dense_ops.convert_sync_batchnorm

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(inputs, 1) if isinstance(inputs, (list, tuple)) else inputs
        features = run_layers([self], x, "bn_relu", sync_group_name(self))
        if features is None:
            return super().forward(x)
        return features[:, x.shape[1]:]


class DenseBlock(UnfusedDenseBlock):
    """torchvision's _DenseBlock (same names) as one op over a preallocated shared buffer.

    forward(x: [N, C, H, W]) -> [N, C + num_layers * growth_rate, H, W].
    recompute="bn_relu" keeps the bottleneck outputs for backward; "bottleneck" keeps only
    the features and recomputes conv1 too.
    """

    _version = 2
    layer_type = DenseLayer

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int | None, growth_rate: int,
                 drop_rate: float = 0.0, memory_efficient: bool = True, *, recompute: str = "bn_relu"):
        recompute = functional.check_recompute(recompute)
        super().__init__(num_layers, num_input_features, bn_size, growth_rate, drop_rate)
        self.recompute = recompute
        self.memory_efficient = memory_efficient
        self.sync_batchnorm, self.process_group = False, None  # see dense_ops.convert_sync_batchnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.values())
        features = None if has_hooks(*layers) else run_layers(layers, x, self.recompute, sync_group_name(self))
        return super().forward(x) if features is None else features  # else module by module

    def extra_repr(self) -> str:
        return f"recompute={self.recompute!r}" + (", sync_batchnorm=True" if self.sync_batchnorm else "")


def _standard_transition(transition: nn.Module) -> bool:
    """Whether the transition's modules compute exactly BN-ReLU-conv1x1-avgpool2x2, as functional.transition does."""
    norm, relu, conv, pool = transition.norm, transition.relu, transition.conv, transition.pool
    return (type(norm) is nn.BatchNorm2d and norm.affine and norm.track_running_stats and type(relu) is nn.ReLU
            and type(conv) is nn.Conv2d and conv.bias is None and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1
            and type(pool) is nn.AvgPool2d and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
            and pool.padding in (0, (0, 0)) and not pool.ceil_mode and pool.divisor_override is None
            and not has_hooks(norm, relu, conv, pool))


class Transition(UnfusedTransition):
    """torchvision's _Transition (same names) as one step, functional.transition: the 1x1 conv runs
    after the pool, on a quarter of the pixels, and backward recomputes the BN-ReLU instead of
    keeping it. Modules replaced by other kinds, or with hooks, run module by module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _standard_transition(self):
            return super().forward(x)
        norm = self.norm
        momentum = _momentum_factors([norm])[0] if norm.training else 0.0
        out = functional.transition(x, norm.weight, norm.bias, norm.running_mean, norm.running_var, self.conv.weight,
                                    training=norm.training, momentum=momentum, eps=norm.eps)
        if norm.training:  # counted once the step succeeded, as the block does
            norm.num_batches_tracked.add_(1)
        return out
