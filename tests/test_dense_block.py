"""DenseBlock against torchvision's naive block and dense_ops.reference: exact semantics."""
import copy
import os

import pytest
import torch

import dense_ops
from conftest import DEVICES
from helpers import assert_close_dicts, block_pair, naive_block, run_step

F64 = dict(atol=1e-9, rtol=0.0)
F32 = dict(atol=1e-4, rtol=1e-4)


def out_channels(block, in_channels):
    last = list(block.values())[-1]
    growth = (last.conv2 if last.bottleneck else last.conv1).out_channels
    return in_channels + len(block) * growth


def compare(naive, ours, x, tol):
    """One training (or eval) step of both; everything observable must agree."""
    grad = torch.randn(x.shape[0], out_channels(ours, x.shape[1]), *x.shape[2:], dtype=x.dtype, device=x.device)
    ref = run_step(naive, x, grad)
    got = run_step(ours, x, grad)
    torch.testing.assert_close(got[0], ref[0], **tol)
    torch.testing.assert_close(got[1], ref[1], **tol)
    assert_close_dicts(got[2], ref[2], **tol)
    assert_close_dicts(got[3], ref[3], **tol)
    return got


@pytest.mark.parametrize("bn_size", [2, None], ids=["bottleneck", "basic"])
@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_naive_float64(bn_size, recompute, training, channels_last, device):
    naive, ours = block_pair(num_layers=4, in_channels=5, bn_size=bn_size, growth=3, recompute=recompute,
                             device=device)
    naive.train(training), ours.train(training)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = compare(naive, ours, x, F64)[0]
    assert out.shape == (3, 5 + 4 * 3, 6, 7)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_naive_float32_over_several_steps(recompute, device):
    naive, ours = block_pair(num_layers=5, in_channels=8, bn_size=4, growth=4, dtype=torch.float32,
                             recompute=recompute, device=device)
    for _ in range(3):  # running statistics and num_batches_tracked: updated exactly once per step
        compare(naive, ours, torch.randn(4, 8, 5, 5, device=device), F32)


def test_momentum_none_is_a_cumulative_average():
    naive, ours = block_pair()
    for block in (naive, ours):
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None
    for _ in range(2):
        compare(naive, ours, torch.randn(2, 6, 4, 4, dtype=torch.float64), F64)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    naive, ours = block_pair(device=device)
    base = torch.randn(2, 12, 5, 9, dtype=torch.float64, device=device)
    leaf = base.clone().requires_grad_()
    x = leaf[:, ::2, :, 1::2]  # strided over channels and width, read in place by the block
    assert not x.is_contiguous()
    grad = torch.randn(2, out_channels(ours, 6), 5, 4, dtype=torch.float64, device=device)
    out = ours(x)
    out.backward(grad)
    reference_leaf = base.clone().requires_grad_()
    expected = naive(reference_leaf[:, ::2, :, 1::2].contiguous())
    expected.backward(grad)
    torch.testing.assert_close(out, expected, **F64)
    torch.testing.assert_close(leaf.grad, reference_leaf.grad, **F64)
    assert_close_dicts({n: p.grad for n, p in ours.named_parameters()},
                       {n: p.grad for n, p in naive.named_parameters()}, **F64)


def _relative_error(tensor, reference):
    return ((tensor.double() - reference).norm() / reference.norm()).item()


