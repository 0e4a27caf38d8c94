"""Property-based tests (hypothesis): for any small block configuration, DenseBlock behaves exactly
like the naive block (torchvision's, or dense_ops.reference without a bottleneck)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import assert_close_dicts, block_pair

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}

block_configs = st.fixed_dictionaries({
    "num_layers": st.integers(1, 4),
    "in_channels": st.integers(1, 6),
    "growth": st.integers(1, 4),
    "bn_size": st.sampled_from([None, 1, 2]),
    "recompute": st.sampled_from(["bn_relu", "bottleneck"]),
})
inputs = st.fixed_dictionaries({
    "batch": st.integers(1, 4),
    "height": st.integers(1, 5),
    "width": st.integers(1, 5),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "layout": st.sampled_from(["contiguous", "channels_last", "strided"]),
    "training": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


def make_input(batch, in_channels, height, width, dtype, layout):
    """(leaf, view): the block reads `view`, laid out as `layout`; its gradient is read through the leaf
    (helpers.run_step clones its input, which would make a strided input contiguous)."""
    if layout == "strided":  # every other channel and column of a larger tensor
        leaf = torch.randn(batch, 2 * in_channels, height, 2 * width, dtype=dtype)
        return leaf, lambda t: t[:, ::2, :, ::2]
    leaf = torch.randn(batch, in_channels, height, width, dtype=dtype)
    if layout == "channels_last":
        leaf = leaf.contiguous(memory_format=torch.channels_last)
    return leaf, lambda t: t


def step(block, leaf, view, grad):
    """Forward + backward through `view(leaf)`: (output, input gradient, parameter gradients, buffers)."""
    leaf = leaf.detach().clone().requires_grad_()
    x = view(leaf)
    out = block(x)
    out.backward(grad)
    param_grads = {n: p.grad for n, p in block.named_parameters()}
    return out.detach(), view(leaf.grad), param_grads, {n: b.clone() for n, b in block.named_buffers()}


def assert_close_scaled(actual, expected, tol, name):
    """Relative to the largest reference value: gradients through BN with a tiny batch variance are
    large, and float rounding scales with them."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(expected.dtype), expected, atol=tol * scale, rtol=tol, msg=name)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=block_configs, data=inputs)
def test_block_matches_naive(config, data):
    torch.manual_seed(data["seed"])
    dtype = data["dtype"]
    naive, ours = block_pair(config["num_layers"], config["in_channels"], config["bn_size"], config["growth"],
                             dtype=dtype, recompute=config["recompute"])
    naive.train(data["training"]), ours.train(data["training"])
    leaf, view = make_input(data["batch"], config["in_channels"], data["height"], data["width"], dtype,
                            data["layout"])
    out_channels = config["in_channels"] + config["num_layers"] * config["growth"]
    grad = torch.randn(data["batch"], out_channels, data["height"], data["width"], dtype=dtype)

    if data["training"] and data["batch"] * data["height"] * data["width"] == 1:
        for block in (naive, ours):  # batch norm cannot train on one value per channel
            with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
                block(view(leaf))
        return

    expected = step(naive, leaf, view, grad)
    actual = step(ours, leaf, view, grad)
    tol = TOLERANCE[dtype]
    assert actual[0].shape == (data["batch"], out_channels, data["height"], data["width"])
    assert_close_scaled(actual[0], expected[0], tol, "output")
    assert_close_scaled(actual[1], expected[1], tol, "input gradient")
    for name in expected[2]:
        assert_close_scaled(actual[2][name], expected[2][name], tol, name)
    assert_close_dicts(actual[3], expected[3], atol=tol, rtol=tol)  # running statistics, num_batches_tracked
    if data["layout"] == "channels_last" and not leaf.is_contiguous():  # unambiguously channels_last
        assert actual[0].is_contiguous(memory_format=torch.channels_last)
