"""Turns measured records into tables (terminal and markdown), results.json and PNG plots."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .workloads import ALL_IMPLEMENTATIONS, BASELINE, COMPILED, FUSED_CONDENSENET, describe, split_compiled

MIB = 2**20


def size_text(size_bytes: float) -> str:
    """'2 GiB', '16 MiB': a memory budget as people write it."""
    return f"{size_bytes / 2**30:g} GiB" if size_bytes >= 2**30 else f"{size_bytes / MIB:g} MiB"


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
    """The median step time; None for a failed or memory-only configuration."""
    times = record["result"].get("time_s")
    return times["median"] if times and _ok(record) else None


def _peak(record: dict) -> float | None:
    return record["result"].get("peak_bytes")


def _check_text(record: dict) -> str:
    """The float64 check's outcome, or the error that stopped the row (of either process)."""
    result = record["result"]
    check = result.get("check")
    if "error" in result and (check is None or check["passed"]):
        return "ERROR: " + result["error"].splitlines()[0][:60]
    if check is not None:
        return f"{'ok' if check['passed'] else 'FAIL'} (float64 error {check['max_rel_error']:.0e})"
    if record["impl"] == BASELINE:
        return "reference"
    return "not checked: " + record.get("unchecked_because", "no reason recorded")


def _compile_text(record: dict) -> str:
    """A compiled row's first step (compilation included) in the memory process, and what it compiled."""
    result = record["result"]
    times = result.get("time_s") or {}
    stats = result.get("compile") or times.get("compile")  # the time process's when memory was not measured
    if stats is None:
        return "-"
    cache = "cold" if stats["inductor_cache_misses"] else "inductor cache hit"
    notes = [f"{stats['graphs']} graph{'s' if stats['graphs'] != 1 else ''}"]
    if stats["graph_breaks"]:
        notes.append(f"{stats['graph_breaks']} graph breaks")
    later = stats.get("graphs_after_measured_step", stats.get("graphs_after_timed_steps"))
    if later != stats["graphs"]:
        notes.append("recompiled after the first step")
    first_step = result.get("first_step_s", times.get("first_step"))
    return f"{first_step:.1f} s, {cache} ({', '.join(notes)})"


