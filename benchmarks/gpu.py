"""The GPU benchmark of `make gpu-check`: training steps and CondenseNet inference on one device.

    python -m benchmarks.gpu --out DIR [--device cuda|cpu]

Training steps (forward + backward + SGD) of one dense block (L=24, C0=32, k=12, N=64, 32x32),
DenseNet-BC-100 (k=12, N=64, 32x32) and torchvision's densenet121 layout (N=64, 224x224), in
float32 and under bfloat16 autocast, for naive (torch.cat), torchvision's checkpointing,
torch.compile(naive), the two floors (naive's convolutions alone; its operations as large GEMMs;
no memory reported) and both dense_ops levels; converted CondenseNet-74 inference at N=1 and 64,
the official converted form against ours. On CUDA: peak memory from
torch.cuda.max_memory_allocated during the timed steps (weights, gradients and optimizer state
included), time from CUDA events around each step after warm-up. `--device cpu` is the dry run
with tiny sizes and the same output files (peak memory is not measured there).
Writes results.json and results.md into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import time

import torch

from .workloads import Workload

TRAINING_IMPLS = ("naive", "checkpoint", "naive+compile", "convolutions", "arithmetic", "dense_ops/bn_relu",
                  "dense_ops/bottleneck")
PRECISIONS = ("float32", "bf16-autocast")

# workload -> (shape on the GPU, shape of the CPU dry run)
TRAINING_SHAPES = {
    "block": ({"num_layers": 24, "c0": 32, "growth": 12, "bn_size": 4, "batch": 64, "size": 32},
              {"num_layers": 4, "c0": 8, "growth": 4, "bn_size": 4, "batch": 2, "size": 8}),
    "densenet_cifar": ({"depth": 100, "growth": 12, "batch": 64, "size": 32},
                       {"depth": 40, "growth": 12, "batch": 2, "size": 16}),
    "densenet121": ({"batch": 64, "size": 224}, {"batch": 2, "size": 32}),  # 2: BN needs 2 values at 1x1
}
CONDENSENET_BATCHES = ((1, 64), (1, 2))
CONDENSENET_SIZE = (224, 64)


def timed_steps(workload: Workload, device: torch.device, warmup: int, repeats: int,
                precision: str) -> tuple[list[float], int | None]:
    """Per-step milliseconds of `repeats` steps after `warmup` steps, and the peak memory (bytes)
    allocated during the timed steps (CUDA only)."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-autocast"
                else contextlib.nullcontext())
    with autocast:
        for _ in range(warmup):
            workload.step()
        if device.type != "cuda":
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                workload.step()
                times.append((time.perf_counter() - start) * 1e3)
            return times, None
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            workload.step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events], torch.cuda.max_memory_allocated(device)


def run_one(config: dict, device: torch.device, precision: str, warmup: int, repeats: int) -> dict:
    compiled = config["impl"].endswith("+compile")
    workload = Workload(dict(config, impl=config["impl"].removesuffix("+compile")), device)
    row = dict(config, precision=precision)
    if compiled:
        workload.model = torch.compile(workload.model)
        start = time.perf_counter()
        timed_steps(workload, device, 1, 0, precision)  # the first step compiles
        row["compile_s"] = round(time.perf_counter() - start, 1)
    times, peak = timed_steps(workload, device, warmup, repeats, precision)
    if workload.floor:
        peak = None  # the recorded inputs of every convolution: no model's memory
    row.update(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), steps=len(times),
               peak_mib=None if peak is None else peak / 2**20)
    del workload
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def configurations(dry_run: bool) -> list[tuple[dict, str]]:
    configs = []
    for workload, shapes in TRAINING_SHAPES.items():
        for precision in PRECISIONS:
            for impl in TRAINING_IMPLS:
                if dry_run and impl.endswith("+compile") and workload != "block":
                    continue  # the dry run compiles one model: compiling on 2 CPU cores takes minutes
                configs.append(({"workload": workload, "impl": impl, "memory_format": "contiguous", "mode": "train",
                                 "shape": shapes[dry_run]}, precision))
    for batch in CONDENSENET_BATCHES[dry_run]:
        for impl in ("naive", "dense_ops/fused"):
            configs.append(({"workload": "condensenet74", "impl": impl, "memory_format": "contiguous",
                             "mode": "eval", "shape": {"batch": batch, "size": CONDENSENET_SIZE[dry_run]}}, "float32"))
    return configs


def machine(device: torch.device) -> dict:
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "threads": torch.get_num_threads()}
    try:
        info["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def markdown(rows: list[dict], info: dict) -> str:
    lines = [f"# dense-ops GPU check: {info['device']}", "",
             f"torch {info['torch']} (CUDA {info['cuda']}), commit {info['commit']}. Median over the timed steps "
             "(min-max in brackets); peak memory allocated during the timed steps, relative to naive in the same "
             "precision.", "",
             "| workload | precision | implementation | peak MiB | memory vs naive | median ms [min-max] | "
             "time vs naive | compile s |", "|---|---|---|---|---|---|---|---|"]
    baseline = {}
    for row in rows:
        if row["impl"] == "naive":
            baseline[(row["workload"], str(row["shape"]), row["precision"])] = row
    for row in rows:
        base = baseline.get((row["workload"], str(row["shape"]), row["precision"]))
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        memory = "-" if row["peak_mib"] is None or base is None else f"{row['peak_mib'] / base['peak_mib']:.2f}x"
        speed = "-" if base is None else f"{row['median_ms'] / base['median_ms']:.2f}x"
        shape = ", ".join(f"{k}={v}" for k, v in row["shape"].items())
        lines.append(f"| {row['workload']} ({shape}) | {row['precision']} | {row['impl']} | {peak} | {memory} | "
                     f"{row['median_ms']:.2f} [{row['min_ms']:.2f}-{row['max_ms']:.2f}] | {speed} | "
                     f"{row.get('compile_s', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--warmup", type=int, help="steps before timing (default 3; the dry run 1)")
    parser.add_argument("--repeats", type=int, help="timed steps (default 10; the dry run 2)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device is visible (use --device cpu for the dry run)")
    dry_run = device.type == "cpu"
    warmup = args.warmup if args.warmup is not None else (1 if dry_run else 3)
    repeats = args.repeats if args.repeats is not None else (2 if dry_run else 10)
    os.makedirs(args.out, exist_ok=True)
    info = machine(device)
    rows = []
    for config, precision in configurations(dry_run):
        row = run_one(config, device, precision, warmup, repeats)
        rows.append(row)
        print(f"{row['workload']:15s} {precision:14s} {row['impl']:22s} {row['median_ms']:9.2f} ms"
              + ("" if row["peak_mib"] is None else f" {row['peak_mib']:9.0f} MiB"), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(rows, info))


if __name__ == "__main__":
    main()
