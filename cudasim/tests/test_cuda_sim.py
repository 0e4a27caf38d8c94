"""The CUDA kernels of csrc/cuda/, executed on the CPU by cudasim, against the CPU kernels of
csrc/cpu/ and against plain torch references."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from build import load  # noqa: E402

ext = load()
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}
# M = N*H*W = 70 (< 256 threads), 1088, 1, 27; 37 channels: a partial channels-last tile of 32
SHAPES = [(2, 3, 5, 7), (4, 5, 16, 17), (1, 2, 1, 1), (3, 4, 1, 9), (2, 37, 3, 5)]
ORDERS = ["forward", "reverse", "random:7"]


@pytest.fixture(params=ORDERS)
def order(request, monkeypatch):
    monkeypatch.setenv("CUDASIM_ORDER", request.param)
    return request.param


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_x(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a channel slice of a wider tensor (concatenated features)
        wide = torch.zeros(shape[0], shape[1] + 3, *shape[2:], dtype=dtype)
        wide[:, 1:1 + shape[1]] = x
        x = wide[:, 1:1 + shape[1]]
    return x


def bn_params(c, a, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g, dtype=a) + 0.5, torch.randn(c, generator=g, dtype=a),
            torch.randn(c, generator=g, dtype=a) * 0.3, torch.rand(c, generator=g, dtype=a) + 0.2)


def cl(layout):
    return layout == "channels_last"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_channel_moments(order, dtype, shape, layout):
    x = make_x(shape, dtype, layout)
    a = acc(dtype)
    results = []
    for sim in (True, False):
        mean, var = torch.full((shape[1],), float("nan"), dtype=a), torch.full((shape[1],), float("nan"), dtype=a)
        ext.channel_moments(sim, x, mean, var, cl(layout))
        results.append((mean, var))
    (ms, vs), (mc, vc) = results
    xr = x.to(torch.float64)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(ms, mc, rtol=rtol, atol=atol)
    torch.testing.assert_close(vs, vc, rtol=rtol, atol=atol)
    torch.testing.assert_close(ms.double(), xr.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vs.double(), xr.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sms", ["1", "64"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_moments_grid_sizes(monkeypatch, sms, layout):
    # 1 SM: one pixel chunk per channel tile, so every thread's loop walks many pixels; 64 SMs:
    # many chunks merged by the second stage; 37 channels: a partial channels-last tile
    monkeypatch.setenv("CUDASIM_SM_COUNT", sms)
    x = make_x((3, 37, 19, 23), torch.float32, layout)
    mean, var = torch.empty(37), torch.empty(37)
    ext.channel_moments(True, x, mean, var, cl(layout))
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_bn_relu_forward(dtype, shape, layout):
    x = make_x(shape, dtype, layout)
    w, b, m, v = bn_params(shape[1], acc(dtype))
    outs = []
    for sim in (True, False):
        out = torch.full_like(x, float("nan"))
        ext.bn_relu_forward(sim, x, w, b, m, v, 1e-5, out, cl(layout))
        outs.append(out)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(outs[0], outs[1], rtol=rtol, atol=atol)
    ref = F.relu(F.batch_norm(x.double(), m.double(), v.double(), w.double(), b.double(), False, 0.0, 1e-5))
    torch.testing.assert_close(outs[0].double(), ref, rtol=rtol * 4, atol=atol * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_bn_relu_backward(order, dtype, shape, layout, accumulate):
    x = make_x(shape, dtype, layout)
    gy = make_x(shape, dtype, layout, seed=5)
    a = acc(dtype)
    w, b, m, v = bn_params(shape[1], a)
    results = []
    for sim in (True, False):
        accbuf = make_x(shape, a, layout, seed=9)  # what accumulate adds to
        s_dyx = torch.full((shape[1],), 0.25, dtype=torch.float64)
        s_dy = torch.full((shape[1],), -0.5, dtype=torch.float64)
        ext.bn_relu_backward(sim, x, gy, w, b, m, v, 1e-5, accbuf, accumulate, s_dyx, s_dy, cl(layout))
        results.append((accbuf, s_dyx, s_dy))
    rtol, atol = TOL[dtype]
    for s, c in zip(results[0], results[1]):
        torch.testing.assert_close(s, c, rtol=rtol, atol=atol * 10)
    # plain reference
    xd, gyd = x.double(), gy.double()
    view = lambda t: t.double().view(1, -1, 1, 1)  # noqa: E731
    scale = view(w) / torch.sqrt(view(v) + 1e-5)
    y = xd * scale + (view(b) - view(m) * scale)
    dy = torch.where(y > 0, gyd, torch.zeros_like(gyd))
    xhat = (xd - view(m)) / torch.sqrt(view(v) + 1e-5)
    base = make_x(shape, a, layout, seed=9).double() if accumulate else 0
    torch.testing.assert_close(results[0][0].double(), base + scale * dy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][1], 0.25 + (dy * xhat).sum((0, 2, 3)), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(results[0][2], -0.5 + dy.sum((0, 2, 3)), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("has_direct", [False, True])
@pytest.mark.parametrize("has_proj", [False, True])
def test_bn_input_grad(dtype, layout, has_direct, has_proj):
    shape = (4, 5, 16, 17)
    x = make_x(shape, dtype, layout)
    a = acc(dtype)
    _, _, m, v = bn_params(shape[1], a)
    accbuf = make_x(shape, a, layout, seed=3)
    direct = make_x(shape, dtype, layout, seed=4) if has_direct else None
    pm = torch.randn(shape[1], dtype=a) if has_proj else None
    px = torch.randn(shape[1], dtype=a) if has_proj else None
    outs = []
    for sim in (True, False):
        out = torch.full_like(x, float("nan"))
        ext.bn_input_grad(sim, x, m, v, 1e-5, accbuf, direct, pm, px, out, cl(layout))
        outs.append(out)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(outs[0], outs[1], rtol=rtol, atol=atol)


def pool_reference(x, w, b, m, v, training, grad_pooled):
    """avg_pool2d(relu(batch_norm(x)), 2) and its input and affine gradients, in float64 autograd."""
    xd = x.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    pooled = F.avg_pool2d(F.relu(F.batch_norm(xd, m.double(), v.double(), wd, bd, training, 0.0, 1e-5)), 2)
    pooled.backward(grad_pooled.double())
    return pooled.detach(), xd.grad, wd.grad, bd.grad


# 8x8: whole windows; 5x7: a cropped row and column; 37 channels: a partial channels-last tile
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (2, 37, 5, 7)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("sms", ["1", "4"])
def test_bn_relu_pool(order, monkeypatch, dtype, shape, layout, training, sms):
    monkeypatch.setenv("CUDASIM_SM_COUNT", sms)
    x = make_x(shape, dtype, layout)
    w, b, m, v = bn_params(shape[1], acc(dtype))
    grad_pooled = make_x((*shape[:2], shape[2] // 2, shape[3] // 2), dtype, layout, seed=5)
    results = []
    for sim in (True, False):
        pooled, mean, var = ext.bn_relu_pool(sim, x, w, b, m, v, training, 1e-5)
        grads = ext.bn_relu_pool_backward(sim, grad_pooled, x, w, b, mean, var, training, 1e-5, True)
        results.append((pooled, mean, var, *grads))
    rtol, atol = TOL[dtype]
    for s, c in zip(*results):
        torch.testing.assert_close(s, c, rtol=rtol, atol=atol * 10)
    pooled, mean, var, grad_x, grad_w, grad_b = results[0]
    if training:
        xr = x.double()
        torch.testing.assert_close(mean.double(), xr.mean((0, 2, 3)), rtol=rtol, atol=atol)
        torch.testing.assert_close(var.double(), xr.var((0, 2, 3), unbiased=False), rtol=rtol, atol=atol)
    ref = pool_reference(x, w, b, m, v, training, grad_pooled)
    for got, want in zip((pooled, grad_x, grad_w, grad_b), ref):
        torch.testing.assert_close(got.double(), want, rtol=rtol * 8, atol=atol * 8 * max(1, shape[0] * shape[2]))


def condense_reference(x, index, scale, shift, weight, groups, out_scale=None, out_shift=None):
    xd = x.double()
    a = F.relu(xd[:, index] * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    o, k = weight.shape[0], weight.shape[1]
    r = F.conv2d(a, weight.double().view(o, k, 1, 1), groups=groups)
    n, _, h, w = r.shape
    out = r.view(n, groups, o // groups, h, w).transpose(1, 2).reshape(n, o, h, w)
    if out_scale is not None:
        out = F.relu(out * out_scale.double().view(1, -1, 1, 1) + out_shift.double().view(1, -1, 1, 1))
    return out


def condense_case(dtype, layout, groups=4, kept=3, per_group=5, c_in=10, shape=(2, 6, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    n, h, w = shape
    x = make_x((n, c_in, h, w), dtype, layout, seed=seed)
    index = torch.randint(0, c_in, (groups * kept,), generator=g)
    a = acc(dtype)
    scale = torch.rand(groups * kept, generator=g, dtype=a) + 0.5
    shift = torch.randn(groups * kept, generator=g, dtype=a) * 0.2
    weight = (torch.randn(groups * per_group, kept, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    return x, index, scale, shift, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("epilogue", [False, True])
@pytest.mark.parametrize("sms", ["1", "4"])  # 1 SM: 32 blocks, so the grid-stride loops iterate
def test_condensed_conv(order, monkeypatch, dtype, layout, epilogue, sms):
    monkeypatch.setenv("CUDASIM_SM_COUNT", sms)
    x, index, scale, shift, weight = condense_case(dtype, layout, shape=(3, 19, 23))
    os_ = osh = None
    if epilogue:
        os_, osh = torch.rand(20, dtype=acc(dtype)) + 0.5, torch.randn(20, dtype=acc(dtype))
    sim = ext.condensed_conv(True, x, index, scale, shift, weight, 4, os_, osh)
    cpu = ext.condensed_conv(False, x, index, scale, shift, weight, 4, os_, osh)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(sim, cpu, rtol=rtol, atol=atol)
    ref = condense_reference(x, index, scale, shift, weight, 4, os_, osh)
    torch.testing.assert_close(sim.double(), ref, rtol=rtol * 8, atol=atol * 8)


def test_condensed_conv_device_assert():
    # The modules validate indices on the host (dense_ops.CondensedConv); a direct op call with a
    # bad one still stops on the device instead of reading out of bounds.
    x, index, scale, shift, weight = condense_case(torch.float32, "contiguous")
    index[5] = 10
    with pytest.raises(RuntimeError, match="device-side assert triggered.*condensed_conv.cu"):
        ext.condensed_conv(True, x, index, scale, shift, weight, 4, None, None)


def test_stats_show_real_barriers():
    ext.reset_stats()
    x = make_x((2, 3, 5, 7), torch.float32, "contiguous")
    ext.channel_moments(True, x, torch.empty(3), torch.empty(3), False)
    s = ext.stats()
    # Per-chunk partials: 3 channels x 1 pixel chunk (70 pixels < 256 threads), each block
    # reducing over its 256 pixel lanes with 1 + log2(256) barriers; then one block merging chunks.
    assert s["launches"] == 2 and s["blocks"] == 3 + 1 and s["threads"] == 4 * 256
    assert s["barriers"] == 3 * (1 + 8)
