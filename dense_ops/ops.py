"""Thin Python layer over torch.ops.dense_ops: fake kernels, autograd and autocast registration,
and each op's plain-torch form for ONNX export.

The C++ kernels (csrc/) do the work; this module only tells PyTorch the output shapes
of each op (for torch.compile / export / FakeTensor), how to differentiate it and how to
run it under autocast. While torch.onnx.export traces a model, the wrappers below run the
ops as standard torch ops (gather, batch norm as multiply-add, ReLU, grouped conv, channel
shuffle, concatenation), which the exporter lowers to standard ONNX operators.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

from . import _C

# Position of each parameter of a layer in the flat layer_params list, as the C++ op defines
# it (csrc/dense_block.h, LayerParam); a layer without a bottleneck has the first five.
PARAM_NAMES = tuple(_C.layer_param_names())
PARAM_SLOTS = {name: slot for slot, name in enumerate(PARAM_NAMES)}
RUNNING_STAT_SLOTS = frozenset(slot for name, slot in PARAM_SLOTS.items() if ".running_" in name)
_NORM_FIELDS = ("weight", "bias", "running_mean", "running_var")


def params_per_layer(bottleneck: bool) -> int:
    return len(PARAM_NAMES) if bottleneck else PARAM_SLOTS["conv1.weight"] + 1


def layer_param(layer, name: str):
    """The parameter `name` (one of PARAM_NAMES) in one layer's slice of layer_params."""
    return layer[PARAM_SLOTS[name]]


def norm_params(layer, norm: str):
    """(weight, bias, running_mean, running_var) of `norm` ("norm1" or "norm2") in one layer's parameters."""
    return tuple(layer_param(layer, f"{norm}.{field}") for field in _NORM_FIELDS)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the ops' statistics for input of `dtype`: the C++ rule (csrc/dtypes.h)."""
    return _C.stats_dtype(dtype)


def _block_geometry(input, layer_params, bottleneck):
    per_layer = params_per_layer(bottleneck)
    num_layers = len(layer_params) // per_layer
    growth = layer_params[(num_layers - 1) * per_layer + per_layer - 1].shape[0]
    width = layer_param(layer_params, "conv1.weight").shape[0] if bottleneck else 0
    return num_layers, growth, width


def _check_devices(op, input, **tensors):
    """The dispatcher runs a fake kernel when any tensor is on meta; real kernels reject mixed
    devices, so the fake ones must too (else a CPU caller would get uninitialized memory)."""
    for name, t in tensors.items():
        items = [(f"{name}[{i}]", item) for i, item in enumerate(t)] if isinstance(t, (list, tuple)) else [(name, t)]
        for label, item in items:
            torch._check(item is None or item.device == input.device,
                         lambda: f"{op}: {label} is on {item.device}, but the input is on {input.device}")


def _empty(shape, like, dtype=None, memory_format=torch.contiguous_format):
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=memory_format)


@torch.library.register_fake("dense_ops::dense_block_forward")
def _dense_block_forward_fake(input, layer_params, dropout_mask, bottleneck, training, recompute, eps,
                              sync_group=None):
    _check_devices("dense_block_forward", input, layer_params=layer_params, dropout_mask=dropout_mask)
    num_layers, growth, width = _block_geometry(input, layer_params, bottleneck)
    n, c0, h, w = input.shape
    fmt = suggest_memory_format(input)
    acc = stats_dtype(input.dtype)
    stat_channels = c0 + num_layers * growth if training else 0
    features = _empty((n, c0 + num_layers * growth, h, w), input, memory_format=fmt)
    saved_channels_last = _C.bottleneck_channels_last(input.device.type == "cpu", fmt == torch.channels_last)
    saved_fmt = torch.channels_last if saved_channels_last else torch.contiguous_format
    saved = [_empty((n, width, h, w), input, memory_format=saved_fmt) for _ in range(num_layers)] \
        if (bottleneck and recompute == "bn_relu") else []
    stat_width = width if training else 0
    return (features, _empty((stat_channels,), input, acc), _empty((stat_channels,), input, acc), saved,
            _empty((num_layers, stat_width), input, acc), _empty((num_layers, stat_width), input, acc))


