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
        assert result["peak_bytes"] > 0
        if record.get("timed", True):
            assert result["time_s"]["median"] > 0 and len(result["time_s"]["samples"]) == record["repeats"]
        if record["impl"] != "naive" and record["check"]:
            assert result["check"]["passed"], result["check"]


def test_benchmark_smoke_run_checks_every_implementation(tmp_path):
    results = run_benchmarks(tmp_path, "--only", "block", "condensenet", "--repeats", "1",
                             "--impls", *EAGER_TRAINING, *CONDENSENET[1:])
    records = results["records"]
    by_suite = {(r["suite"], r["impl"], r["memory_format"]) for r in records}
    assert {("block", impl, fmt) for impl in EAGER_TRAINING for fmt in ("contiguous", "channels_last")} <= by_suite
    assert {("condensenet", impl, "contiguous") for impl in CONDENSENET} <= by_suite
    assert_measured_and_checked(records)
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.count("|") > 10
    assert "| dense_ops/fused faster by |" in markdown  # against every CondenseNet row and densenet121
    assert markdown.count(results["machine"]["git_commit"][:12]) == markdown.count("\n## ") + 1  # every table
    assert (tmp_path / "bars_block_block.png").stat().st_size > 0


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
    from benchmarks.workloads import split_compiled
    args = parse_args(["--quick"])
    configs = [config for name in SIZES["quick"]["suites"] for config in SUITES[name](args)]
    compiled = [c for c in configs if split_compiled(c["impl"])[1]]
    assert compiled and all(c["memory"] is False and c["check"] is False for c in compiled)
    assert all(c.get("memory", True) for c in configs if not split_compiled(c["impl"])[1])


def test_sweep_timing_switch():
    """--no-sweep-timing makes --full's depth sweep (both growth rates) measure memory only."""
    from benchmarks.__main__ import parse_args
    from benchmarks.suites import SUITES
    for argv, timed in ((["--full"], True), (["--full", "--no-sweep-timing"], False), (["--quick"], False),
                        (["--quick", "--sweep-timing"], True)):
        configs = SUITES["depth"](parse_args(argv))
        assert configs and all(config["timed"] is timed for config in configs), argv
    assert {c["shape"]["growth"] for c in SUITES["depth"](parse_args(["--full", "--no-sweep-timing"]))} == {12, 32}
