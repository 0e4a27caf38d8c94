"""The condensed conv under torch.autocast (CPU bfloat16; CUDA float16 by the same registration): it runs
in the autocast dtype with float32 BN scale/shift and float32 accumulation, as a convolution does."""
import pytest
import torch
import torch.nn.functional as F

import dense_ops
from dense_ops import models, ops, reference
from helpers import randomize_batch_norms

# (device, the autocast dtype it is tested with, that dtype's unit roundoff)
AUTOCAST = [("cpu", torch.bfloat16, 2.0 ** -8),
            pytest.param("cuda", torch.float16, 2.0 ** -11, marks=pytest.mark.needs_cuda)]


def op_inputs(device, in_channels=24, out_channels=16, groups=4, kept=6):
    """Float32 operands of the condensed conv: input, index, folded BN scale/shift, weight, groups."""
    torch.manual_seed(0)
    x = torch.randn(3, in_channels, 5, 7, device=device)
    index = torch.randint(0, in_channels, (groups * kept,), device=device)
    scale, shift = torch.rand(groups * kept, device=device) + 0.5, torch.randn(groups * kept, device=device)
    weight = torch.randn(out_channels, kept, 1, 1, device=device) / kept ** 0.5
    return x, index, scale, shift, weight, groups


def error_bound(x, index, scale, shift, weight, groups, unit_roundoff):
    """(bound, exact): the float64 result in plain torch ops, and a per-element bound on
    |low precision - exact|. The input, the BN output and the weight are each rounded once (relative
    error u each) before the K-term product sum, accumulated in float32 (error ~K * 2^-24, negligible),
    and the result is rounded once more. So |error| <= 3u * sum_k |w_k| (|x_k * s_k| + |t_k|) + u |y|,
    doubled for margin."""
    x, scale, shift, weight = (t.double() for t in (x, scale, shift, weight))
    magnitude = (torch.index_select(x, 1, index) * scale.view(1, -1, 1, 1)).abs() + shift.abs().view(1, -1, 1, 1)
    products = reference.channel_shuffle(F.conv2d(magnitude, weight.abs(), groups=groups), groups)
    normalized = F.relu(torch.index_select(x, 1, index) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    exact = reference.channel_shuffle(F.conv2d(normalized, weight, groups=groups), groups)
    return 2 * (3 * unit_roundoff * products + unit_roundoff * exact.abs()), exact


@pytest.mark.parametrize("device, dtype, unit_roundoff", AUTOCAST)
def test_op_runs_in_the_autocast_dtype_within_its_rounding_error(device, dtype, unit_roundoff):
    args = op_inputs(device)
    with torch.autocast(device, dtype=dtype):
        low = ops.condensed_conv(*args)
    assert low.dtype == dtype
    bound, exact = error_bound(*args, unit_roundoff)
    error = (low.double() - exact).abs()
    assert (error <= bound).all(), (error - bound).max()
    # Not a float32 computation in disguise: the result differs from float32's by rounding.
    assert not torch.equal(low.float(), ops.condensed_conv(*args))


@pytest.mark.parametrize("device, dtype, unit_roundoff", AUTOCAST)
def test_fused_next_bn_relu_under_autocast(device, dtype, unit_roundoff):
    x, index, scale, shift, weight, groups = op_inputs(device)
    out_scale, out_shift = torch.rand(16, device=device) + 0.5, torch.randn(16, device=device) * 0.1
    with torch.autocast(device, dtype=dtype):
        low = ops.condensed_conv(x, index, scale, shift, weight, groups, out_scale, out_shift)
    assert low.dtype == dtype
    bound, exact = error_bound(x, index, scale, shift, weight, groups, unit_roundoff)
    expected = F.relu(exact * out_scale.double().view(1, -1, 1, 1) + out_shift.double().view(1, -1, 1, 1))
    bound = bound * out_scale.double().view(1, -1, 1, 1) + unit_roundoff * expected.abs()
    assert ((low.double() - expected).abs() <= bound).all()


def test_float64_is_left_alone_under_autocast():
    args = [t.double() if t.is_floating_point() else t for t in op_inputs("cpu")[:5]] + [4]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.condensed_conv(*args)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ops.condensed_conv(*args), atol=0, rtol=0)


def condensed_condensenet():
    torch.manual_seed(0)
    model = randomize_batch_norms(models.condensenet_cifar(depth=20, growth_rates=(4, 8, 8), num_classes=10))
    dense_ops.update_condensation(model, 1.0)
    return dense_ops.condense(model.eval())


def _relative_error(value, truth):
    return ((value.double() - truth).abs().max() / truth.abs().max()).item()


def test_condensed_condensenet_under_cpu_autocast():
    """The whole condensed model runs under autocast, its dense features in bfloat16, and is as close
    to the float32 model as the same model built from plain torch ops (index_select, BN, conv,
    torch.cat) under the same autocast: low precision costs what it costs plain PyTorch, no more."""
    model = condensed_condensenet()
    plain = reference.unfused_condensenet(model)
    x = torch.randn(4, 3, 32, 32)
    feature_dtypes = []
    model.features.denseblock_1.register_forward_hook(lambda module, args, out: feature_dtypes.append(out.dtype))
    with torch.no_grad():
        truth = model.double()(x.double())
        model.float()
        full = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, theirs = model(x), plain(x)
    assert feature_dtypes[-1] == torch.bfloat16 and ours.dtype == torch.bfloat16
    assert _relative_error(full, truth) < 1e-5
    # bf16 rounding (2^-8) compounded over the depth: both are a few percent off, ours no worse.
    assert _relative_error(ours, truth) <= max(2 * _relative_error(theirs, truth), 2.0 ** -8)
    assert _relative_error(ours, truth) < 0.1
