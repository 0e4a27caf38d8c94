"""Shared helpers for the model, swap and ecosystem tests."""
from __future__ import annotations

import torch
from torch import nn


def randomize_batch_norms(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so mistakes cannot hide."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)
    return module


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


def assert_same_step(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, atol: float, rtol: float = 0.0):
    """Outputs, input grads, parameter grads and buffers agree after one step of each model."""
    out_a, gx_a, grads_a, bufs_a = forward_backward(model_a, x)
    out_b, gx_b, grads_b, bufs_b = forward_backward(model_b, x)
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol, msg="output")
    torch.testing.assert_close(gx_a, gx_b, atol=atol, rtol=rtol, msg="input grad")
    for name, mine, theirs in ((("param grads", grads_a, grads_b)), ("buffers", bufs_a, bufs_b)):
        assert mine.keys() == theirs.keys(), name
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], atol=atol, rtol=rtol, msg=f"{name}: {key}")
