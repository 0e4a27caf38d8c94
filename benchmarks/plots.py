"""PNG plots: memory and time against depth, and per-implementation bars for every suite."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .report import MIB, _groups, _median, _peak, size_text
from .workloads import ALL_IMPLEMENTATIONS

COLORS = dict(zip(ALL_IMPLEMENTATIONS, ("tab:red", "tab:pink", "silver", "gainsboro", "tab:orange", "tab:blue",
                                        "tab:cyan", "tab:green", "tab:olive", "tab:brown", "tab:purple", "tab:gray",
                                        "black"),
                  strict=True))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _sweep_series(records: list[dict], value) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """growth -> impl -> sorted [(L, value)] over the depth sweep's successful records."""
    series = defaultdict(lambda: defaultdict(list))
    for record in records:
        if record["suite"] == "depth" and value(record) is not None:
            series[record["shape"]["growth"]][record["impl"]].append((record["shape"]["num_layers"], value(record)))
    return {growth: {impl: sorted(points) for impl, points in by_impl.items()} for growth, by_impl in series.items()}


def _plot_sweep(path: Path, series, ylabel: str, scale: float, budget: float | None) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
    for axis, growth in zip(axes[0], sorted(series)):
        largest = max(value for points in series[growth].values() for _, value in points)
        for impl in ALL_IMPLEMENTATIONS:
            if impl in series[growth]:
                depths, values = zip(*series[growth][impl])
                axis.plot(depths, [v / scale for v in values], "o-", color=COLORS[impl], label=impl)
        if budget is not None and budget <= 1.5 * largest:  # else the line would flatten the curves
            axis.axhline(budget / scale, color="gray", linestyle="--", label=f"budget {size_text(budget)}")
        axis.set_title(f"one dense block, growth rate k={growth}")
        axis.set_xlabel("layers L")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_bars(path: Path, title: str, groups: dict[str, list[dict]]) -> None:
    """Peak memory and median time per implementation, one bar cluster per memory format."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = list(groups)
    impls = [i for i in ALL_IMPLEMENTATIONS if any(r["impl"] == i for group in groups.values() for r in group)]
    width = 0.8 / len(impls)
    for axis, value, scale, ylabel in ((axes[0], _peak, MIB, "peak memory above baseline (MiB)"),
                                       (axes[1], _median, 1e-3, "median step time (ms)")):
        for index, impl in enumerate(impls):
            heights = [next((value(r) / scale for r in groups[label] if r["impl"] == impl and value(r) is not None),
                            0.0) for label in labels]
            if any(heights):
                positions = [x + (index - (len(impls) - 1) / 2) * width for x in range(len(labels))]
                axis.bar(positions, heights, width, color=COLORS[impl], label=impl)
        axis.set_xticks(range(len(labels)), labels)
        axis.set_ylabel(ylabel)
        axis.grid(True, axis="y", alpha=0.3)
    axes[0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_plots(out: Path, records: list[dict], budget: float) -> list[Path]:
    """Writes memory_vs_depth.png, time_vs_depth.png and bars_<suite>_<workload>.png; returns the paths."""
    written = []
    memory = _sweep_series(records, _peak)
    if memory:
        written.append(out / "memory_vs_depth.png")
        _plot_sweep(written[-1], memory, "peak memory above baseline (MiB)", MIB, budget)
    times = _sweep_series(records, _median)
    if times:
        written.append(out / "time_vs_depth.png")
        _plot_sweep(written[-1], times, "median training-step time (s)", 1.0, None)
    by_workload = defaultdict(dict)
    for (suite, workload, memory_format, mode), group in _groups(records).items():
        if suite != "depth":
            by_workload[(suite, workload, mode)][memory_format] = group
    for (suite, workload, mode), groups in by_workload.items():
        name = f"bars_{suite}_{workload.split()[0].lower()}.png"
        written.append(out / name)
        _plot_bars(written[-1], f"{suite}: {'training step' if mode == 'train' else 'inference'} of {workload}",
                   groups)
    return written
