"""The benchmark command end to end at its smoke sizes: every configuration runs in its own
process, passes its float64 correctness check against naive and lands in the outputs."""
import json
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_benchmark_smoke_run_checks_every_implementation(tmp_path):
    command = [sys.executable, "-m", "benchmarks", "--smoke", "--only", "block", "condensenet",
               "--repeats", "1", "--threads", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    records = results["records"]
    by_suite = {(r["suite"], r["impl"], r["memory_format"]) for r in records}
    assert {("block", impl, fmt) for impl in ("naive", "checkpoint", "dense_ops/bn_relu", "dense_ops/bottleneck")
            for fmt in ("contiguous", "channels_last")} <= by_suite
    assert {("condensenet", impl, "contiguous") for impl in ("naive", "masked", "dense_ops/fused")} <= by_suite
    for record in records:
        result = record["result"]
        assert "error" not in result, result
        assert result["peak_bytes"] > 0 and result["time_s"]["median"] > 0
        if record["impl"] != "naive":
            assert result["check"]["passed"], result["check"]
    assert (tmp_path / "results.md").read_text().count("|") > 10
    assert (tmp_path / "bars_block_block.png").stat().st_size > 0
