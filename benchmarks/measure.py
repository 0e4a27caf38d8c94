"""Measures one configuration in two fresh processes: one for correctness and peak memory,
one for time, each starting from the same clean fork-server state.

Memory process: build the model and batch, then
1. a correctness check of outputs and gradients against the naive implementation with the
   same weights, in float64, on the first CHECK_BATCH samples of the batch (see compare_with_naive);
2. 1 + `warmup` warm-up steps; the first one compiles a `+compile` model, and its wall time is
   reported as the compile time (with the graphs, graph breaks and inductor cache hits);
3. peak memory of one step above the process's baseline:
   CPU: the kernel's resident high-water mark (VmHWM) is reset by writing "5" to
   /proc/self/clear_refs, the baseline is VmRSS just before the step; glibc is told from
   the start to hand freed blocks back to the OS at once (mmap threshold 64 KiB, trim
   threshold 128 KiB) so that the RSS follows what is really live;
   CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the
   memory allocated before the step.
Time process, with the allocator as users have it (the settings above make every large
allocation a fresh mmap, which slows steps down, the more the more an implementation
allocates): 1 + `warmup` warm-up steps, then `repeats` timed steps, more while they add up to
less than `min_time_s` (CUDA: events + synchronize);
runner.run_all may split a configuration's timed steps over several such processes (rounds).
A configuration with "timed": False (the depth search) runs only the memory process.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import statistics
import time
import traceback

import torch

from .workloads import BASELINE, Workload

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h
CHECK_BATCH = 2
CHECK_TOLERANCE = 1e-8  # max |x - exact| / max |exact| for every compared tensor, both in float64


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory_to_os() -> None:
    """Makes glibc release freed blocks at once, so the resident set tracks live memory."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]))
        libc.mallopt(_M_TRIM_THRESHOLD, int(MALLOC_ENV["MALLOC_TRIM_THRESHOLD_"]))


def _release() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field: peak memory cannot be measured on this system")


def cpu_peak_bytes(step) -> int:
    """Peak resident memory of step() above the resident memory just before it."""
    _release()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current VmRSS
    baseline = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - baseline) * 1024


def cuda_peak_bytes(step, device: torch.device) -> int:
    _release()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - baseline


class Timed:
    """Wraps step(); every call appends its duration in seconds to self.samples."""

    def __init__(self, step, device: torch.device):
        self.step, self.device, self.samples = step, device, []

    def __call__(self) -> None:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(self.device)
            start.record()
            self.step()
            end.record()
            end.synchronize()
            self.samples.append(start.elapsed_time(end) / 1000.0)
        else:
            begin = time.perf_counter()
            self.step()
            self.samples.append(time.perf_counter() - begin)


