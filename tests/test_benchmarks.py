"""The benchmark command end to end at its smoke sizes: every configuration runs in its own
process, passes its float64 correctness check against naive and lands in the outputs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EAGER_TRAINING = ("naive", "checkpoint", "dense_ops/bn_relu", "dense_ops/bottleneck")
CONDENSENET = ("naive", "naive+model_choices", "masked", "dense_ops/fused", "torchvision/densenet121")


def run_benchmarks(out: Path, *options: str) -> dict:
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--threads", "1", "--out", str(out), *options]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


def assert_measured_and_checked(records: list[dict]) -> None:
    for record in records:
        result = record["result"]
        assert "error" not in result, result
        if record.get("memory", True):
            assert result["peak_bytes"] > 0
        if record.get("timed", True):
            samples = result["time_s"]["samples"]
            assert result["time_s"]["median"] > 0 and len(samples) >= record["repeats"]
            assert len(samples) == record["repeats"] or sum(samples) >= record["min_time_s"]
        if record["impl"] != "naive" and record["check"]:
            assert result["check"]["passed"], result["check"]


def test_benchmark_smoke_run_checks_every_implementation(tmp_path):
    results = run_benchmarks(tmp_path, "--only", "block", "condensenet", "--repeats", "1",
                             "--impls", *EAGER_TRAINING, "convolutions", "arithmetic", *CONDENSENET[1:])
    records = results["records"]
    by_suite = {(r["suite"], r["impl"], r["memory_format"]) for r in records}
    assert {("block", impl, fmt) for impl in EAGER_TRAINING + ("convolutions", "arithmetic")
            for fmt in ("contiguous", "channels_last")} <= by_suite
    floor = [r for r in records if r["impl"] in ("convolutions", "arithmetic")]
    assert all(r["memory"] is False and r["check"] is False and "peak_bytes" not in r["result"] for r in floor)
    assert {("condensenet", impl, "contiguous") for impl in CONDENSENET} <= by_suite
    assert_measured_and_checked(records)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("|") > 10
    assert "| convolutions | - | - |" in markdown and "| arithmetic | - | - |" in markdown
    assert "a time floor" in markdown
    assert "| dense_ops/fused faster by |" in markdown  # against every CondenseNet row and densenet121
    assert markdown.count(results["machine"]["git_commit"][:12]) == markdown.count("\n## ") + 1  # every table
    assert (tmp_path / "bars_block_block.png").stat().st_size > 0


def test_timed_steps_run_in_interleaved_rounds(tmp_path):
    """--rounds 2: every row's timed steps come from two fresh processes, and each round runs every
    row once before the next round starts."""
    impls = ("naive", "dense_ops/bn_relu")
    results = run_benchmarks(tmp_path, "--only", "block", "--formats", "contiguous", "--impls", *impls,
                             "--repeats", "3", "--rounds", "2")
    records = results["records"]
    assert_measured_and_checked(records)  # 3 samples in all
    assert all(len(r["result"]["time_s"]["rounds"]) == 2 for r in records)
    starts = sorted((run["started"], r["impl"]) for r in records for run in r["result"]["time_s"]["rounds"])
    assert [impl for _, impl in starts] == list(impls) * 2
    assert "in 2 rounds" in (tmp_path / "results.md").read_text()


def test_fast_steps_are_timed_for_at_least_min_time(tmp_path):
    results = run_benchmarks(tmp_path, "--only", "block", "--formats", "contiguous", "--impls", "naive",
                             "--repeats", "2", "--min-time", "0.5")
    [record] = results["records"]
    assert_measured_and_checked([record])
    samples = record["result"]["time_s"]["samples"]
    assert len(samples) > 2 and sum(samples) >= 0.5 > sum(samples[:-1])  # steps stop once there are enough
    assert f"of {len(samples)} timed steps" in (tmp_path / "results.md").read_text()


def test_busy_processes_load_the_machine_while_the_rows_run(tmp_path):
    from benchmarks.runner import busy_processes
    with busy_processes(2) as spinners:
        assert len(spinners) == 2 and all(spinner.poll() is None for spinner in spinners)
    assert all(spinner.returncode is not None for spinner in spinners)  # gone once the block ends
    results = run_benchmarks(tmp_path, "--only", "block", "--formats", "contiguous", "--impls", "naive",
                             "--repeats", "1", "--busy", "1")
    assert results["machine"]["busy_processes"] == 1
    assert_measured_and_checked(results["records"])
    assert "beside 1 busy process)" in (tmp_path / "results.md").read_text()


def test_rounds_must_not_exceed_the_timed_steps(capsys):
    from benchmarks.__main__ import parse_args
    assert parse_args(["--full"]).rounds == 2 and parse_args(["--quick"]).rounds == 1
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "2", "--rounds", "3"])
    assert "--rounds (3) must not exceed --repeats (2)" in capsys.readouterr().err


def test_depth_search_measures_the_deepest_block_within_the_budget(tmp_path):
    budget_gib = 4 / 1024
    impls = ("naive", "dense_ops/bottleneck")
    results = run_benchmarks(tmp_path, "--only", "depth", "--repeats", "1", "--budget-gib", str(budget_gib),
                             "--impls", *impls)
    assert_measured_and_checked(results["records"])
    searched = [r for r in results["records"] if r.get("search")]
    assert searched and all("time_s" not in r["result"] for r in searched)  # memory only
    budget = budget_gib * 2**30
    found = results["memory_budget"]["measured"]
    assert {(f["growth"], f["impl"]) for f in found} == {(k, impl) for k in (12, 32) for impl in impls}
    for f in found:
        assert f["deepest_fitting_peak_bytes"] <= budget < f["shallowest_over_peak_bytes"]
        assert f["shallowest_over"] - f["deepest_fitting"] <= max(1, int(0.05 * f["deepest_fitting"]))
    assert "measured" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # inductor compiles two small blocks twice each (float64 check, float32): minutes on 2 cores
def test_compiled_rows_are_checked_and_state_their_compile_time(tmp_path):
    results = run_benchmarks(tmp_path, "--only", "block", "--formats", "contiguous", "--repeats", "2",
                             "--impls", "naive", "naive+compile", "dense_ops/bn_relu+compile")
    records = results["records"]
    assert {r["impl"] for r in records} == {"naive", "naive+compile", "dense_ops/bn_relu+compile"}
    assert_measured_and_checked(records)
    for record in records:
        if record["impl"].endswith("+compile"):
            compiled = record["result"]["compile"]
            assert compiled["graphs"] >= 1 and compiled["graphs_after_measured_step"] == compiled["graphs"]
            assert record["result"]["first_step_s"] > record["result"]["time_s"]["median"]  # the compilation
    assert "compile: 1st step" in (tmp_path / "results.md").read_text()


def test_quick_set_only_times_compiled_rows():
    """Each process of a compiled row pays a compilation or a cache load (45 s for DenseNet-BC-100):
    --quick skips the memory process (and with it the float64 check) of those rows, and of no other."""
    from benchmarks.__main__ import parse_args
    from benchmarks.suites import SIZES, SUITES
    from benchmarks.workloads import FLOORS, split_compiled
    args = parse_args(["--quick"])
    configs = [config for name in SIZES["quick"]["suites"] for config in SUITES[name](args)]
    compiled = [c for c in configs if split_compiled(c["impl"])[1]]
    assert compiled and all(c["memory"] is False and c["check"] is False for c in compiled)
    models = [c for c in configs if not split_compiled(c["impl"])[1] and c["impl"] not in FLOORS]
    assert all(c.get("memory", True) for c in models)


def test_sweep_timing_switch():
    """--no-sweep-timing makes --full's depth sweep (both growth rates) measure memory only."""
    from benchmarks.__main__ import parse_args
    from benchmarks.suites import SUITES
    for argv, timed in ((["--full"], True), (["--full", "--no-sweep-timing"], False), (["--quick"], False),
                        (["--quick", "--sweep-timing"], True)):
        configs = SUITES["depth"](parse_args(argv))
        assert configs and all(config["timed"] is timed for config in configs), argv
    assert {c["shape"]["growth"] for c in SUITES["depth"](parse_args(["--full", "--no-sweep-timing"]))} == {12, 32}


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_convolution_floor_runs_every_convolution_of_the_naive_step(memory_format):
    """The "convolutions" row times each conv of a naive training step on its recorded input: as
    many calls as the naive step makes, in its memory format, with the gradients of plain conv
    formulas."""
    import torch
    from torch.nn.grad import conv2d_input, conv2d_weight
    from benchmarks.workloads import Workload
    shape = {"depth": 40, "growth": 12, "batch": 2, "size": 16}
    config = {"workload": "densenet_cifar", "impl": "convolutions", "memory_format": memory_format, "mode": "train",
              "shape": shape}
    workload = Workload(config, torch.device("cpu"))
    naive = Workload(dict(config, impl="naive"), torch.device("cpu"))
    called = []
    for conv in naive.model.modules():
        if isinstance(conv, torch.nn.Conv2d):
            conv.register_forward_hook(lambda module, args, out: called.append(tuple(args[0].shape)))
    naive.step()
    floor = workload.floor_work
    assert [tuple(x.shape) for _, x in floor.calls] == called
    assert [x.requires_grad for _, x in floor.calls] == [False] + [True] * (len(called) - 1)  # the image needs none
    target_format = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    assert all(x.is_contiguous(memory_format=target_format) for _, x in floor.calls)
    def assert_float32_close(actual, exact):
        torch.testing.assert_close(actual.double(), exact, rtol=1e-4, atol=1e-5 * exact.abs().max().item())

    floor.forward_backward()
    for (conv, x), grad in zip(floor.calls, floor.output_grads):
        # in float64, where ATen runs its own convolution kernels instead of oneDNN's
        args = dict(stride=conv.stride, padding=conv.padding, groups=conv.groups)
        x64, weight64, grad64 = x.detach().double(), conv.weight.detach().double(), grad.double()
        assert_float32_close(conv.weight.grad, conv2d_weight(x64, weight64.shape, grad64, **args))
        if x.requires_grad:
            assert_float32_close(x.grad, conv2d_input(x64.shape, weight64, grad64, **args))
    workload.step()  # a step leaves no gradient behind
    assert all(conv.weight.grad is None and x.grad is None for conv, x in floor.calls)
    with pytest.raises(ValueError, match="time floor"):
        workload.outputs_and_grads(1)


