"""The depth suite's budget search: the deepest dense block whose training step, measured, fits
in the memory budget.

For each growth rate and implementation it starts from the depth sweep's measured peaks: the
deepest listed L that fits and, if one exceeded the budget, the shallowest that did. While no
measured L exceeds the budget it grows L, at most doubling it; then it bisects between the
deepest L that fits and the shallowest that does not, until they are within TOLERANCE (or one
layer) of each other. Every point is a real measurement (memory only: one untimed step, then
the peak of the next one, no correctness check), in its own process, like every configuration.

The growth factor is sqrt(budget / peak), between 1 + TOLERANCE and 2: a block's peak grows at
most quadratically with L (activations and parameter gradients), so that step cannot pass the
budget until the steps are TOLERANCE small. Plain doubling would: at 8x8, N=8, k=12 a dense_ops
block fits about 1200 layers in 2 GiB (its 1.6 GiB of weight gradients are most of the peak), and
a doubled 2400-layer block has 1.7 billion weights, some 21 GB with their momentum and gradients.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict

from . import runner
from .report import size_text
from .workloads import ALL_IMPLEMENTATIONS

TOLERANCE = 0.05
MAX_GROWTH = 2.0
MAX_POINTS = 24  # per growth rate and implementation; a search that needs more stops and says so


def run_searches(records: list[dict], budget_bytes: float, timeout_s: float) -> list[dict]:
    """The search's records for every growth rate and implementation of the depth sweep."""
    sweeps = defaultdict(list)
    for record in records:
        if record["suite"] == "depth":
            sweeps[(record["shape"]["growth"], record["impl"])].append(record)
    found = []
    for growth, impl in sorted(sweeps, key=lambda key: (key[0], ALL_IMPLEMENTATIONS.index(key[1]))):
        found += search(sweeps[(growth, impl)], budget_bytes, timeout_s)
    return found


def search(sweep: list[dict], budget_bytes: float, timeout_s: float) -> list[dict]:
    """Measures blocks of new depths, shaped like the sweep's (one growth rate and implementation)."""
    peaks = {r["shape"]["num_layers"]: r["result"].get("peak_bytes") for r in sweep}  # None: failed
    records = []
    while len(records) < MAX_POINTS:
        fits, over = bracket(peaks, budget_bytes)
        if fits == 0 and over is None:
            break  # every listed depth failed: nothing to start from (the sweep's table shows the errors)
        if over is not None and over - fits <= max(1, int(TOLERANCE * fits)):
            break
        layers = next_depth(fits, peaks.get(fits), over, budget_bytes)
        records.append(measure_depth(sweep[0], layers, timeout_s))
        peaks[layers] = records[-1]["result"].get("peak_bytes")
        _report_point(records[-1], budget_bytes)
    return records


def bracket(peaks: dict[int, float | None], budget_bytes: float) -> tuple[int, int | None]:
    """(deepest L that fits or 0, shallowest deeper L that does not fit or None); a failed
    measurement counts as not fitting."""
    fitting = [layers for layers, peak in peaks.items() if peak is not None and peak <= budget_bytes]
    fits = max(fitting, default=0)
    over = [layers for layers, peak in peaks.items() if layers > fits and (peak is None or peak > budget_bytes)]
    return fits, min(over, default=None)


def next_depth(fits: int, fits_peak: float | None, over: int | None, budget_bytes: float) -> int:
    if over is not None:
        return (fits + over) // 2
    growth = min(MAX_GROWTH, max(1 + TOLERANCE, math.sqrt(budget_bytes / max(fits_peak or 0, 1))))
    return max(fits + 1, math.ceil(fits * growth))


def measure_depth(template: dict, layers: int, timeout_s: float) -> dict:
    config = dict(template, shape=dict(template["shape"], num_layers=layers), search=True, timed=False,
                  check=False, unchecked_because="depth search point", warmup=0)
    config.pop("result", None)
    return dict(config, result=runner.run_one(config, timeout_s))


def _report_point(record: dict, budget_bytes: float) -> None:
    result, shape = record["result"], record["shape"]
    if "error" in result:
        outcome = f"FAILED: {result['error']}"
    else:
        fits = "fits" if result["peak_bytes"] <= budget_bytes else "exceeds"
        outcome = f"peak {result['peak_bytes'] / 2**20:.0f} MiB, {fits} {size_text(budget_bytes)}"
    print(f"depth search k={shape['growth']} {record['impl']}: L={shape['num_layers']} {outcome} "
          f"({result['wall_s']['memory']:.0f} s)", file=sys.stderr, flush=True)
