"""Drop-in replacements for torchvision's _DenseLayer, _DenseBlock and _Transition.

Same constructor signatures, same module, parameter and buffer names, so state dicts
load both ways with strict=True; the block runs as one compiled op over a shared buffer.
"""
from __future__ import annotations

import numbers

import torch
import torch.distributed as dist
from torch import nn

from .. import functional, ops, reference


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _layer_params(layer: nn.Module) -> list[torch.Tensor]:
    names = ops.PARAM_NAMES if layer.bottleneck else ops.PARAM_NAMES[:5]
    return [layer.get_parameter(n) if n.endswith(("weight", "bias")) else layer.get_buffer(n) for n in names]


def _norms(layer: nn.Module) -> list[nn.BatchNorm2d]:
    return [layer.norm1, layer.norm2] if layer.bottleneck else [layer.norm1]


def _momentum_factors(norms: list[nn.BatchNorm2d]) -> list[float]:
    """The averaging factor of this training step in every BN, as nn.BatchNorm2d computes it."""
    return [1.0 / float(bn.num_batches_tracked + 1) if bn.momentum is None else bn.momentum for bn in norms]


def has_hooks(*modules: nn.Module) -> bool:
    """Whether calling the modules one by one would run hooks (global or their own, forward or
    backward), which a fused op would skip."""
    from torch.nn.modules import module as torch_module
    global_hooks = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
                    torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks)
    return any(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                    or m._backward_pre_hooks for m in modules)


def _norms_of(layers: list[nn.Module]) -> list[nn.BatchNorm2d]:
    return [norm for layer in layers for norm in _norms(layer)]


def _fused_modes(layers: list[nn.Module]) -> tuple[bool, bool] | None:
    """(batch-norm training, dropout training) when the layers can run as one block op, or None
    when they must run module by module for the op to mean the same: their batch norms, or the
    layers themselves, disagree on train/eval mode (a BN frozen with .eval() in a training model
    uses its running statistics), the drop rates differ, a norm lacks affine parameters or
    running statistics or has another eps, or hooks are registered on their submodules."""
    norms = _norms_of(layers)
    norm_modes, layer_modes = {bn.training for bn in norms}, {layer.training for layer in layers}
    if len(norm_modes) > 1 or len(layer_modes) > 1 or len({layer.drop_rate for layer in layers}) > 1:
        return None
    if any(not (bn.affine and bn.track_running_stats) or bn.eps != norms[0].eps for bn in norms):
        return None
    if has_hooks(*(m for layer in layers for m in layer.children())):
        return None
    return norm_modes.pop(), layer_modes.pop()


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
    returns None when they cannot run as one (see _fused_modes) and must run module by module."""
    modes = _fused_modes(layers)
    if modes is None:
        if sync_group is not None:
            raise ValueError("dense_ops: a synchronized dense block must run as one op, but its layers or batch "
                             "norms differ in train/eval mode, drop_rate or eps, lack affine parameters or "
                             "running statistics, or have hooks")
        return None
    bn_training, dropout_training = modes
    norms = _norms_of(layers)
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


class DenseLayer(reference.DenseLayer):
    """torchvision's _DenseLayer (same names); forward(inputs) returns the k new channels.

    `memory_efficient` is kept for signature compatibility: this layer never keeps
    concatenations, so it changes nothing.
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int | None, drop_rate: float = 0.0,
                 memory_efficient: bool = False):
        _check_positive("num_input_features", num_input_features)
        _check_positive("growth_rate", growth_rate)
        if bn_size is not None and bn_size != 0:
            _check_positive("bn_size", bn_size)
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate!r}")
        super().__init__(num_input_features, growth_rate, bn_size, drop_rate)
        self.memory_efficient = memory_efficient
        self.sync_batchnorm, self.process_group = False, None  # see dense_ops.convert_sync_batchnorm

    def forward(self, inputs: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(inputs, 1) if isinstance(inputs, (list, tuple)) else inputs
        features = run_layers([self], x, "bn_relu", sync_group_name(self))
        if features is None:
            return super().forward(x)
        return features[:, x.shape[1]:]


class DenseBlock(nn.ModuleDict):
    """torchvision's _DenseBlock (same names) as one op over a preallocated shared buffer.

    forward(x: [N, C, H, W]) -> [N, C + num_layers * growth_rate, H, W].
    recompute="bn_relu" keeps the bottleneck outputs for backward; "bottleneck" keeps only
    the features and recomputes conv1 too.
    """

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int | None, growth_rate: int,
                 drop_rate: float = 0.0, memory_efficient: bool = True, *, recompute: str = "bn_relu"):
        super().__init__()
        _check_positive("num_layers", num_layers)
        self.recompute = functional.check_recompute(recompute)
        self.memory_efficient = memory_efficient
        self.sync_batchnorm, self.process_group = False, None  # see dense_ops.convert_sync_batchnorm
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size, drop_rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.values())
        features = None if has_hooks(*layers) else run_layers(layers, x, self.recompute, sync_group_name(self))
        if features is None:  # module by module, as torchvision's block runs
            outputs = [x]
            for layer in layers:
                outputs.append(layer(outputs))
            features = torch.cat(outputs, 1)
        return features

    def extra_repr(self) -> str:
        return f"recompute={self.recompute!r}" + (", sync_batchnorm=True" if self.sync_batchnorm else "")


class Transition(reference.Transition):
    """torchvision's _Transition: BN-ReLU-Conv1x1-AvgPool2x2 (same names)."""

    def __init__(self, num_input_features: int, num_output_features: int):
        _check_positive("num_input_features", num_input_features)
        _check_positive("num_output_features", num_output_features)
        super().__init__(num_input_features, num_output_features)