@pytest.mark.parametrize("workload_name, shape", [
    ("block", {"num_layers": 4, "c0": 8, "growth": 4, "bn_size": 4, "batch": 2, "size": 8}),
    ("densenet_cifar", {"depth": 40, "growth": 12, "batch": 2, "size": 16}),
])
def test_arithmetic_floor_runs_the_naive_steps_operations_as_gemms(workload_name, shape):
    """The "arithmetic" row's GEMMs do as many operations as the naive step's convolutions and
    classifier, counted here from each layer's shapes: 2 per multiply-add forward, and again for
    each gradient computed in backward (the image needs no input gradient)."""
    import torch
    from benchmarks.workloads import Workload
    config = {"workload": workload_name, "impl": "arithmetic", "memory_format": "contiguous", "mode": "train",
              "shape": shape}
    naive = Workload(dict(config, impl="naive"), torch.device("cpu"))
    expected = 0
    def count(module, args, out):
        nonlocal expected
        x = args[0]
        if isinstance(module, torch.nn.Conv2d):
            forward = 2 * out.numel() * module.weight[0].numel()
        else:  # nn.Linear
            forward = 2 * out.numel() * module.in_features
        expected += forward * (3 if x.requires_grad else 2)
    for module in naive.model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            module.register_forward_hook(count)
    naive.step()
    workload = Workload(config, torch.device("cpu"))
    floor = workload.floor_work
    assert floor.flops == expected
    gemm_flops = sum(2 * a.size(0) ** 3 for a, _ in floor.gemms)  # square GEMMs
    assert abs(gemm_flops - expected) <= 0.01 * expected  # the remainder's side is rounded
    assert all(a.dtype == torch.float32 and a.shape == b.shape for a, b in floor.gemms)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    workload.step()
    assert torch.backends.cuda.matmul.allow_tf32 == tf32  # the step's TF32 allowance is its own
    with pytest.raises(ValueError, match="time floor"):
        workload.outputs_and_grads(1)
    with pytest.raises(ValueError, match="training-step floor"):
        Workload(dict(config, mode="eval"), torch.device("cpu"))
