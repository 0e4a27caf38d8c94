"""torch.library.opcheck on every dense_ops op, and clear errors for bad input."""
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


def forward_args(bn_size, training, keep, channels_last=False, dropout=False):
    _, block = block_pair(num_layers=2, in_channels=3, bn_size=bn_size, growth=2)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask = torch.bernoulli(torch.full((2, 4, 4, 4), 0.7, dtype=torch.float64)) / 0.7 if dropout else None
    return (x.requires_grad_(), flat_params(block), mask, bool(bn_size), training, keep, 1e-5)


@pytest.mark.parametrize("bn_size", [2, None], ids=["bottleneck", "basic"])
@pytest.mark.parametrize("training,keep", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_forward(bn_size, training, keep, channels_last):
    args = forward_args(bn_size, training, keep, channels_last, dropout=training)
    torch.library.opcheck(torch.ops.dense_ops.dense_block_forward.default, args)


@pytest.mark.parametrize("training", [True, False])
def test_opcheck_backward(training):
    x, params, mask, bottleneck, _, keep, eps = forward_args(2, training, True)
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
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 1 norm2.weight\) is on meta, but the input is on cpu"):
        block(x)
    params = [t for layer in block.values() for t in _layer_params(layer)]
    with pytest.raises(RuntimeError, match="layer_params is on meta, but the input is on cpu"):  # the op itself
        torch.ops.dense_ops.dense_block_forward(x, params, None, True, True, False, 1e-5)


def test_meta_tensors_give_shapes_like_torchvision():
    with torch.device("meta"):
        block = dense_ops.DenseBlock(3, 6, 2, 4)
        out = block(torch.empty(2, 6, 5, 5))
    assert out.device.type == "meta" and out.shape == (2, 6 + 3 * 4, 5, 5)


def test_op_checks_in_cpp():
    x, params, mask, bottleneck, training, keep, eps = forward_args(2, True, True)
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
    with pytest.raises(RuntimeError, match="count must be > 1"):
        torch.ops.dense_ops.update_running_stats([torch.zeros(2)], [torch.ones(2)], [torch.zeros(2)], [torch.ones(2)],
                                                 [0.1], 1)


def test_double_backward_is_refused():
    _, block = block_pair()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(block(x).sum(), x, create_graph=True)