@torch.library.register_fake("dense_ops::dense_block_backward")
def _dense_block_backward_fake(grad_features, features, batch_mean, batch_var, saved_bottleneck, bottleneck_mean,
                               bottleneck_var, layer_params, dropout_mask, bottleneck, training, eps,
                               layer_needs_grad, input_needs_grad, sync_group=None):
    _check_devices("dense_block_backward", features, grad_features=grad_features, batch_mean=batch_mean,
                   batch_var=batch_var, saved_bottleneck=saved_bottleneck, bottleneck_mean=bottleneck_mean,
                   bottleneck_var=bottleneck_var, layer_params=layer_params, dropout_mask=dropout_mask)
    per_layer = params_per_layer(bottleneck)
    num_layers, growth, _ = _block_geometry(features, layer_params, bottleneck)
    n, c, h, w = features.shape
    acc = stats_dtype(features.dtype)
    if input_needs_grad:
        grad_input = _empty((n, c - num_layers * growth, h, w), features, memory_format=suggest_memory_format(features))
    else:
        grad_input = _empty((0,), features)
    grads = []
    for i, p in enumerate(layer_params):
        if layer_needs_grad[i // per_layer] and i % per_layer not in RUNNING_STAT_SLOTS:
            grads.append(torch.empty_like(p))  # in p's layout, as the real op returns them
        else:
            grads.append(_empty((0,), features, acc))
    return grad_input, grads


@torch.library.register_fake("dense_ops::update_running_stats")
def _update_running_stats_fake(running_mean, running_var, batch_mean, batch_var, momentum, count):
    return None


def _setup_context(ctx, inputs, output):
    input, layer_params, dropout_mask, bottleneck, training, recompute, eps, sync_group = inputs
    features, batch_mean, batch_var, saved_bottleneck, bottleneck_mean, bottleneck_var = output
    per_layer = params_per_layer(bottleneck)
    # Only the features are differentiable; never materialize zero gradients for the rest
    # (the saved bottleneck outputs alone are as large as a quarter of a naive block).
    ctx.mark_non_differentiable(batch_mean, batch_var, bottleneck_mean, bottleneck_var, *saved_bottleneck)
    ctx.set_materialize_grads(False)
    ctx.bottleneck, ctx.training, ctx.eps, ctx.sync_group = bottleneck, training, eps, sync_group
    ctx.num_params = len(layer_params)
    ctx.num_saved = len(saved_bottleneck)
    ctx.has_mask = dropout_mask is not None
    ctx.input_needs_grad = input.requires_grad
    ctx.layer_needs_grad = [
        int(any(p.requires_grad for p in layer_params[i:i + per_layer])) for i in range(0, len(layer_params), per_layer)
    ]
    mask = [dropout_mask] if dropout_mask is not None else []
    # A training step updates the running statistics in place after this op, and its
    # backward does not read them: they are not saved.
    saved_params = [None if training and i % per_layer in RUNNING_STAT_SLOTS else p
                    for i, p in enumerate(layer_params)]
    ctx.save_for_backward(features, batch_mean, batch_var, bottleneck_mean, bottleneck_var, *mask,
                          *saved_bottleneck, *saved_params)


def _backward(ctx, grad_features, *_unused_stat_grads):
    if torch.is_grad_enabled():
        raise NotImplementedError("dense_ops: double backward (create_graph=True) through a dense block is not supported")
    features, batch_mean, batch_var, bottleneck_mean, bottleneck_var, *rest = ctx.saved_tensors
    dropout_mask = rest.pop(0) if ctx.has_mask else None
    saved_bottleneck, layer_params = rest[:ctx.num_saved], rest[ctx.num_saved:]
    unused = batch_mean.new_empty((0,))
    layer_params = [unused if p is None else p for p in layer_params]
    if grad_features is None:
        grad_features = torch.zeros_like(features)
    grad_input, grad_params = torch.ops.dense_ops.dense_block_backward(
        grad_features, features, batch_mean, batch_var, saved_bottleneck, bottleneck_mean, bottleneck_var,
        layer_params, dropout_mask, ctx.bottleneck, ctx.training, ctx.eps, ctx.layer_needs_grad,
        ctx.input_needs_grad, ctx.sync_group)
    per_layer = params_per_layer(ctx.bottleneck)
    grads = [
        g if ctx.layer_needs_grad[i // per_layer] and i % per_layer not in RUNNING_STAT_SLOTS else None
        for i, g in enumerate(grad_params)
    ]
    grads_per_argument = (grad_input if ctx.input_needs_grad else None, grads, None, None, None, None, None, None)
    # One gradient per argument the call passed (needs_input_grad has their count): the dispatcher drops a
    # trailing argument equal to its schema default (sync_group=None), and torch 2.11 refuses a longer tuple.
    return grads_per_argument[:len(ctx.needs_input_grad)]


torch.library.register_autograd("dense_ops::dense_block_forward", _backward, setup_context=_setup_context)


def exporting_to_onnx() -> bool:
    """Whether torch.onnx.export is tracing: the op wrappers then run the ops' plain-torch forms."""
    return torch.onnx.is_in_onnx_export()


def _per_channel(t, like):
    return t.to(like.dtype).view(1, -1, 1, 1)


def _affine_relu(x, scale, shift):
    """relu(x * scale + shift) per channel: an eval-mode batch norm folded into one multiply-add."""
    return F.relu(x * _per_channel(scale, x) + _per_channel(shift, x))


def fold_batch_norm(weight, bias, running_mean, running_var, eps):
    """An eval-mode batch norm as one affine map per channel: bn(x) = x * scale + shift (weight and bias
    None: 1 and 0)."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    return scale, shift if bias is None else shift + bias


def _bn_relu(x, norm_params, eps):
    return _affine_relu(x, *fold_batch_norm(*norm_params, eps))


def _plain_dense_block_forward(input, layer_params, dropout_mask, bottleneck, training, eps):
    """The block op in plain torch ops, with running statistics (the op's outputs in eval mode)."""
    if training:
        raise NotImplementedError("dense_ops: ONNX export of a dense block in training mode (batch statistics) is "
                                  "not supported; export the model in eval mode (model.eval())")
    per_layer = params_per_layer(bottleneck)
    features = input
    for start in range(0, len(layer_params), per_layer):
        layer = layer_params[start:start + per_layer]
        conv1 = layer_param(layer, "conv1.weight")
        new = F.conv2d(_bn_relu(features, norm_params(layer, "norm1"), eps), conv1, padding=conv1.shape[-1] // 2)
        if bottleneck:
            conv2 = layer_param(layer, "conv2.weight")
            new = F.conv2d(_bn_relu(new, norm_params(layer, "norm2"), eps), conv2, padding=conv2.shape[-1] // 2)
        if dropout_mask is not None:
            first = features.shape[1] - input.shape[1]
            new = new * dropout_mask[:, first:first + new.shape[1]]
        features = torch.cat([features, new], 1)
    no_stats = input.new_empty((0,), dtype=stats_dtype(input.dtype))  # the op's eval-mode shapes
    no_bottleneck_stats = no_stats.view(len(layer_params) // per_layer, 0)
    return features, no_stats, no_stats, [], no_bottleneck_stats, no_bottleneck_stats


def dense_block_forward(input, layer_params, dropout_mask, bottleneck, training, recompute, eps,
                        sync_group=None):
    """Runs the whole block; returns (features, batch_mean, batch_var, saved_bottleneck,
    bottleneck_mean, bottleneck_var). recompute: "bn_relu" keeps the bottleneck outputs in
    saved_bottleneck, "bottleneck" keeps nothing but the features. See csrc/dense_ops.cpp."""
    if exporting_to_onnx():
        return _plain_dense_block_forward(input, layer_params, dropout_mask, bottleneck, training, eps)
    return torch.ops.dense_ops.dense_block_forward(input, layer_params, dropout_mask, bottleneck, training,
                                                   recompute, eps, sync_group)


def update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, count):
    """running = (1 - momentum) * running + momentum * batch (unbiased variance), in place."""
    torch.ops.dense_ops.update_running_stats(running_mean, running_var, batch_mean, batch_var, momentum, count)


# --- The transition's BN-ReLU-avgpool2x2 (csrc/transition.cpp) ---

@torch.library.register_fake("dense_ops::bn_relu_pool")
def _bn_relu_pool_fake(input, weight, bias, mean, var, training, eps):
    _check_devices("bn_relu_pool", input, weight=weight, bias=bias, mean=mean, var=var)
    n, c, h, w = input.shape
    pooled = _empty((n, c, h // 2, w // 2), input, memory_format=suggest_memory_format(input))
    stats = _empty((c,), input, dtype=stats_dtype(input.dtype))
    return pooled, stats, torch.empty_like(stats)


@torch.library.register_fake("dense_ops::bn_relu_pool_backward")
def _bn_relu_pool_backward_fake(grad_pooled, input, weight, bias, mean, var, training, eps, input_needs_grad):
    _check_devices("bn_relu_pool_backward", input, grad_pooled=grad_pooled, weight=weight, bias=bias, mean=mean,
                   var=var)
    grad_input = (_empty(input.shape, input, memory_format=suggest_memory_format(input)) if input_needs_grad
                  else _empty((0,), input))
    return grad_input, torch.empty_like(weight), torch.empty_like(bias)


def bn_relu_pool(input, weight, bias, mean, var, training, eps):
    """avg_pool2d(relu(batch_norm(input)), 2) in one pass; returns (pooled, mean, var): the batch
    statistics in training, copies of mean and var (the running statistics) in eval mode."""
    return torch.ops.dense_ops.bn_relu_pool(input, weight, bias, mean, var, training, eps)


def bn_relu_pool_backward(grad_pooled, input, weight, bias, mean, var, training, eps, input_needs_grad):
    """Its backward, given forward's mean and var: (grad_input, grad_weight, grad_bias)."""
    return torch.ops.dense_ops.bn_relu_pool_backward(grad_pooled, input, weight, bias, mean, var, training, eps,
                                                     input_needs_grad)


# --- CondenseNet: the condensed 1x1 convolution (csrc/condensed_conv.h, csrc/common/condense_math.h) ---

def channel_shuffle(x, groups):
    """Channel g*D + j moves to j*groups + g (ShuffleNet's shuffle, as CondenseNet applies it)."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _condensed_out_channels(weight, groups):
    torch._check(groups > 0, lambda: f"condensed_conv: groups must be positive, got {groups}")
    torch._check(weight.shape[0] % groups == 0,
                 lambda: f"condensed_conv: weight's out_channels {weight.shape[0]} is not divisible by groups={groups}")
    return weight.shape[0]


@torch.library.register_fake("dense_ops::condensed_conv")
def _condensed_conv_fake(input, index, scale, shift, weight, groups, out_scale=None, out_shift=None):
    _check_devices("condensed_conv", input, index=index, scale=scale, shift=shift, weight=weight,
                   out_scale=out_scale, out_shift=out_shift)
    n, _, h, w = input.shape
    out_channels = _condensed_out_channels(weight, groups)
    return _empty((n, out_channels, h, w), input, memory_format=suggest_memory_format(input))


def _condensed_conv_backward(ctx, grad):
    raise RuntimeError(
        "dense_ops.condensed_conv is an inference kernel and has no backward; dense_ops.CondensedConv runs the "
        "differentiable step-by-step path (unfused_condensed_conv) when gradients are needed (training mode, or "
        "inputs requiring grad)")


torch.library.register_autograd("dense_ops::condensed_conv", _condensed_conv_backward)


def _plain_condensed_conv(input, index, scale, shift, weight, groups, out_scale=None, out_shift=None):
    """The condensed conv in plain torch ops: index_select, multiply-add, ReLU, grouped conv, shuffle."""
    x = _affine_relu(torch.index_select(input, 1, index), scale, shift)
    y = channel_shuffle(F.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1), groups=groups), groups)
    return y if out_scale is None else _affine_relu(y, out_scale, out_shift)


def condensed_conv(input, index, scale, shift, weight, groups, out_scale=None, out_shift=None):
    """Gather input[:, index] -> relu(x * scale + shift) -> grouped 1x1 conv -> channel shuffle, as one op.
    index, scale, shift: [groups * K]; weight: [O, K] or [O, K, 1, 1]. With out_scale and out_shift
    ([O], per output channel) the op returns relu(y * out_scale + out_shift): the next BN and ReLU, fused."""
    if exporting_to_onnx():
        return _plain_condensed_conv(input, index, scale, shift, weight, groups, out_scale, out_shift)
    return torch.ops.dense_ops.condensed_conv(input, index, scale, shift, weight, groups, out_scale, out_shift)


# --- CondenseNet: the 3x3 grouped convolution (csrc/group_conv.h) -------------------------------

@torch.library.register_fake("dense_ops::group_conv3x3")
def _group_conv3x3_fake(input, weight, groups):
    _check_devices("group_conv3x3", input, weight=weight)
    torch._check(groups > 0, lambda: f"group_conv3x3: groups must be positive, got {groups}")
    torch._check(weight.shape[0] % groups == 0,
                 lambda: f"group_conv3x3: weight's out_channels {weight.shape[0]} is not divisible by groups={groups}")
    n, _, h, w = input.shape
    return _empty((n, weight.shape[0], h, w), input, memory_format=suggest_memory_format(input))


def _group_conv3x3_backward(ctx, grad):
    raise RuntimeError(
        "dense_ops.group_conv3x3 is an inference kernel and has no backward; GroupConv2d runs nn.Conv2d when "
        "gradients are needed")


torch.library.register_autograd("dense_ops::group_conv3x3", _group_conv3x3_backward)


def group_conv3x3(input, weight, groups):
    """conv2d(input, weight, padding=1, groups=groups) for inference (stride 1, no bias): on CPU, thin groups
    run in a direct kernel (oneDNN's grouped kernel is slow on them), wider ones through oneDNN; cuDNN on CUDA."""
    if exporting_to_onnx():
        return F.conv2d(input, weight, padding=1, groups=groups)
    return torch.ops.dense_ops.group_conv3x3(input, weight, groups)


# --- Autocast: the condensed and grouped convs run in the autocast dtype, as a convolution does ------
# The input and the weight are cast (float64 stays, as autocast leaves it); the condensed conv's
# folded BN scale and shift stay float32: its kernels apply them and accumulate the GEMM in float32.

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_autocast_library = torch.library.Library("dense_ops", "IMPL")  # kept alive: it holds the registrations


def autocast_operand(t, device_type):
    """`t` as autocast passes it to a low-precision op: float32/float16/bfloat16 tensors of the
    autocast device in its dtype, float64 and the rest unchanged."""
    if not t.is_floating_point() or t.dtype == torch.float64 or t.device.type != device_type:
        return t
    return t.to(torch.get_autocast_dtype(device_type))


def _autocast_kernel(op, device_type, cast):
    """The autocast kernel of `op`: the arguments named in `cast` as autocast operands, then `op` with autocast off."""
    names = [argument.name for argument in op._schema.arguments]

    def kernel(*args):
        args = [autocast_operand(a, device_type) if name in cast else a for name, a in zip(names, args)]
        with torch.autocast(device_type, enabled=False):
            return op(*args)
    return kernel


for _device_type, _key in _AUTOCAST_KEYS.items():
    for _name in ("condensed_conv", "group_conv3x3"):
        _op = getattr(torch.ops.dense_ops, _name).default
        _autocast_library.impl(_name, _autocast_kernel(_op, _device_type, cast=("input", "weight")), _key)