def _max_rel_error(results: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The worst max |x - exact| / max |exact| over the compared tensors, and that tensor's name."""
    if results.keys() != exact.keys():
        raise RuntimeError(f"compared tensors differ: {sorted(results.keys() ^ exact.keys())}")
    errors = {name: ((results[name].double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
              for name, expected in exact.items()}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


def compare_with_naive(workload: Workload) -> dict:
    """Checks outputs and gradients against the naive implementation with the same weights and batch.

    Both run in float64, where the comparison is tight: in float32 a deep network's gradients
    differ from the exact ones by several percent wherever a ReLU input sits near zero, for the
    naive implementation as much as for the others, so no float32 tolerance separates a bug from
    rounding. The kernels are the same code in both precisions.
    """
    def outputs_and_grads(impl: str) -> dict[str, torch.Tensor]:
        twin = Workload(dict(workload.config, impl=impl), workload.device, dtype=torch.float64)
        if not workload.seeded_weights:
            twin.model.load_state_dict(workload.model.state_dict())
        return twin.outputs_and_grads(CHECK_BATCH)

    exact = outputs_and_grads(BASELINE)
    error, worst = _max_rel_error(outputs_and_grads(workload.config["impl"]), exact)
    return {"max_rel_error": error, "worst_tensor": worst, "tensors": len(exact), "passed": error <= CHECK_TOLERANCE}


def compile_stats() -> dict:
    """What torch.compile did in this process since the counters were last cleared."""
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": sorted(counters["graph_break"]),
            "inductor_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "inductor_cache_misses": counters["inductor"]["fxgraph_cache_miss"]}


def forget_compilations() -> None:
    """Makes the next compilation in this process behave as the first one of a fresh process.

    Without it, dynamo would take the float64 batch of the correctness check for an earlier call
    of the same code with other shapes and compile the measured model with a dynamic batch size,
    which a user's process, compiling once, does not.
    """
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()


def warm_up(workload: Workload, warmup: int, device: torch.device) -> dict:
    """1 + `warmup` untimed steps: lazy initialisation, optimizer state, allocator pools and, for a
    compiled model, the compilation. Returns the first step's wall time and the compile statistics."""
    first = Timed(workload.step, device)
    first()
    for _ in range(warmup):
        workload.step()
    return {"first_step_s": first.samples[0], **({"compile": compile_stats()} if workload.compiled else {})}


def measure_memory(config: dict) -> dict:
    """Correctness check and peak memory of one configuration (run it in a fresh process)."""
    device = torch.device(config["device"])
    torch.set_num_threads(config["threads"])
    return_freed_memory_to_os()
    workload = Workload(config, device)
    check = compare_with_naive(workload) if config.get("check", True) and config["impl"] != BASELINE else None
    if check is not None and not check["passed"]:
        return {"check": check, "error": "correctness check against naive failed"}
    if workload.compiled:
        forget_compilations()
    warm = warm_up(workload, config["warmup"], device)
    peak = cuda_peak_bytes(workload.step, device) if device.type == "cuda" else cpu_peak_bytes(workload.step)
    if workload.compiled:
        warm["compile"]["graphs_after_measured_step"] = compile_stats()["graphs"]  # a recompile shows here
    return {"peak_bytes": peak, "check": check, **warm}


def measure_time(config: dict) -> dict:
    """Step times of one configuration (run it in a fresh process)."""
    device = torch.device(config["device"])
    torch.set_num_threads(config["threads"])
    workload = Workload(config, device)
    warm = warm_up(workload, config["warmup"], device)
    timed_step = Timed(workload.step, device)
    started = time.time()
    while len(timed_step.samples) < config["repeats"] or sum(timed_step.samples) < config.get("min_time_s", 0.0):
        timed_step()
    samples = timed_step.samples
    median = statistics.median(samples)
    times = {"median": median, "min": min(samples), "max": max(samples), "samples": samples,
             "first_step": warm["first_step_s"], "rounds": [{"started": started, "median": median}]}
    if workload.compiled:
        times["compile"] = dict(warm["compile"], graphs_after_timed_steps=compile_stats()["graphs"])
    return {"time_s": times}


def merge_rounds(earlier: dict, later: dict) -> dict:
    """One configuration's step times from rounds of time processes, as one set of samples; the first
    round's first step and compile statistics stay, and each round's start and median are listed."""
    samples = earlier["samples"] + later["samples"]
    return dict(earlier, samples=samples, median=statistics.median(samples), min=min(samples), max=max(samples),
                rounds=earlier["rounds"] + later["rounds"])


MEASUREMENTS = {"memory": measure_memory, "time": measure_time}


def measure_to_pipe(kind: str, config: dict, connection) -> None:
    """Process entry point: sends MEASUREMENTS[kind]'s result, or the error, back through `connection`."""
    # inductor's C++ builder logs "No CUDA runtime is found" in every compiling process of a CPU-only
    # machine, through the progress bar; it says nothing about the CPU measurement
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    gc.freeze()  # the fork server's imports are never garbage: each gc.collect() would walk them again (0.3 s)
    try:
        result = MEASUREMENTS[kind](config)
    except BaseException as error:  # report everything to the parent, which carries on with the next one
        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    connection.send(result)
    connection.close()