def _low_precision_steps(dtype, device, training):
    """(ours, naive, exact) steps: both blocks in `dtype`, and the exact one in float64 with the same
    (rounded) parameters, input and output gradient, so only the arithmetic differs."""
    naive, ours = block_pair(dtype=torch.float32, device=device)
    naive, ours = naive.to(dtype).train(training), ours.to(dtype).train(training)
    exact_block = copy.deepcopy(naive).double()
    x = torch.randn(8, 6, 8, 8, device=device).to(dtype)
    grad = torch.randn(8, out_channels(ours, 6), 8, 8, device=device).to(dtype)
    exact = run_step(exact_block, x.double(), grad.double())
    return run_step(ours, x, grad), run_step(naive, x, grad), exact


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_as_accurate_as_naive(dtype, device):
    """Each gradient is within a small factor of naive's own error in the dtype, plus a couple of
    roundings (eps: 2^-10 half, 2^-7 bfloat16). In eval mode: in training, batch-norm backward over
    512 values per channel is ill-conditioned (a ReLU mask flipped by one rounding moves a sum by
    percents), so there the gradients are compared as a whole, below."""
    eps = torch.finfo(dtype).eps
    got, naive, exact = _low_precision_steps(dtype, device, training=False)
    assert got[0].dtype == dtype
    assert _relative_error(got[0], exact[0]) <= 2 * _relative_error(naive[0], exact[0]) + eps
    pairs = [("input", got[1], naive[1], exact[1])] + [(n, got[2][n], naive[2][n], exact[2][n]) for n in exact[2]]
    for name, mine, theirs, reference in pairs:
        assert _relative_error(mine, reference) <= 3 * _relative_error(theirs, reference) + 2 * eps, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_training_step_as_accurate_as_naive(dtype, device):
    """Output and running statistics within rounding; all gradients together (each scaled by its
    exact norm) within a small factor of naive's error plus the few ReLU-mask flips the dtype
    allows (16 eps)."""
    eps = torch.finfo(dtype).eps
    got, naive, exact = _low_precision_steps(dtype, device, training=True)
    assert _relative_error(got[0], exact[0]) <= 2 * _relative_error(naive[0], exact[0]) + eps
    for name, mine in got[3].items():  # running statistics (and the step counts)
        torch.testing.assert_close(mine.to(exact[3][name].dtype), exact[3][name], atol=4 * eps, rtol=4 * eps,
                                   msg=name)

    def all_gradients(step):
        return torch.cat([step[1].double().flatten()] + [step[2][n].double().flatten() / exact[2][n].norm()
                                                          for n in exact[2]])

    reference = all_gradients(exact)
    assert _relative_error(all_gradients(got), reference) <= 3 * _relative_error(all_gradients(naive), reference) \
        + 16 * eps


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_keeps_or_scales_each_value(device):
    # One layer: the new channels are either dropped or scaled by 1 / (1 - p).
    p = 0.4
    naive, ours = block_pair(num_layers=1, in_channels=4, growth=64, drop_rate=p, device=device)
    x = torch.randn(8, 4, 6, 6, dtype=torch.float64, device=device)
    with torch.no_grad():
        plain = naive_block(1, 4, 2, 64)
        plain.load_state_dict(naive.state_dict())
        expected = plain.to(device, torch.float64)(x)[:, 4:]
        got = ours(x)[:, 4:]
    dropped = got == 0
    torch.testing.assert_close(got[~dropped], expected[~dropped] / (1 - p), **F64)
    assert abs(dropped.double().mean().item() - p) < 0.02  # 18k draws: ~6 standard deviations
    ours.eval()
    torch.testing.assert_close(ours(x)[:, 4:], plain.eval()(x)[:, 4:], **F64)


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("bn_size", [2, None], ids=["bottleneck", "basic"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(recompute, bn_size, drop_rate, device):
    _, block = block_pair(num_layers=2, in_channels=3, bn_size=bn_size, growth=2, recompute=recompute,
                          drop_rate=drop_rate, device=device)
    layers = list(block.values())
    params = [t.detach().clone().requires_grad_(t.is_floating_point() and "running" not in name)
              for layer in layers for name, t in zip(dense_ops.ops.PARAM_NAMES, dense_ops.nn.dense._layer_params(layer))]
    x = torch.randn(3, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    momentum = [0.1] * (len(layers) * (2 if bn_size else 1))

    def block_fn(x, *params):
        torch.manual_seed(1)  # the same dropout mask at every evaluation
        return dense_ops.functional.dense_block(x, params, bottleneck=bool(bn_size), training=True, momentum=momentum,
                                                drop_rate=drop_rate, recompute=recompute)

    assert torch.autograd.gradcheck(block_fn, (x, *params), eps=1e-6, atol=1e-5, fast_mode=True)


def test_eval_gradcheck():
    _, block = block_pair(num_layers=2, in_channels=3, growth=2)
    block.eval()
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-5)


def test_frozen_layers_get_no_gradients():
    naive, ours = block_pair(num_layers=3)
    for block in (naive, ours):
        block.denselayer1.requires_grad_(False)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    grad = torch.randn(2, 6 + 3 * 4, 4, 4, dtype=torch.float64)
    for block in (naive, ours):
        block(x).backward(grad)
    assert all(p.grad is None for p in ours.denselayer1.parameters())
    for (name, p), q in zip(ours.named_parameters(), naive.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, **F64, msg=name)


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_inference_keeps_nothing(recompute, monkeypatch):
    # In eval mode without gradients the block's op returns the features and nothing else:
    # no statistics, no saved bottleneck outputs.
    _, ours = block_pair(num_layers=3, recompute=recompute)
    ours.eval()
    results = []
    original = dense_ops.ops.dense_block_forward
    monkeypatch.setattr(dense_ops.ops, "dense_block_forward", lambda *args: results.append(original(*args)) or
                        results[-1])
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
    with torch.inference_mode():
        ours(x)
    assert len(results) == 2
    for _, mean, var, saved, bottleneck_mean, bottleneck_var in results:
        assert saved == []
        assert mean.numel() == var.numel() == bottleneck_mean.numel() == bottleneck_var.numel() == 0


def test_single_layer_module_matches_torchvision_layer():
    from torchvision.models.densenet import _DenseLayer
    tv = _DenseLayer(6, 4, 2, 0.0, memory_efficient=False).double()
    ours = dense_ops.DenseLayer(6, 4, 2).double()
    ours.load_state_dict(tv.state_dict(), strict=True)
    inputs = [torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.randn(2, 2, 5, 5, dtype=torch.float64)]
    torch.testing.assert_close(ours(inputs), tv(inputs), **F64)


def test_state_dict_round_trip_with_torchvision():
    naive, ours = block_pair()
    assert list(ours.state_dict()) == list(naive.state_dict())
    naive.load_state_dict(ours.state_dict(), strict=True)


def test_batch_of_one_pixel_raises_like_pytorch():
    _, ours = block_pair()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(torch.randn(1, 6, 1, 1, dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_matches_naive(device):
    naive, ours = block_pair(device=device)
    for training in (True, False):
        naive.train(training), ours.train(training)
        x = torch.randn(0, 6, 4, 4, dtype=torch.float64, device=device)
        torch.testing.assert_close(ours(x), naive(x))
    assert_close_dicts(dict(ours.named_buffers()), dict(naive.named_buffers()), atol=0)


def test_nan_propagates_like_naive():
    naive, ours = block_pair()
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    x[0, 1, 2, 2] = float("nan")
    torch.testing.assert_close(ours(x), naive(x), equal_nan=True)


def test_build_info():
    info = dense_ops.build_info()
    assert set(info) == {"torch_version", "cuda", "cuda_version", "cuda_archs", "parallel_backend", "parallel_kernels",
                         "cpu_kernel_isa"}
    assert info["torch_version"] == torch.__version__.split("+")[0]
    # "cuda" says whether the CUDA kernels were compiled in: exactly when the ops have CUDA kernels.
    for op in ("dense_block_forward", "dense_block_backward", "condensed_conv"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dense_ops::{op}", "CUDA") == info["cuda"], op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dense_ops::{op}", "CPU"), op
    if info["cuda"]:
        assert info["cuda_archs"]
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]  # the toolkit's major
    else:
        assert info["cuda_version"] is None and info["cuda_archs"] is None
    if os.environ.get("FORCE_CUDA") == "1":  # CI builds the CUDA sources wherever nvcc exists
        assert info["cuda"]


@pytest.mark.parametrize("drop_rate", [0.0, 0.5])
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_batch_norms_in_a_training_block_use_running_statistics(drop_rate, device):
    # Fine-tuning with model.train() and every BN put back in eval(): the BNs normalize with, and
    # keep, their running statistics, while dropout stays active, as torchvision's block does.
    naive, ours = block_pair(drop_rate=drop_rate, device=device)
    for block in (naive, ours):
        block.train()
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, device=device)
    if drop_rate == 0:
        compare(naive, ours, x, F64)
        return
    out = ours(x)[:, 6:]
    with torch.no_grad():
        expected = naive.eval()(x)[:, 6:]  # the same BNs without dropout
    dropped = out == 0
    assert 0.3 < dropped.double().mean().item() < 0.7
    # Every layer after the first also reads dropped channels, so only the first layer's
    # surviving outputs equal the undropped ones exactly (scaled).
    first = slice(0, 4)
    torch.testing.assert_close(out[:, first][~dropped[:, first]], expected[:, first][~dropped[:, first]] * 2, **F64)
    assert_close_dicts(dict(ours.named_buffers()), dict(naive.named_buffers()), atol=0)


def test_mixed_batch_norm_modes_run_module_by_module():
    naive, ours = block_pair(num_layers=3)
    for block in (naive, ours):
        block.denselayer2.norm1.eval()  # only this one BN frozen
    compare(naive, ours, torch.randn(3, 6, 4, 4, dtype=torch.float64), F64)


def test_hooks_fire_and_see_what_torchvision_shows_them():
    naive, ours = block_pair(num_layers=2)
    seen = {}
    for name, block in (("naive", naive), ("ours", ours)):
        seen[name] = []
        block.denselayer1.norm2.register_forward_hook(lambda m, i, o, log=seen[name]: log.append(o.detach().clone()))
        block.denselayer2.register_forward_hook(lambda m, i, o, log=seen[name]: log.append(o.detach().clone()))
    compare(naive, ours, torch.randn(2, 6, 4, 4, dtype=torch.float64), F64)
    assert len(seen["ours"]) == len(seen["naive"]) == 2
    for got, expected in zip(seen["ours"], seen["naive"]):
        torch.testing.assert_close(got, expected, **F64)
