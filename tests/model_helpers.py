"""Shared helpers for the model, swap and ecosystem tests."""
from __future__ import annotations

import torch
from torch import nn


def forward_backward(model: nn.Module, x: torch.Tensor, seed: int = 0, input_grad: bool = True):
    """One step: returns (output, input grad, {param name: grad}, {buffer name: value})."""
    x = x.detach().clone().requires_grad_(input_grad)
    model.zero_grad(set_to_none=True)
    out = model(x)
    # Drawn in float32 so that models of every dtype get the same output gradient.
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    return out.detach(), x.grad, grads, buffers


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, atol: float, msg: str) -> None:
    """|actual - expected| <= atol * max(1, max|expected|): tensors of large gradients
    (BN over a few values per channel) are compared relative to their own scale."""
    scale = max(1.0, expected.abs().max().item()) if expected.is_floating_point() and expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=0.0, msg=lambda detail: f"{msg}: {detail}")


def assert_same_step(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, atol: float):
    """Outputs, input grads, parameter grads and buffers agree after one step of each model."""
    out_a, gx_a, grads_a, bufs_a = forward_backward(model_a, x)
    out_b, gx_b, grads_b, bufs_b = forward_backward(model_b, x)
    assert_close_to_scale(out_a, out_b, atol, "output")
    assert_close_to_scale(gx_a, gx_b, atol, "input grad")
    for name, mine, theirs in ((("param grads", grads_a, grads_b)), ("buffers", bufs_a, bufs_b)):
        assert mine.keys() == theirs.keys(), name
        for key in mine:
            assert_close_to_scale(mine[key], theirs[key], atol, f"{name}: {key}")
