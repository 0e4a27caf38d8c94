"""Runs every configuration in a fresh process and describes the machine it ran on.

Fresh processes come from a multiprocessing fork server that has imported torch,
torchvision and dense_ops and allocated no tensors: each configuration starts from a
clean heap without paying the import time again.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import measure
from .progress import progress_bar
from .workloads import describe

REPO_ROOT = Path(__file__).resolve().parent.parent
# torch._inductor.compile_fx: the `+compile` rows' processes then need not import inductor each
# (seconds on 2 cores). Importing it starts no thread or worker: inductor starts its compile workers
# (subprocesses, not multiprocessing children) in the process that compiles, when it compiles.
PRELOAD = ["torch", "torchvision.models.densenet", "dense_ops", "benchmarks.measure", "torch._inductor.compile_fx"]


@functools.cache
def fork_server():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_one(config: dict, timeout_s: float) -> dict:
    """Correctness and memory in one fresh process, then time in another, in one round (see
    benchmarks.measure and run_all); only the first for a configuration with "timed": False, only
    the second with "memory": False."""
    result = {"wall_s": {}}  # what each process cost, its start included: for estimating a run's duration
    if config.get("memory", True):
        _add_process(result, "memory", config, timeout_s)
    if "error" not in result and config.get("timed", True):
        _add_process(result, "time", config, timeout_s)
    return result


def round_repeats(config: dict, round_index: int) -> int:
    """The timed steps of one round: the configuration's `repeats` split as evenly as can be over its `rounds`."""
    repeats, rounds = config["repeats"], config.get("rounds", 1)
    return repeats * (round_index + 1) // rounds - repeats * round_index // rounds


def _add_process(result: dict, kind: str, config: dict, timeout_s: float) -> None:
    """Runs one measuring process and adds what it measured to `result`: a time process's steps join
    those of the configuration's earlier rounds."""
    started = time.perf_counter()
    measured = _run_in_process(fork_server(), kind, config, timeout_s)
    result["wall_s"][kind] = result["wall_s"].get(kind, 0.0) + round(time.perf_counter() - started, 2)
    if kind == "time" and "time_s" in measured and "time_s" in result:
        measured["time_s"] = measure.merge_rounds(result["time_s"], measured["time_s"])
    result.update(measured)


def _run_in_process(context, kind: str, config: dict, timeout_s: float) -> dict:
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=measure.measure_to_pipe, args=(kind, config, sender), daemon=True)
    process.start()
    sender.close()
    try:
        if not receiver.poll(timeout_s):
            return {"error": f"timed out after {timeout_s:.0f} s"}
        return receiver.recv()
    except EOFError:
        return {"error": "the measuring process died without a result (out of memory?)"}
    finally:
        process.join(5)
        if process.is_alive():
            process.kill()
            process.join()


def run_all(configs: list[dict], timeout_s: float) -> list[dict]:
    """[config + {"result": ...}] for every configuration, in order. First every configuration's
    memory process, then its timed steps in `rounds` rounds (the config's), each round a fresh
    process per configuration and every configuration once per round: a host that slows down or
    speeds up during the run then moves the samples of every row alike, not only of the rows
    measured in that spell."""
    rounds = max((config.get("rounds", 1) for config in configs), default=1)
    results = [{"wall_s": {}} for _ in configs]
    passes = [("memory", 0)] + [("time", index) for index in range(rounds)]
    bar = progress_bar(sum(_runs(config, {}, kind, index) for kind, index in passes for config in configs))
    try:
        for kind, round_index in passes:
            for config, result in zip(configs, results):
                if not _runs(config, result, kind, round_index):
                    continue
                bar.set_description(f"{config['suite']}: {config['impl']} {config['memory_format']} {kind}")
                process_config = dict(config, repeats=round_repeats(config, round_index)) if kind == "time" else config
                _add_process(result, kind, process_config, timeout_s)
                if "error" in result:
                    bar.write(f"FAILED {config['suite']} {describe(config)} {config['impl']} "
                              f"{config['memory_format']}: {result['error']}")
                bar.update(1)
    finally:
        bar.close()
    return [dict(config, result=result) for config, result in zip(configs, results)]


def _runs(config: dict, result: dict, kind: str, round_index: int) -> bool:
    """Whether run_all runs this configuration's `kind` process in this pass."""
    if "error" in result:
        return False
    if kind == "memory":
        return config.get("memory", True)
    return config.get("timed", True) and round_index < config.get("rounds", 1)


@contextlib.contextmanager
def busy_processes(count: int):
    """`count` processes that each keep a core busy (a Python loop) until the block ends: the load of
    a shared machine, which the timed steps then run beside. Yields the processes."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield spinners
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def machine_info(device: str, threads: int, busy: int = 0) -> dict:
    import dense_ops
    import torchvision
    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    return {"cpu": _cpu_model(), "cores": available_cores(), "threads": threads, "gpu": gpu,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "dense_ops": dense_ops.__version__,
            "git_commit": _git_commit(), "busy_processes": busy}


def machine_id(info: dict) -> str:
    """A folder name for this machine, e.g. 'amd-epyc-2c' or 'intel-xeon-8c-nvidia-a100'."""
    slug = lambda text: re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")  # noqa: E731
    name = f"{slug(info['cpu'])}-{info['cores']}c"
    return name + (f"-{slug(info['gpu'])}" if info["gpu"] else "")
