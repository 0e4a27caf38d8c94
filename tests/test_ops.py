"""torch.library.opcheck on every dense_ops op, and clear errors for bad input."""
import os
import subprocess
import sys

import pytest
import torch

import dense_ops
from dense_ops.nn.dense import _layer_params
from helpers import block_pair


def flat_params(block, requires_grad=True):
    params = [t.detach().clone() for layer in block.values() for t in _layer_params(layer)]
    for i, p in enumerate(params):
        if i % dense_ops.ops.params_per_layer(list(block.values())[0].bottleneck) not in dense_ops.ops.RUNNING_STAT_SLOTS:
            p.requires_grad_(requires_grad)
    return params


def forward_args(bn_size, training, recompute, channels_last=False, dropout=False):
    _, block = block_pair(num_layers=2, in_channels=3, bn_size=bn_size, growth=2)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.bernoulli(torch.full((2, 4, 4, 4), 0.7, dtype=torch.float64)) / 0.7 if dropout else None
    return (x.requires_grad_(), flat_params(block), mask, bool(bn_size), training, recompute, 1e-5)


@pytest.mark.parametrize("bn_size", [2, None], ids=["bottleneck", "basic"])
@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_forward(bn_size, training, recompute, channels_last):
    args = forward_args(bn_size, training, recompute, channels_last, dropout=training)
    torch.library.opcheck(torch.ops.dense_ops.dense_block_forward.default, args)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_backward(training, channels_last):
    # channels_last: the weight gradients come back in the weights' own layout, as the fake says
    # (cuDNN and oneDNN return them in the input's)
    x, params, mask, bottleneck, _, keep, eps = forward_args(2, training, "bn_relu", channels_last)
    with torch.no_grad():
        out = torch.ops.dense_ops.dense_block_forward(x, params, mask, bottleneck, training, keep, eps)
    features, mean, var, saved, mean2, var2 = out
    args = (torch.randn_like(features), features, mean, var, saved, mean2, var2, [p.detach() for p in params], mask,
            bottleneck, training, eps, [1, 0], True)
    torch.library.opcheck(torch.ops.dense_ops.dense_block_backward.default, args)