def comparison_table(group: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per implementation: memory and time, each also as a ratio to naive; with compiled rows,
    the time against torch.compile(naive) too and the compile column; with the fused CondenseNet, how
    much faster it is than each row."""
    baseline = next((r for r in group if r["impl"] == BASELINE), None)
    compiled_naive = next((r for r in group if r["impl"] == COMPILED_BASELINE), None)
    fused = next((r for r in group if r["impl"] == FUSED_CONDENSENET), None)
    fused_time = _median(fused) if fused else None
    base_peak = _peak(baseline) if baseline else None
    base_time = _median(baseline) if baseline else None
    compiled_time = _median(compiled_naive) if compiled_naive else None
    any_compiled = any(split_compiled(r["impl"])[1] for r in group)
    headers = (COMPARISON_HEADERS + (COMPILE_HEADERS if any_compiled else [])
               + ([FUSED_SPEEDUP_HEADER] if fused else []) + ["check"])
    rows = []
    for record in sorted(group, key=lambda r: ALL_IMPLEMENTATIONS.index(r["impl"])):
        peak, median = _peak(record), _median(record)
        times = record["result"].get("time_s")
        row = [record["impl"], f"{peak / MIB:.1f}" if peak is not None else "-", _ratio(peak, base_peak),
               f"{median * 1e3:.1f}" if median is not None else "-",
               f"{times['min'] * 1e3:.1f}-{times['max'] * 1e3:.1f}" if times else "-", _ratio(median, base_time)]
        if any_compiled:
            row += [_ratio(median, compiled_time), _compile_text(record)]
        if fused:
            row.append(_ratio(median, fused_time))
        rows.append(row + [_check_text(record)])
    return headers, rows


COMPARISON_HEADERS = ["implementation", "peak MiB", "mem vs naive", "median ms", "min-max ms", "time vs naive"]
COMPILE_HEADERS = ["time vs naive+compile", "compile: 1st step"]
FUSED_SPEEDUP_HEADER = f"{FUSED_CONDENSENET} faster by"
COMPILED_BASELINE = BASELINE + COMPILED


def _depth_cell(record: dict | None) -> str:
    """'433 MiB / 1907 ms (1850-1990)', or '433 MiB' for a memory-only row."""
    if record is None:
        return "-"
    if not _ok(record):
        return "ERROR: " + record["result"]["error"].splitlines()[0][:40]
    times = record["result"].get("time_s")
    if times is None:
        return f"{_peak(record) / MIB:.0f} MiB"
    return (f"{_peak(record) / MIB:.0f} MiB / {times['median'] * 1e3:.0f} ms "
            f"({times['min'] * 1e3:.0f}-{times['max'] * 1e3:.0f})")


def depth_rows(records: list[dict], growth: int) -> tuple[list[str], list[list[str]]]:
    """Rows L, columns implementations: 'peak MiB / median ms (min-max)', or 'peak MiB' when untimed."""
    by_depth = defaultdict(dict)
    for record in records:
        if record["shape"]["growth"] == growth:
            by_depth[record["shape"]["num_layers"]][record["impl"]] = record
    impls = [i for i in ALL_IMPLEMENTATIONS if any(i in row for row in by_depth.values())]
    rows = [[str(layers)] + [_depth_cell(by_depth[layers].get(impl)) for impl in impls] for layers in sorted(by_depth)]
    timed = any("time_s" in r["result"] for r in records)
    return ["L"] + [f"{impl} ({'peak / median ms (min-max)' if timed else 'peak'})" for impl in impls], rows


SEARCH_LIMIT = 20  # the budget search looks up to this many times the deepest measured block


def deepest_within_budget(records: list[dict], budget_bytes: float) -> list[dict]:
    """Per growth rate and implementation: the deepest block whose peak memory fits the budget, by a
    fit, not a measurement (benchmarks.depth_search measures it).

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


def _fit_text(estimate: dict) -> str:
    return ((">= " if estimate["beyond_search"] else "") + str(estimate["deepest_layers"])
            + (" (interpolated)" if estimate["measured"] else " (extrapolated)"))


def fit_rows(estimates: list[dict]) -> list[list[str]]:
    naive = {e["growth"]: e["deepest_layers"] for e in estimates if e["impl"] == BASELINE}
    return [[str(e["growth"]), e["impl"], _fit_text(e), _ratio(e["deepest_layers"], naive.get(e["growth"]))]
            for e in estimates]


FIT_HEADERS = ["k", "implementation", "deepest L: quadratic fit, not measured", "fit vs naive"]


def measured_deepest(records: list[dict], budget_bytes: float) -> list[dict]:
    """Per growth rate and implementation, over every measured depth (sweep and search): the deepest
    L whose peak fits the budget and the shallowest deeper L that did not fit or failed."""
    points = defaultdict(dict)
    for record in records:
        if record["suite"] == "depth":
            points[(record["shape"]["growth"], record["impl"])][record["shape"]["num_layers"]] = record
    found = []
    for (growth, impl), by_depth in sorted(points.items(), key=lambda item: (item[0][0],
                                                                           ALL_IMPLEMENTATIONS.index(item[0][1]))):
        fitting = [layers for layers, r in by_depth.items() if _peak(r) is not None and _peak(r) <= budget_bytes]
        fits = max(fitting, default=0)
        over = min((layers for layers in by_depth if layers > fits and layers not in fitting), default=None)
        found.append({"growth": growth, "impl": impl, "deepest_fitting": fits,
                      "deepest_fitting_peak_bytes": _peak(by_depth[fits]) if fits else None,
                      "shallowest_over": over, "shallowest_over_peak_bytes": _peak(by_depth[over]) if over else None,
                      "shallowest_over_error": by_depth[over]["result"].get("error") if over else None,
                      "searched_depths": sorted(layers for layers, r in by_depth.items() if r.get("search"))})
    return found


def _over_text(found: dict) -> str:
    if found["shallowest_over"] is None:
        return "none measured"
    if found["shallowest_over_error"]:
        return f"{found['shallowest_over']}: ERROR {found['shallowest_over_error'].splitlines()[0][:40]}"
    return f"{found['shallowest_over']} ({found['shallowest_over_peak_bytes'] / MIB:.1f} MiB)"


def measured_rows(found: list[dict], estimates: list[dict]) -> list[list[str]]:
    naive = {f["growth"]: f["deepest_fitting"] for f in found if f["impl"] == BASELINE}
    fits = {(e["growth"], e["impl"]): _fit_text(e) for e in estimates}
    return [[str(f["growth"]), f["impl"],
             f"{f['deepest_fitting']} ({f['deepest_fitting_peak_bytes'] / MIB:.1f} MiB)" if f["deepest_fitting"]
             else "none", _over_text(f), _ratio(f["deepest_fitting"], naive.get(f["growth"])),
             ", ".join(map(str, f["searched_depths"])) or "-", fits.get((f["growth"], f["impl"]), "-")]
            for f in found]


MEASURED_HEADERS = ["k", "implementation", "deepest L that fits (peak)", "shallowest L over (peak)",
                    "depth vs naive", "depths the search measured", "quadratic fit of the sweep (not measured)"]


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def _steps_note(records: list[dict]) -> str:
    """How the rows of one table were measured: timed steps, warm-up."""
    timed = [r for r in records if "time_s" in r["result"]]
    warmup = sorted({r["warmup"] for r in records})
    warm = f"after 1 untimed step + {'/'.join(map(str, warmup))} warm-up"
    if not timed:
        return f"peak memory of one step {warm}; not timed"
    counts = sorted({len(r["result"]["time_s"]["samples"]) for r in timed})
    steps = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    rounds = max(len(r["result"]["time_s"]["rounds"]) for r in timed)
    spread = (f", in {rounds} rounds (each a fresh process per row, every row once per round; the warm-up in each)"
              if rounds > 1 else "")
    return f"time: median and min-max of {steps} timed steps {warm}{spread}"


def sections(records: list[dict], budget_bytes: float) -> list[dict]:
    """{title, note, headers, rows} for every table of the report."""
    tables = []
    for (suite, workload, memory_format, mode), group in _groups([r for r in records if r["suite"] != "depth"]).items():
        title = f"{suite}: {'training step' if mode == 'train' else 'inference'} of {workload}, {memory_format}"
        headers, rows = comparison_table(group)
        tables.append({"title": title, "note": _steps_note(group), "headers": headers, "rows": rows})
    sweep = [r for r in records if r["suite"] == "depth" and not r.get("search")]
    for growth in sorted({r["shape"]["growth"] for r in sweep}):
        shape = next(r["shape"] for r in sweep if r["shape"]["growth"] == growth)
        title = (f"depth sweep: training step of one block, k={growth}, C0={shape['c0']}, N={shape['batch']}, "
                 f"{shape['size']}x{shape['size']}")
        headers, rows = depth_rows([r for r in sweep if r["shape"]["growth"] == growth], growth)
        tables.append({"title": title, "note": _steps_note(sweep), "headers": headers, "rows": rows})
    tables += budget_sections(records, budget_bytes)
    return tables


def _searched(records: list[dict]) -> bool:
    return any(r.get("search") for r in records)


def budget_sections(records: list[dict], budget_bytes: float) -> list[dict]:
    """The measured search's table if the search ran, else the quadratic fit's, labelled as not measured."""
    depth = [r for r in records if r["suite"] == "depth"]
    estimates = deepest_within_budget([r for r in depth if not r.get("search")], budget_bytes)
    budget = size_text(budget_bytes)
    if _searched(depth):
        found = measured_deepest(depth, budget_bytes)
        return [{"title": f"depth search: deepest block whose training step fits in {budget}, measured",
                 "note": "every depth measured (peak of one step after 1 untimed step); the search grows L, then "
                         "bisects to within 5% or one layer", "headers": MEASURED_HEADERS,
                 "rows": measured_rows(found, estimates)}]
    if not estimates:
        return []
    return [{"title": f"depth sweep: deepest block within {budget} by a quadratic fit of the sweep's peaks "
                      "(fit, not measured)",
             "note": "an extrapolation, not a measurement: `--depth-search` (the default of --full) measures it",
             "headers": FIT_HEADERS, "rows": fit_rows(estimates)}]


def machine_line(machine: dict) -> str:
    gpu = f", GPU {machine['gpu']}" if machine["gpu"] else ""
    commit = machine["git_commit"]
    commit = commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")  # uncommitted changes were measured
    busy = machine.get("busy_processes", 0)  # absent from results written before --busy existed
    beside = f", beside {busy} busy process{'es' if busy > 1 else ''}" if busy else ""
    return (f"{machine['cpu']} ({machine['cores']} cores, {machine['threads']} threads{gpu}{beside}), "
            f"torch {machine['torch']}, dense_ops {machine['dense_ops']} at {commit}")


def print_tables(tables: list[dict], machine: dict) -> None:
    for table in tables:
        print(f"\n{table['title']}\n{machine_line(machine)}; {table['note']}\n"
              f"{text_table(table['headers'], table['rows'])}")


def write_markdown(path: Path, tables: list[dict], machine: dict, command: str) -> None:
    parts = [f"# dense-ops benchmark results\n\nMachine: {machine_line(machine)}\n\nCommand: `{command}`\n",
             "Peak memory: above the process baseline, one training step (forward + backward + SGD step) or one "
             "inference forward, measured in a fresh process per row, freed memory returned to the OS at once. "
             "Time: median of the timed steps, with min-max, in another fresh process with the default "
             "allocator. `+compile`: torch.compile, default mode (inductor); its compilation happens in the "
             "first, untimed step, whose wall time is the compile column (cold: inductor compiled the graphs; "
             "cache hit: it loaded them from its on-disk cache).\n"]
    parts += [f"## {t['title']}\n\n{machine_line(machine)}; {t['note']}\n\n{markdown_table(t['headers'], t['rows'])}\n"
              for t in tables]
    path.write_text("\n".join(parts))


def write_json(path: Path, records: list[dict], machine: dict, options: dict, budget_bytes: float) -> None:
    depth = [r for r in records if r["suite"] == "depth"]
    sweep = [r for r in depth if not r.get("search")]
    payload = {"machine": machine, "options": options, "records": records,
               "memory_budget": {"bytes": budget_bytes, "fit_not_measured": deepest_within_budget(sweep, budget_bytes),
                                 "measured": measured_deepest(depth, budget_bytes) if _searched(depth) else None}}
    path.write_text(json.dumps(payload, indent=1))


def cost_line(records: list[dict]) -> str:
    """Wall seconds of the measuring processes per suite: what a run of this set costs here."""
    wall = defaultdict(float)
    for record in records:
        wall[record["suite"] + (" search" if record.get("search") else "")] += sum(
            record["result"].get("wall_s", {}).values())
    return "wall seconds of the measuring processes: " + ", ".join(
        f"{suite} {seconds:.0f}" for suite, seconds in wall.items()) + f"; total {sum(wall.values()):.0f}"
