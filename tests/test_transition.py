"""dense_ops.Transition (functional.transition) against torchvision's _Transition module by module."""
import pytest
import torch
from torch import nn
from torchvision.models.densenet import _Transition

import dense_ops
from conftest import DEVICES
from helpers import assert_close_dicts, randomize_batch_norms, run_step

F64 = dict(atol=1e-12, rtol=1e-12)


def transition_pair(in_channels=18, out_channels=7, dtype=torch.float64, device="cpu"):
    """(torchvision's, ours) with the same randomized weights and statistics."""
    theirs = randomize_batch_norms(_Transition(in_channels, out_channels)).to(device, dtype)
    ours = dense_ops.Transition(in_channels, out_channels).to(device, dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def assert_same_step(theirs, ours, x, grad, tolerance):
    expected, actual = run_step(theirs, x, grad), run_step(ours, x, grad)
    torch.testing.assert_close(actual[0], expected[0], **tolerance)
    torch.testing.assert_close(actual[1], expected[1], **tolerance)
    assert_close_dicts(actual[2], expected[2], **tolerance)
    assert_close_dicts(actual[3], expected[3], **tolerance)
    return actual


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_torchvision_float64(training, channels_last, device):
    theirs, ours = transition_pair(device=device)
    theirs.train(training), ours.train(training)
    x = torch.randn(3, 18, 9, 7, dtype=torch.float64, device=device)  # odd sizes: the pool drops a row
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 7, 4, 3, dtype=torch.float64, device=device)
    out = assert_same_step(theirs, ours, x, grad, F64)[0]
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_frozen_norm_and_cumulative_momentum():
    # A BN frozen with .eval() inside a training model, then momentum=None (a cumulative average).
    theirs, ours = transition_pair()
    theirs.norm.eval(), ours.norm.eval()
    x, grad = torch.randn(4, 18, 6, 6, dtype=torch.float64), torch.randn(4, 7, 3, 3, dtype=torch.float64)
    assert_same_step(theirs, ours, x, grad, F64)
    theirs.norm.train(), ours.norm.train()
    theirs.norm.momentum = ours.norm.momentum = None
    for _ in range(2):
        assert_same_step(theirs, ours, x, grad, F64)
    assert ours.norm.num_batches_tracked.item() == theirs.norm.num_batches_tracked.item() == 5


def test_gradcheck():
    _, ours = transition_pair(in_channels=5, out_channels=3)
    x = torch.randn(2, 5, 4, 5, dtype=torch.float64, requires_grad=True)
    norm = ours.norm
    for training in (True, False):
        def step(x, weight, bias, conv_weight):
            return dense_ops.functional.transition(x, weight, bias, norm.running_mean.clone(), norm.running_var.clone(),
                                                   conv_weight, training=training, momentum=0.0, eps=norm.eps)
        params = (norm.weight.detach().requires_grad_(), norm.bias.detach().requires_grad_(),
                  ours.conv.weight.detach().requires_grad_())
        assert torch.autograd.gradcheck(step, (x, *params))


