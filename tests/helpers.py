"""Shared builders for the tests: blocks with identical, randomized weights and statistics."""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.models.densenet import _DenseBlock

import dense_ops


def randomize_batch_norms(module: nn.Module) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so mistakes cannot hide."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(3)
    return module


def naive_block(num_layers, in_channels, bn_size, growth, drop_rate=0.0):
    """The ground truth: torchvision's block with a bottleneck, dense_ops.reference without."""
    if bn_size:
        return _DenseBlock(num_layers, in_channels, bn_size, growth, drop_rate, memory_efficient=False)
    return dense_ops.reference.DenseBlock(num_layers, in_channels, bn_size, growth, drop_rate)


def block_pair(num_layers=3, in_channels=6, bn_size=2, growth=4, dtype=torch.float64, device="cpu",
               recompute="bn_relu", drop_rate=0.0):
    """(naive, ours) with the same weights and buffers."""
    naive = randomize_batch_norms(naive_block(num_layers, in_channels, bn_size, growth, drop_rate)).to(device, dtype)
    ours = dense_ops.DenseBlock(num_layers, in_channels, bn_size, growth, drop_rate, recompute=recompute)
    ours.load_state_dict(naive.state_dict(), strict=True)
    return naive, ours.to(device, dtype)


def run_step(module, x, grad):
    """Forward + backward; returns (output, input gradient, parameter gradients, buffers)."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    param_grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return out.detach(), x.grad, param_grads, buffers


def assert_close_dicts(a, b, atol, rtol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].to(b[name].dtype), b[name], atol=atol, rtol=rtol, msg=name)


def run_gloo_ranks(steps, world_size: int, init_file: str) -> None:
    """Runs steps(rank, world_size) in world_size processes joined by a gloo process group."""
    mp.spawn(_gloo_rank, args=(steps, world_size, init_file), nprocs=world_size, join=True)


def _gloo_rank(rank, steps, world_size, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        steps(rank, world_size)  # objects holding the group (DDP wrappers) are gone when it returns
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every check has passed. Skip the interpreter's finalization, where gloo's worker threads
    # can still abort the process ("terminate called without an active exception": a known
    # torch teardown race, seen here about once in thirty runs on a loaded machine).
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)
