"""The bottleneck strategies (csrc/block.h): each runs exactly on the CPU too, the batched one in
chunks of samples with a call count independent of the batch size, and without host syncs on CUDA."""
import pytest
import torch

import dense_ops
from helpers import block_pair, run_step

F64 = dict(atol=1e-9, rtol=0.0)


@pytest.fixture(params=["batched", "per_sample"])
def strategy(request, monkeypatch):
    monkeypatch.setenv("DENSE_OPS_BOTTLENECK", request.param)
    return request.param


def compare(naive, ours, x, out_channels=6 + 3 * 4):
    grad = torch.randn(x.shape[0], out_channels, *x.shape[2:], dtype=x.dtype, device=x.device)
    expected, got = run_step(naive, x, grad), run_step(ours, x, grad)
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a, b, **F64)
    for part in (2, 3):
        for name in expected[part]:
            torch.testing.assert_close(got[part][name].to(expected[part][name].dtype), expected[part][name], **F64,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("scratch_bytes", [None, "1", "3000"], ids=["one_chunk", "per_sample_chunks", "2_samples"])
def test_strategy_matches_naive(strategy, monkeypatch, recompute, training, channels_last, scratch_bytes):
    if scratch_bytes:  # 3000 bytes hold 2 samples of 14 float64 channels at 5x5: chunks of 2, 2, 1
        monkeypatch.setenv("DENSE_OPS_BATCHED_SCRATCH_BYTES", scratch_bytes)
    naive, ours = block_pair(num_layers=3, in_channels=6, bn_size=2, growth=4, recompute=recompute)
    naive.train(training), ours.train(training)
    x = torch.randn(5, 6, 5, 5, dtype=torch.float64)
    compare(naive, ours, x.contiguous(memory_format=torch.channels_last) if channels_last else x)


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
# (batch, size), block.h: 37 samples of 5x5 make 6 ranges of at least 128 pixels (kMinRangePixels),
# 6 or 7 samples, each range's samples one GEMM (kGemmPixels); one 9x9 sample makes 2 ranges of rows.
@pytest.mark.parametrize("shape", [(37, 5), (1, 9)], ids=["groups_of_samples", "ranges_of_rows"])
def test_per_sample_gemms_over_groups_match_naive(monkeypatch, recompute, training, channels_last, shape):
    monkeypatch.setenv("DENSE_OPS_BOTTLENECK", "per_sample")
    naive, ours = block_pair(num_layers=3, in_channels=6, bn_size=2, growth=4, recompute=recompute)
    naive.train(training), ours.train(training)
    batch, size = shape
    x = torch.randn(batch, 6, size, size, dtype=torch.float64)
    compare(naive, ours, x.contiguous(memory_format=torch.channels_last) if channels_last else x)


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_per_sample_gemms_over_bands_of_rows_match_naive(monkeypatch, recompute, channels_last):
    # One 32x32 sample of 72 float64 channels is 576 KiB, over block.h's kGroupBytes (512 KiB):
    # its GEMMs run over bands of 28 and 4 rows (26 and 6 for the second layer's 76 channels).
    monkeypatch.setenv("DENSE_OPS_BOTTLENECK", "per_sample")
    naive, ours = block_pair(num_layers=2, in_channels=72, bn_size=2, growth=4, recompute=recompute)
    x = torch.randn(3, 72, 32, 32, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    compare(naive, ours, x, out_channels=72 + 2 * 4)


def test_bad_strategy_names_the_variable(monkeypatch):
    _, ours = block_pair()
    monkeypatch.setenv("DENSE_OPS_BOTTLENECK", "chunky")
    with pytest.raises(RuntimeError, match="DENSE_OPS_BOTTLENECK must be 'batched' or 'per_sample'"):
        ours(torch.randn(2, 6, 4, 4, dtype=torch.float64))
    monkeypatch.setenv("DENSE_OPS_BOTTLENECK", "batched")
    monkeypatch.setenv("DENSE_OPS_BATCHED_SCRATCH_BYTES", "-4")
    with pytest.raises(RuntimeError, match="DENSE_OPS_BATCHED_SCRATCH_BYTES must be a positive integer"):
        ours(torch.randn(2, 6, 4, 4, dtype=torch.float64))


def aten_calls_per_step(block, batch):
    x = torch.randn(batch, 6, 6, 6, requires_grad=True)
    grad = torch.randn(batch, 6 + 3 * 4, 6, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        block(x).backward(grad)
    return sum(1 for event in profile.events() if event.name.startswith("aten::"))


def test_batched_calls_do_not_grow_with_the_batch(monkeypatch):
    _, block = block_pair(num_layers=3, in_channels=6, bn_size=2, growth=4, dtype=torch.float32,
                          recompute="bottleneck")
    monkeypatch.setenv("DENSE_OPS_BOTTLENECK", "batched")
    assert aten_calls_per_step(block, 2) == aten_calls_per_step(block, 16)
    monkeypatch.setenv("DENSE_OPS_BOTTLENECK", "per_sample")  # the count can tell the two apart
    assert aten_calls_per_step(block, 16) > aten_calls_per_step(block, 2)


@pytest.mark.needs_cuda
@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_cuda_training_step_has_no_host_sync(recompute):
    _, block = block_pair(num_layers=3, in_channels=6, bn_size=2, growth=4, dtype=torch.float32, device="cuda",
                          recompute=recompute)
    x = torch.randn(8, 6, 8, 8, device="cuda", requires_grad=True)
    block(x).sum().backward()  # warm-up: lazy initialization may synchronize once
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.needs_cuda
def test_cuda_training_step_is_graph_capturable():
    naive, block = block_pair(num_layers=3, in_channels=6, bn_size=2, growth=4, dtype=torch.float32, device="cuda")
    x = torch.randn(8, 6, 8, 8, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs asks
            block(x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        out = block(x)
        out.sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    expected = naive.train()(x.detach())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
