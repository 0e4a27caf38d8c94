"""The whole dense block through the CUDA strategy: csrc/dense_block.cpp and the bottleneck
strategies, compiled as they are, over csrc/cuda/bn_kernels.cu executed by cudasim, forward and
backward against torchvision's block (autograd) in float64."""
import os
import sys

import pytest
import torch
from torchvision.models.densenet import _DenseBlock

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from build import load  # noqa: E402

ext = load()
F64 = dict(rtol=0, atol=1e-10)
NAMES = ("norm1.weight", "norm1.bias", "norm1.running_mean", "norm1.running_var", "conv1.weight",
         "norm2.weight", "norm2.bias", "norm2.running_mean", "norm2.running_var", "conv2.weight")


class BasicLayer(torch.nn.Module):
    """A layer without a bottleneck, BN-ReLU-Conv3x3 over the concatenated inputs, with
    torchvision's names (its _DenseBlock has no such layer)."""

    def __init__(self, in_channels, growth):
        super().__init__()
        self.norm1 = torch.nn.BatchNorm2d(in_channels)
        self.conv1 = torch.nn.Conv2d(in_channels, growth, 3, padding=1, bias=False)

    def forward(self, inputs):
        return self.conv1(torch.relu(self.norm1(torch.cat(inputs, 1))))


class BasicBlock(torch.nn.ModuleDict):
    def __init__(self, layers, in_channels, growth):
        super().__init__({f"denselayer{i + 1}": BasicLayer(in_channels + i * growth, growth) for i in range(layers)})

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def naive_block(bottleneck, layers=3, in_channels=4, growth=3, seed=0):
    torch.manual_seed(seed)
    block = (_DenseBlock(layers, in_channels, 2, growth, 0.0) if bottleneck
             else BasicBlock(layers, in_channels, growth)).double()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    return block


def flat_params(block, bottleneck):
    names = NAMES if bottleneck else NAMES[:5]
    return [layer.get_parameter(n) if not n.split(".")[1].startswith("running") else layer.get_buffer(n)
            for layer in block.values() for n in names]


@pytest.fixture(params=["batched", "per_sample"])
def strategy(request, monkeypatch):
    monkeypatch.setenv("DENSE_OPS_BOTTLENECK", request.param)
    return request.param


@pytest.mark.parametrize("bottleneck", [True, False], ids=["bottleneck", "basic"])
@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("chunk_bytes", [None, "1"], ids=["one_chunk", "chunk_per_sample"])
def test_block_matches_torchvision(strategy, monkeypatch, bottleneck, recompute, training, channels_last, chunk_bytes):
    if chunk_bytes:  # the batched strategy then loops over one-sample chunks
        monkeypatch.setenv("DENSE_OPS_BATCHED_SCRATCH_BYTES", chunk_bytes)
    monkeypatch.setenv("CUDASIM_ORDER", "random:3")
    block = naive_block(bottleneck).train(training)
    params = [p.detach().clone() for p in flat_params(block, bottleneck)]
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(3, 4 + 3 * 3, 5, 6, dtype=torch.float64)

    features, mean, var, saved, mean2, var2 = ext.dense_block_forward(True, x, params, None, bottleneck, training,
                                                                       recompute, 1e-5)
    x_ref = x.clone().requires_grad_()
    expected = block(x_ref)
    expected.backward(grad)
    torch.testing.assert_close(features, expected.detach(), **F64)
    assert features.is_contiguous(memory_format=torch.channels_last) == channels_last
    if training:
        torch.testing.assert_close(mean, expected.detach().mean((0, 2, 3)), **F64)

    grad_input, grads = ext.dense_block_backward(True, grad, features, mean, var, saved, mean2, var2, params, None,
                                                 bottleneck, training, 1e-5, [1, 1, 1], True)
    torch.testing.assert_close(grad_input, x_ref.grad, **F64)
    for got, (i, p) in zip(grads, enumerate(flat_params(block, bottleneck))):
        if p.requires_grad:
            torch.testing.assert_close(got, p.grad, **F64, msg=lambda m: f"{NAMES[i % len(NAMES)]}: {m}")
