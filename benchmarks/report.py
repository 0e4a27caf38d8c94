"""Turns measured records into tables (terminal and markdown), results.json and PNG plots."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .workloads import ALL_IMPLEMENTATIONS, BASELINE, describe

MIB = 2**20


def _ok(record: dict) -> bool:
    return "error" not in record["result"]


def _group_key(record: dict) -> tuple:
    return record["suite"], describe(record), record["memory_format"], record["mode"]


def _groups(records: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for record in records:
        groups[_group_key(record)].append(record)
    return groups


def _ratio(value: float | None, baseline: float | None) -> str:
    return f"{value / baseline:.2f}x" if value is not None and baseline else "-"


def _median(record: dict) -> float | None:
    return record["result"]["time_s"]["median"] if _ok(record) else None


def _peak(record: dict) -> float | None:
    return record["result"].get("peak_bytes")


def _check_text(record: dict) -> str:
    result = record["result"]
    check = result.get("check")
    if check is not None:
        return f"{'ok' if check['passed'] else 'FAIL'} (float64 error {check['max_rel_error']:.0e})"
    if "error" in result:
        return "ERROR: " + result["error"].splitlines()[0][:60]
    return "reference" if record["impl"] == BASELINE else "not checked"


def comparison_rows(group: list[dict]) -> list[list[str]]:
    """One row per implementation: memory and time, each also as a ratio to naive."""
    baseline = next((r for r in group if r["impl"] == BASELINE), None)
    base_peak = _peak(baseline) if baseline else None
    base_time = _median(baseline) if baseline and _ok(baseline) else None
    rows = []
    for record in sorted(group, key=lambda r: ALL_IMPLEMENTATIONS.index(r["impl"])):
        peak, median = _peak(record), _median(record)
        times = record["result"].get("time_s")
        rows.append([record["impl"],
                     f"{peak / MIB:.1f}" if peak is not None else "-", _ratio(peak, base_peak),
                     f"{median * 1e3:.1f}" if median is not None else "-",
                     f"{times['min'] * 1e3:.1f}-{times['max'] * 1e3:.1f}" if times else "-",
                     _ratio(median, base_time), _check_text(record)])
    return rows


COMPARISON_HEADERS = ["implementation", "peak MiB", "mem vs naive", "median ms", "min-max ms", "time vs naive",
                      "check"]


def depth_rows(records: list[dict], growth: int) -> tuple[list[str], list[list[str]]]:
    """Rows L, columns implementations: 'peak MiB / median ms'."""
    by_depth = defaultdict(dict)
    for record in records:
        if record["shape"]["growth"] == growth:
            by_depth[record["shape"]["num_layers"]][record["impl"]] = record
    impls = [i for i in ALL_IMPLEMENTATIONS if any(i in row for row in by_depth.values())]
    rows = []
    for layers in sorted(by_depth):
        cells = [str(layers)]
        for impl in impls:
            record = by_depth[layers].get(impl)
            peak, median = (_peak(record), _median(record)) if record else (None, None)
            cells.append(f"{peak / MIB:.0f} MiB / {median * 1e3:.0f} ms" if peak is not None and median is not None
                         else "ERROR" if record else "-")
        rows.append(cells)
    return ["L"] + [f"{impl} (peak / time)" for impl in impls], rows


SEARCH_LIMIT = 20  # the budget search looks up to this many times the deepest measured block


def deepest_within_budget(records: list[dict], budget_bytes: float) -> list[dict]:
    """Per growth rate and implementation: the deepest block whose peak memory fits the budget.

    Peak memory is fitted as a + b*L + c*L^2 (least squares over the measured depths; the
    naive block grows quadratically, ours linearly plus the quadratic but small parameter
    count) and solved for the budget. `measured` says whether that depth lies inside the
    measured range (interpolated) or beyond it (extrapolated).
    """
    import numpy as np
    points = defaultdict(list)
    for record in records:
        if record["suite"] == "depth" and _peak(record) is not None:
            points[(record["shape"]["growth"], record["impl"])].append((record["shape"]["num_layers"], _peak(record)))
    estimates = []
    for (growth, impl), measured in sorted(points.items(), key=lambda item: (item[0][0],
                                                                           ALL_IMPLEMENTATIONS.index(item[0][1]))):
        if len(measured) < 3:
            continue
        depths, peaks = map(np.asarray, zip(*sorted(measured)))
        fit = np.polynomial.Polynomial.fit(depths, peaks, 2)
        grid = np.arange(1, SEARCH_LIMIT * depths.max() + 1)
        fitting = grid[fit(grid) <= budget_bytes]
        deepest = int(fitting.max()) if fitting.size else 0
        estimates.append({"growth": growth, "impl": impl, "deepest_layers": deepest,
                          "measured": bool(deepest <= depths.max()), "beyond_search": bool(deepest == grid[-1]),
                          "measured_depths": depths.tolist(), "peaks_bytes": peaks.tolist()})
    return estimates


def budget_rows(estimates: list[dict]) -> list[list[str]]:
    naive = {e["growth"]: e["deepest_layers"] for e in estimates if e["impl"] == BASELINE}
    return [[str(e["growth"]), e["impl"], (">= " if e["beyond_search"] else "") + str(e["deepest_layers"]),
             "interpolated" if e["measured"] else "extrapolated",
             _ratio(e["deepest_layers"], naive.get(e["growth"]))] for e in estimates]


BUDGET_HEADERS = ["k", "implementation", "deepest L", "estimate", "depth vs naive"]


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def sections(records: list[dict], budget_bytes: float) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) for every table of the report."""
    tables = []
    for (suite, workload, memory_format, mode), group in _groups([r for r in records if r["suite"] != "depth"]).items():
        title = f"{suite}: {'training step' if mode == 'train' else 'inference'} of {workload}, {memory_format}"
        tables.append((title, COMPARISON_HEADERS, comparison_rows(group)))
    sweep = [r for r in records if r["suite"] == "depth"]
    for growth in sorted({r["shape"]["growth"] for r in sweep}):
        shape = next(r["shape"] for r in sweep if r["shape"]["growth"] == growth)
        title = (f"depth sweep: training step of one block, k={growth}, C0={shape['c0']}, N={shape['batch']}, "
                 f"{shape['size']}x{shape['size']}")
        headers, rows = depth_rows(sweep, growth)
        tables.append((title, headers, rows))
    estimates = deepest_within_budget(sweep, budget_bytes)
    if estimates:
        tables.append((f"depth sweep: deepest block whose training step fits in {budget_bytes / 2**30:g} GiB",
                       BUDGET_HEADERS, budget_rows(estimates)))
    return tables