def test_keeps_only_its_input():
    # torchvision's transition keeps its ReLU output (and BN input) for backward; ours keeps the
    # input, which the block before it keeps anyway, its parameters and the per-channel statistics.
    theirs, ours = transition_pair(in_channels=16, out_channels=8, dtype=torch.float32)
    x = torch.randn(4, 16, 8, 8, requires_grad=True)
    kept = {}
    for name, module in (("theirs", theirs), ("ours", ours)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            module(x)
        kept[name] = {t.data_ptr(): t.numel() for t in saved if t.data_ptr() != x.data_ptr()}
    params = sum(p.numel() for p in ours.parameters())
    assert sum(kept["ours"].values()) == params + 2 * 16  # and the mean and variance of 16 channels
    assert sum(kept["theirs"].values()) >= x.numel()


def test_autocast_runs_the_convolution_in_low_precision():
    theirs, ours = transition_pair(dtype=torch.float32)
    x = torch.randn(2, 18, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = theirs(x), ours(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(actual.float(), expected.float(), atol=0.05, rtol=0.05)
    actual.float().sum().backward()
    assert x.grad is not None and ours.conv.weight.grad is not None


def test_other_modules_and_hooks_run_module_by_module():
    theirs, ours = transition_pair()
    x = torch.randn(2, 18, 6, 6, dtype=torch.float64)
    ours.relu = nn.LeakyReLU(0.1)  # not BN-ReLU-conv-pool any more: must not be fused away
    theirs.relu = nn.LeakyReLU(0.1)
    torch.testing.assert_close(ours(x), theirs(x), **F64)
    _, ours = transition_pair()
    seen = []
    ours.conv.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    ours(x)
    assert seen == [torch.Size([2, 7, 6, 6])]  # the hook saw the full-size conv output


def test_bad_input_names_the_argument():
    _, ours = transition_pair()
    with pytest.raises(ValueError, match="input must have 18 channels"):
        ours(torch.randn(2, 17, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        ours(torch.randn(1, 18, 1, 1, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_as_accurate_as_torchvision(dtype):
    # Both against float64 runs of the same rounded parameters and input.
    theirs, ours = transition_pair(16, 8, dtype=dtype)
    exact_model = _Transition(16, 8).double()
    exact_model.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 16, 8, 8).to(dtype)
    grad = torch.randn(4, 8, 4, 4).to(dtype)
    exact = run_step(exact_model, x.double(), grad.double())
    eps = torch.finfo(dtype).eps
    for got, expected in zip(run_step(ours, x, grad)[:3], run_step(theirs, x, grad)[:3]):
        pairs = got.items() if isinstance(got, dict) else [(None, got)]
        for name, value in pairs:
            truth = exact[2][name] if name else (exact[0] if value.shape == exact[0].shape else exact[1])
            reference = expected[name] if name else expected
            scale = truth.abs().max()
            our_error = (value.double() - truth).abs().max() / scale
            their_error = (reference.double() - truth).abs().max() / scale
            assert our_error <= 2 * their_error + 4 * eps, name


def test_bn_relu_pool_op_names_bad_arguments():
    x, c = torch.randn(2, 4, 6, 6), torch.ones(4)
    op, backward = torch.ops.dense_ops.bn_relu_pool, torch.ops.dense_ops.bn_relu_pool_backward
    with pytest.raises(RuntimeError, match=r"bn_relu_pool: bias must be a 1-D tensor of 4 elements"):
        op(x, c, torch.ones(3), c, c, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"bn_relu_pool: input must be at least 2x2 pixels"):
        op(torch.randn(2, 4, 1, 6), c, c, c, c, False, 1e-5)
    with pytest.raises(RuntimeError, match=r"bn_relu_pool: eps must be positive"):
        op(x, c, c, c, c, False, 0.0)
    with pytest.raises(RuntimeError, match=r"bn_relu_pool_backward: grad_pooled must have shape \[2, 4, 3, 3\]"):
        backward(torch.randn(2, 4, 3, 2), x, c, c, c, c, True, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"bn_relu_pool_backward: grad_pooled must have the input's dtype"):
        backward(torch.randn(2, 4, 3, 3, dtype=torch.float64), x, c, c, c, c, True, 1e-5, True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_bitwise_identical_for_any_thread_count(channels_last):
    _, ours = transition_pair(16, 8, dtype=torch.float32)
    x = torch.randn(4, 16, 10, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(4, 8, 5, 4)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            ours.zero_grad(set_to_none=True)
            results.append(run_step(ours, x, grad))
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        assert torch.equal(got[1], results[0][1])  # the input gradient: our kernels alone
        for name in ("norm.weight", "norm.bias"):
            assert torch.equal(got[2][name], results[0][2][name]), name