def test_opcheck_update_running_stats():
    running_mean = [torch.randn(3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    running_var = [torch.rand(3, dtype=torch.float64) + 0.5, torch.rand(5, dtype=torch.float64) + 0.5]
    batch_mean = [torch.randn(3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)]
    batch_var = [torch.rand(3, dtype=torch.float64), torch.rand(5, dtype=torch.float64)]
    torch.library.opcheck(torch.ops.dense_ops.update_running_stats.default,
                          (running_mean, running_var, batch_mean, batch_var, [0.1, 0.2], 10))


def test_update_running_stats_matches_batch_norm():
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(3, momentum=0.3).double()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    bn(x)
    batch_mean, batch_var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    dense_ops.ops.update_running_stats([mean], [var], [batch_mean], [batch_var], [0.3], 16)
    torch.testing.assert_close(mean, bn.running_mean)
    torch.testing.assert_close(var, bn.running_var)


def test_update_running_stats_mixed_momenta_and_dtypes():
    """BNs are grouped by momentum for the multi-tensor update: each keeps its own momentum, and
    float16 running statistics take float32 batch statistics (as in a model.half() network)."""
    x = [torch.randn(8, channels, 3, 3) for channels in (3, 5, 4)]
    bns = [torch.nn.BatchNorm2d(xi.size(1), momentum=m) for xi, m in zip(x, (0.1, 0.3, 0.1))]
    for bn in bns:
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    means = [bn.running_mean.clone() for bn in bns]
    variances = [bn.running_var.clone() for bn in bns]
    means[2], variances[2] = means[2].half(), variances[2].half()
    for bn, xi in zip(bns, x):
        bn(xi)
    dense_ops.ops.update_running_stats(means, variances, [xi.mean((0, 2, 3)) for xi in x],
                                       [xi.var((0, 2, 3), unbiased=False) for xi in x], [0.1, 0.3, 0.1], 72)
    for bn, mean, var in zip(bns, means, variances):
        tolerance = {"rtol": 1e-3, "atol": 1e-3} if mean.dtype == torch.float16 else {}
        torch.testing.assert_close(mean.float(), bn.running_mean, **tolerance)
        torch.testing.assert_close(var.float(), bn.running_var, **tolerance)
    assert means[2].dtype == variances[2].dtype == torch.float16


# ---- bad input: a clear error naming the argument -------------------------------------------

def test_wrong_channel_count():
    _, block = block_pair()
    with pytest.raises(ValueError, match="input must have 6 channels"):
        block(torch.randn(2, 5, 4, 4, dtype=torch.float64))


def test_wrong_rank():
    _, block = block_pair()
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(2, 6, 4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_unsupported_dtype(dtype):
    _, block = block_pair()
    with pytest.raises(ValueError, match="input must be float32"):
        block(torch.zeros(2, 6, 4, 4, dtype=dtype))


def test_mixed_dtypes_between_input_and_weights():
    _, block = block_pair(dtype=torch.float64)
    with pytest.raises(RuntimeError, match="conv1.weight has dtype Double but the input has dtype Float"):
        block(torch.randn(2, 6, 4, 4))


def test_unknown_recompute():
    with pytest.raises(ValueError, match="recompute must be one of"):
        dense_ops.DenseBlock(2, 4, 2, 2, recompute="everything")


@pytest.mark.parametrize("args,name", [((-1, 4, 2, 2), "num_layers"), ((0, 4, 2, 2), "num_layers"),
                                       ((2, -4, 2, 2), "num_input_features"), ((2, 4, 2, 0), "growth_rate"),
                                       ((2, 4, -2, 2), "bn_size")])
def test_non_positive_sizes(args, name):
    with pytest.raises(ValueError, match=name):
        dense_ops.DenseBlock(*args)


def test_drop_rate_out_of_range():
    with pytest.raises(ValueError, match="drop_rate"):
        dense_ops.DenseBlock(2, 6, 2, 4, drop_rate=1.5)
    _, block = block_pair()
    params = [t for layer in block.values() for t in dense_ops.nn.dense._layer_params(layer)]
    with pytest.raises(ValueError, match="drop_rate"):
        dense_ops.functional.dense_block(torch.randn(2, 6, 4, 4, dtype=torch.float64), params, bottleneck=True,
                                         training=True, momentum=[0.1] * 4, drop_rate=-0.1)


def test_parameter_on_another_device():
    _, block = block_pair()
    block.denselayer2.norm2.weight = torch.nn.Parameter(torch.ones(8, dtype=torch.float64, device="meta"))
    # The meta parameter routes the call to the fake kernel, which refuses it.
    with pytest.raises(RuntimeError, match=r"layer_params\[15\] is on meta, but the input is on cpu"):
        block(torch.randn(2, 6, 4, 4, dtype=torch.float64))


def test_meta_tensors_give_shapes_like_torchvision():
    with torch.device("meta"):
        block = dense_ops.DenseBlock(3, 6, 2, 4)
        out = block(torch.empty(2, 6, 5, 5))
    assert out.device.type == "meta" and out.shape == (2, 6 + 3 * 4, 5, 5)


def test_op_checks_in_cpp():
    x, params, mask, bottleneck, training, keep, eps = forward_args(2, True, "bn_relu")
    bad = list(params)
    bad[0] = bad[0][:-1]  # norm1.weight of layer 0 one element short
    with pytest.raises(RuntimeError, match="layer 0 norm1.weight must be a 1-D tensor of 3 elements"):
        torch.ops.dense_ops.dense_block_forward(x, bad, mask, bottleneck, training, keep, eps)
    with pytest.raises(RuntimeError, match="layer_params must hold 10 tensors per layer"):
        torch.ops.dense_ops.dense_block_forward(x, params[:7], mask, bottleneck, training, keep, eps)
    with pytest.raises(RuntimeError, match="dropout_mask must have shape"):
        torch.ops.dense_ops.dense_block_forward(x, params, torch.ones(2, 3, 4, 4, dtype=torch.float64), bottleneck,
                                                training, keep, eps)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        torch.ops.dense_ops.dense_block_forward(x, params, mask, bottleneck, training, keep, 0.0)
    with pytest.raises(RuntimeError, match="recompute must be 'bn_relu' or 'bottleneck', got 'all'"):
        torch.ops.dense_ops.dense_block_forward(x, params, mask, bottleneck, training, "all", eps)
    with pytest.raises(RuntimeError, match="count must be > 1"):
        torch.ops.dense_ops.update_running_stats([torch.zeros(2)], [torch.ones(2)], [torch.zeros(2)], [torch.ones(2)],
                                                 [0.1], 1)


# ---- dense_block_backward: the saved tensors must be what the forward returned ---------------

def backward_args(training=True):
    """Keyword arguments of a valid dense_block_backward call (bottleneck, float64, 2 layers)."""
    x, params, mask, bottleneck, _, keep, eps = forward_args(2, training, "bn_relu", dropout=training)
    with torch.no_grad():
        out = torch.ops.dense_ops.dense_block_forward(x, params, mask, bottleneck, training, keep, eps)
    features, mean, var, saved, mean2, var2 = out
    return dict(grad_features=torch.randn_like(features), features=features, batch_mean=mean, batch_var=var,
                saved_bottleneck=saved, bottleneck_mean=mean2, bottleneck_var=var2,
                layer_params=[p.detach() for p in params], dropout_mask=mask, bottleneck=bottleneck,
                training=training, eps=eps, layer_needs_grad=[1, 1], input_needs_grad=True)


# (argument, bad value from the valid arguments, expected message)
BAD_BACKWARD_ARGS = [
    ("grad_features", lambda a: a["grad_features"].float(), "grad_features must have dtype Double, got Float"),
    ("grad_features", lambda a: a["grad_features"][:, :5], "grad_features must have shape"),
    ("batch_mean", lambda a: a["batch_mean"][:-1], r"batch_mean must have shape \[7\], got \[6\]"),
    ("batch_var", lambda a: a["batch_var"].float(), "batch_var must have dtype Double"),
    ("bottleneck_mean", lambda a: a["bottleneck_mean"][:, :1], r"bottleneck_mean must have shape \[2, 4\]"),
    ("bottleneck_var", lambda a: a["bottleneck_var"].float(), "bottleneck_var must have dtype Double"),
    ("saved_bottleneck", lambda a: [torch.randn(2, 5, 4, 4, dtype=torch.float64)] * 2,
     r"saved_bottleneck\[0\] must have shape \[2, 4, 4, 4\], got \[2, 5, 4, 4\]"),
    ("saved_bottleneck", lambda a: [a["saved_bottleneck"][0], a["saved_bottleneck"][1].float()],
     r"saved_bottleneck\[1\] must have dtype Double"),
    ("saved_bottleneck", lambda a: a["saved_bottleneck"][:1], "saved_bottleneck must be empty or"),
    ("eps", lambda a: 0.0, "eps must be positive"),
]


@pytest.mark.parametrize("name,bad,match", BAD_BACKWARD_ARGS, ids=[f"{n}-{i}" for i, (n, _, _) in
                                                                    enumerate(BAD_BACKWARD_ARGS)])
def test_backward_checks_saved_arguments(name, bad, match):
    args = backward_args()
    args[name] = bad(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.dense_ops.dense_block_backward(**args)


@pytest.mark.parametrize("name", ["grad_features", "batch_mean", "batch_var", "bottleneck_mean", "bottleneck_var",
                                  "saved_bottleneck"])
def test_backward_checks_devices(name):
    # No second real device here: a meta tensor, sent to the CPU kernel directly (the dispatcher
    # alone would pick the meta kernel), stands in for a tensor on another device.
    args = backward_args()
    value = args[name]
    args[name] = [t.to("meta") for t in value] if isinstance(value, list) else value.to("meta")
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with pytest.raises(RuntimeError, match=f"{name}.* must be on cpu .*, got meta"):
        torch.ops.dense_ops.dense_block_backward.default.redispatch(cpu, **args)
    on_meta = rf"dense_block_backward: {name}(\[0\])? is on meta, but the input is on cpu"
    with pytest.raises(RuntimeError, match=on_meta):
        torch.ops.dense_ops.dense_block_backward(**args)  # dispatched to the fake kernel, which refuses it


@pytest.mark.parametrize("index,name", [(0, "layer 0 norm1.weight"), (3, "layer 0 norm1.running_var"),
                                        (4, "layer 0 conv1.weight"), (17, "layer 1 norm2.running_mean"),
                                        (19, "layer 1 conv2.weight")])
def test_forward_checks_devices(index, name):
    # As above: a meta tensor sent to the CPU kernel stands in for a tensor on another device.
    x, params, mask, bottleneck, training, keep, eps = forward_args(2, True, "bn_relu", dropout=True)
    params = [p.detach() for p in params]
    cpu = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    forward = torch.ops.dense_ops.dense_block_forward.default
    with pytest.raises(RuntimeError, match="dropout_mask must match the input's dtype and device"):
        forward.redispatch(cpu, x.detach(), params, mask.to("meta"), bottleneck, training, keep, eps)
    params[index] = params[index].to("meta")
    with pytest.raises(RuntimeError, match=f"{name} is on meta but the input is on cpu"):
        forward.redispatch(cpu, x.detach(), params, mask, bottleneck, training, keep, eps)


def test_backward_eval_mode_ignores_statistics_shapes():
    # Eval mode reads the running statistics; the batch statistics are not read.
    args = backward_args(training=False)
    expected = torch.ops.dense_ops.dense_block_backward(**args)
    args.update(batch_mean=args["batch_mean"].new_zeros(3), bottleneck_mean=args["bottleneck_mean"].new_empty(0))
    torch.testing.assert_close(torch.ops.dense_ops.dense_block_backward(**args), expected)


def test_backward_accepts_saved_bottleneck_in_another_layout():
    args = backward_args()
    expected = torch.ops.dense_ops.dense_block_backward(**args)
    args["saved_bottleneck"] = [t.contiguous(memory_format=torch.channels_last) for t in args["saved_bottleneck"]]
    torch.testing.assert_close(torch.ops.dense_ops.dense_block_backward(**args), expected)


def test_backward_oversized_saved_bottleneck_does_not_crash():
    # Unchecked, a saved bottleneck wider than the block's made the kernels write past the end
    # of their buffers (heap corruption, abort): run it in a child process to survive that.
    script = (
        "import torch, test_ops\n"
        "args = test_ops.backward_args()\n"
        "args['saved_bottleneck'] = [torch.randn(2, 400, 64, 64, dtype=torch.float64)] * 2\n"
        "try:\n"
        "    torch.ops.dense_ops.dense_block_backward(**args)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    package_root = os.path.dirname(os.path.dirname(dense_ops.__file__))  # the same build as this process
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests_dir, package_root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "saved_bottleneck[0] must have shape [2, 4, 4, 4]" in done.stdout


def test_double_backward_is_refused():
    _, block = block_pair()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(block(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_stats_dtype_is_the_ops(dtype):
    """ops.stats_dtype, which the fake kernels use, is the dtype of the statistics the real op returns."""
    x, params, mask, bottleneck, training, recompute, eps = forward_args(2, True, "bn_relu")
    x, params = x.detach().to(dtype), [p.detach().to(dtype) for p in params]
    with torch.no_grad():
        _, batch_mean, batch_var, _, bottleneck_mean, bottleneck_var = torch.ops.dense_ops.dense_block_forward(
            x, params, mask, bottleneck, training, recompute, eps)
    stats = dense_ops.ops.stats_dtype(dtype)
    assert batch_mean.numel() and bottleneck_mean.numel()  # training: statistics were computed
    assert batch_mean.dtype == batch_var.dtype == bottleneck_mean.dtype == bottleneck_var.dtype == stats
