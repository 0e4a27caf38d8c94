"""Functional API: one call runs a whole dense block over the shared feature buffer; a transition
runs as one step that keeps nothing but its input."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import ops
from ._common import needs_grad

RECOMPUTE_LEVELS = ("bn_relu", "bottleneck")
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_recompute(recompute: str) -> str:
    if recompute not in RECOMPUTE_LEVELS:
        raise ValueError(f"recompute must be one of {RECOMPUTE_LEVELS}, got {recompute!r}")
    return recompute


def _check_input(input: torch.Tensor, in_channels: int) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"input must be a 4-D [N, C, H, W] tensor, got shape {tuple(input.shape)}")
    if input.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"input must be float32, float64, float16 or bfloat16, got {input.dtype}")
    if input.shape[1] != in_channels:
        raise ValueError(f"input must have {in_channels} channels (num_input_features), got {input.shape[1]}")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    # Meta tensors have no autocast. torch 2.11's dynamo cannot trace is_autocast_available, and a compiled
    # graph never runs on meta tensors, so the check is left out of compiled code.
    if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def dense_block(input: torch.Tensor, layer_params: Sequence[torch.Tensor], *, bottleneck: bool, training: bool,
                momentum: Sequence[float] = (), eps: float = 1e-5, drop_rate: float = 0.0,
                recompute: str = "bn_relu", sync_group: str | None = None,
                dropout_training: bool | None = None) -> torch.Tensor:
    """Runs a dense block; returns [N, C0 + L*k, H, W].

    layer_params holds, per layer, norm1.{weight, bias, running_mean, running_var},
    conv1.weight and, with a bottleneck, the same for norm2/conv2 (see ops.PARAM_NAMES).
    In training, batch statistics normalize and the running statistics are updated in
    place with `momentum` (one factor per batch norm: all BN1 of the block, then all BN2).
    Dropout (`drop_rate`, after each layer) is active when `dropout_training`, by default
    when `training`: a model in training mode whose batch norms are frozen in eval mode
    passes training=False, dropout_training=True.
    With `sync_group` (the name of a torch.distributed process group), training statistics
    are taken over the batches of every rank of that group.
    """
    check_recompute(recompute)
    per_layer = ops.params_per_layer(bottleneck)
    if len(layer_params) == 0 or len(layer_params) % per_layer:
        raise ValueError(f"layer_params must hold {per_layer} tensors per layer, got {len(layer_params)}")
    if not 0.0 <= drop_rate <= 1.0:
        raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}")
    _check_input(input, layer_params[0].shape[0])
    num_layers = len(layer_params) // per_layer
    if training and sync_group is None:
        F._verify_batch_size(input.size())

    params = list(layer_params)
    if _autocast_dtype(input.device.type) is not None:
        # Autocast runs convolutions in low precision and batch norm in float32, and leaves float64
        # alone. The input may already be low precision (an earlier conv ran under autocast); the
        # weights still need the cast.
        device_type = input.device.type
        input = ops.autocast_operand(input, device_type)
        params = [ops.autocast_operand(p, device_type) if p.dim() == 4 else p for p in params]

    dropout_mask = None
    if (training if dropout_training is None else dropout_training) and drop_rate > 0:
        n, _, h, w = input.shape
        growth = params[-1].shape[0]
        keep = 1.0 - drop_rate
        dropout_mask = torch.empty((n, num_layers * growth, h, w), dtype=input.dtype, device=input.device)
        dropout_mask = dropout_mask.bernoulli_(keep).div_(keep) if keep > 0 else dropout_mask.zero_()

    kept_for_backward = recompute if needs_grad(input, *params) else "bottleneck"  # with no backward, keep nothing
    features, batch_mean, batch_var, _, bottleneck_mean, bottleneck_var = ops.dense_block_forward(
        input, params, dropout_mask, bottleneck, training, kept_for_backward, eps, sync_group)

    count = input.shape[0] * input.shape[2] * input.shape[3]
    if training and sync_group is not None:
        count = _group_count(count, sync_group, input.device)
    if training and count > 0:
        _update_running_stats(layer_params, bottleneck, batch_mean, batch_var, bottleneck_mean, bottleneck_var,
                              momentum, count)
    return features


def transition(input: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, running_mean: torch.Tensor,
               running_var: torch.Tensor, conv_weight: torch.Tensor, *, training: bool, momentum: float,
               eps: float) -> torch.Tensor:
    """torchvision's transition, BN-ReLU-conv1x1-avgpool2x2, computed as BN-ReLU-avgpool2x2-conv1x1.

    A 1x1 convolution and a 2x2 average pool are both linear maps of each pixel's values, so they
    commute (up to rounding) and the convolution runs on a quarter of the pixels. BN-ReLU-pool is
    one pass over the input (ops.bn_relu_pool), its backward two. With autograd the step keeps
    only its input, which the dense block before it keeps anyway, and the per-channel statistics;
    backward recomputes the pooled BN-ReLU. Under autocast and ONNX export it runs as plain ops.
    In training the running statistics are updated in place with `momentum`.
    """
    _check_input(input, norm_weight.shape[0])
    if training:
        F._verify_batch_size(input.size())
    if _autocast_dtype(input.device.type) is not None or ops.exporting_to_onnx():
        normalized = F.batch_norm(input, running_mean, running_var, norm_weight, norm_bias, training, momentum, eps)
        return F.conv2d(F.avg_pool2d(F.relu(normalized), 2), conv_weight)
    return _Transition.apply(input, norm_weight, norm_bias, conv_weight, running_mean, running_var, training,
                             momentum, eps)


class _Transition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, norm_weight, norm_bias, conv_weight, running_mean, running_var, training, momentum, eps):
        pooled, mean, var = ops.bn_relu_pool(input, norm_weight, norm_bias, running_mean, running_var, training, eps)
        if training:
            ops.update_running_stats([running_mean], [running_var], [mean], [var], [float(momentum)],
                                     input.shape[0] * input.shape[2] * input.shape[3])
        # Eval mode's mean and var are copies of the running statistics, which a training step
        # before this backward could change.
        ctx.save_for_backward(input, norm_weight, norm_bias, conv_weight, mean, var)
        ctx.training, ctx.eps = training, eps
        return F.conv2d(pooled, conv_weight)

    @staticmethod
    def backward(ctx, grad_out):
        input, norm_weight, norm_bias, conv_weight, mean, var = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # Forward's statistics as constants: bit for bit forward's pooled values, and ReLU mask.
        pooled, _, _ = ops.bn_relu_pool(input, norm_weight, norm_bias, mean, var, False, ctx.eps)
        grad_pooled, grad_conv, _ = torch.ops.aten.convolution_backward(
            grad_out, pooled, conv_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, needs[3], False])
        del pooled
        grad_input, grad_weight, grad_bias = ops.bn_relu_pool_backward(
            grad_pooled, input, norm_weight, norm_bias, mean, var, ctx.training, ctx.eps, needs[0])
        return (grad_input if needs[0] else None, grad_weight if needs[1] else None, grad_bias if needs[2] else None,
                grad_conv, None, None, None, None, None)


def _group_count(count: int, group_name: str, device: torch.device) -> int:
    """count summed over the process group (for the unbiased running variance)."""
    total = torch.tensor([float(count)], dtype=torch.float64, device=device)
    total = torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(total, "sum", group_name))
    return int(total.item())


def _update_running_stats(layer_params, bottleneck, batch_mean, batch_var, bottleneck_mean, bottleneck_var,
                          momentum, count):
    per_layer = ops.params_per_layer(bottleneck)
    layers = [layer_params[start:start + per_layer] for start in range(0, len(layer_params), per_layer)]
    norms = ("norm1", "norm2") if bottleneck else ("norm1",)
    # One entry per batch norm: all of the block's norm1, then all of its norm2.
    means = [ops.layer_param(layer, f"{norm}.running_mean") for norm in norms for layer in layers]
    variances = [ops.layer_param(layer, f"{norm}.running_var") for norm in norms for layer in layers]
    batch_means = [batch_mean[:mean.shape[0]] for mean in means[:len(layers)]]
    batch_vars = [batch_var[:mean.shape[0]] for mean in means[:len(layers)]]
    if bottleneck:
        batch_means += list(bottleneck_mean.unbind(0))
        batch_vars += list(bottleneck_var.unbind(0))
    if len(momentum) != len(means):
        raise ValueError(f"momentum must hold one factor per batch norm ({len(means)}), got {len(momentum)}")
    with torch.no_grad():
        ops.update_running_stats(means, variances, batch_means, batch_vars, [float(m) for m in momentum], count)
