"""The CPU kernels run in parallel, and their results do not depend on the thread count."""
import os
import platform
import re
import subprocess
import sys

import pytest
import torch

import dense_ops
from helpers import block_pair, run_step


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def torch_parallel_backend():
    return re.search(r"ATen parallel backend: (\w+)", torch.__config__.parallel_info()).group(1)


def test_build_info_reports_the_parallel_backend():
    info = dense_ops.build_info()
    assert info["parallel_backend"] == {"OpenMP": "OpenMP", "native": "native thread pool"}[torch_parallel_backend()]
    assert info["parallel_kernels"] is True


def test_extension_parallel_for_uses_torchs_threads(restore_threads):
    torch.set_num_threads(2)
    assert dense_ops._C._parallel_for_threads(8) == 2
    torch.set_num_threads(1)
    assert dense_ops._C._parallel_for_threads(8) == 1


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
# (batch, input channels, size), block.h: 5 samples of 9x9 make 2 ranges (kMinRangePixels), 37
# make 16 and GEMMs of 2-3 samples; one 32x32 sample of 144 float32 channels (576 KiB) runs as bands
# of rows (kGroupBytes); one 33x33 sample makes 8 ranges of its rows.
@pytest.mark.parametrize("shape", [(5, 6, 9), (37, 6, 9), (5, 144, 32), (1, 6, 33)],
                         ids=["2_ranges", "16_ranges", "row_bands", "ranges_of_rows"])
def test_results_are_bitwise_identical_for_any_thread_count(recompute, channels_last, shape, restore_threads):
    batch, channels, size = shape
    _, ours = block_pair(num_layers=3, in_channels=channels, bn_size=2, growth=4, dtype=torch.float32,
                         recompute=recompute)
    x = torch.randn(batch, channels, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(batch, channels + 3 * 4, size, size)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        block = ours.__class__(3, channels, 2, 4, 0.0, recompute=recompute)
        block.load_state_dict(ours.state_dict())
        results.append(run_step(block, x, grad))
    for got in results[1:]:
        for a, b in zip(got[:2], results[0][:2]):
            assert torch.equal(a, b)
        for part in (2, 3):
            for name in got[part]:
                if name.endswith("conv2.weight"):
                    # ATen's 3x3 convolution (oneDNN) splits its weight-gradient reduction by thread
                    # count; everything else here is ours: BN kernels and the 1x1 conv GEMMs.
                    continue
                assert torch.equal(got[part][name], results[0][part][name]), name


def test_cpu_kernel_isa_follows_torchs_capability():
    # GCC builds on x86-64 carry an AVX2+FMA copy of the kernels, run where torch runs its own
    # AVX2 (or AVX-512) kernels; ATEN_CPU_CAPABILITY=default selects the baseline copy for both.
    avx2_built = platform.machine() == "x86_64" and sys.platform == "linux"
    capability = torch.backends.cpu.get_cpu_capability()
    expected = "avx2" if avx2_built and capability in ("AVX2", "AVX512") else "baseline"
    assert dense_ops.build_info()["cpu_kernel_isa"] == expected


@pytest.mark.slow
def test_baseline_isa_kernels_pass_the_reference_tests():
    if dense_ops.build_info()["cpu_kernel_isa"] == "baseline":
        pytest.skip("this process already runs the baseline kernels: every other test covers them")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    selected = ["test_dense_block.py::test_matches_naive_float64", "test_dense_block.py::test_nan_propagates_like_naive",
                "test_dense_block.py::test_low_precision_training_step_as_accurate_as_naive",
                "test_condense.py::test_condensed_conv_matches_reference",
                "test_condense.py::test_group_conv3x3_matches_conv2d",
                "test_parallel.py::test_results_are_bitwise_identical_for_any_thread_count",
                "test_parallel.py::test_cpu_kernel_isa_follows_torchs_capability"]
    package_root = os.path.dirname(os.path.dirname(dense_ops.__file__))  # the same build as this process
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default",
               PYTHONPATH=os.pathsep.join([tests_dir, package_root, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not cuda"] + selected,
                          cwd=tests_dir, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("epilogue", [False, True])
def test_condensed_conv_is_bitwise_identical_for_any_thread_count(channels_last, epilogue, restore_threads):
    # 3 x 70 x 90 pixels and 2 groups: several pixel tiles per group, tiles crossing image borders.
    groups, kept, out_channels = 2, 24, 16
    x = torch.randn(3, 40, 70, 90)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    args = (torch.randint(0, 40, (groups * kept,)), torch.rand(groups * kept) + 0.5, torch.randn(groups * kept),
            torch.randn(out_channels, kept), groups)
    if epilogue:
        args += (torch.rand(out_channels) + 0.5, torch.randn(out_channels))
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(dense_ops.ops.condensed_conv(x, *args))
    for got in results[1:]:
        assert torch.equal(got, results[0])


def test_group_conv3x3_is_bitwise_identical_for_any_thread_count(restore_threads):
    x = torch.randn(1, 16, 45, 37)  # one image, 2 groups of 8 inputs: the bands follow the thread count
    weight = torch.randn(6, 8, 3, 3)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(dense_ops.ops.group_conv3x3(x, weight, 2))
    for got in results[1:]:
        assert torch.equal(got, results[0])