def machine_line(machine: dict) -> str:
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    return (f"{machine['cpu']} ({machine['cores']} cores, {machine['threads']} threads{gpu}), torch {machine['torch']},"
            f" dense_ops {machine['dense_ops']} at {machine['git_commit'][:12]}")


def print_tables(tables) -> None:
    for title, headers, rows in tables:
        print(f"\n{title}\n{text_table(headers, rows)}")


def write_markdown(path: Path, tables, machine: dict, command: str) -> None:
    parts = [f"# dense-ops benchmark results\n\nMachine: {machine_line(machine)}\n\nCommand: `{command}`\n",
             "Peak memory: above the process baseline, one training step (forward + backward + SGD step) or one "
             "inference forward, measured in a fresh process per row, freed memory returned to the OS at once. "
             "Time: median of the repetitions, with min-max, in another fresh process with the default "
             "allocator.\n"]
    parts += [f"## {title}\n\n{markdown_table(headers, rows)}\n" for title, headers, rows in tables]
    path.write_text("\n".join(parts))


def write_json(path: Path, records: list[dict], machine: dict, options: dict, budget_bytes: float) -> None:
    sweep = [r for r in records if r["suite"] == "depth"]
    payload = {"machine": machine, "options": options, "records": records,
               "memory_budget": {"bytes": budget_bytes, "deepest": deepest_within_budget(sweep, budget_bytes)}}
    path.write_text(json.dumps(payload, indent=1))
