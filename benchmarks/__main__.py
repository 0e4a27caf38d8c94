"""python -m benchmarks [--quick | --full | --smoke] [--device cpu|cuda] [--out DIR] [--only SUITE ...]

Measures peak memory and time of dense blocks and DenseNets with the naive torch.cat
implementation, torchvision's checkpointing (memory_efficient=True) and dense_ops at
each recompute level, prints tables with ratios against naive and writes
results.json, results.md and PNG plots to --out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from . import depth_search, plots, report, runner
from .suites import SIZES, SUITES
from .workloads import ALL_IMPLEMENTATIONS, MEMORY_FORMATS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="size", action="store_const", const="quick", default="quick",
                      help="the default set: under 3 minutes on 2 quiet CPU cores once inductor's cache holds "
                           "its compiled graphs (the first run compiles them: minutes more)")
    size.add_argument("--full", dest="size", action="store_const", const="full",
                      help="issue 2's batch sizes, every suite, format and compile row, deeper sweeps, the "
                           "measured depth search: hours on 2 cores")
    size.add_argument("--smoke", dest="size", action="store_const", const="smoke",
                      help="tiny sizes, seconds per configuration: checks the machinery, figures mean little")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<machine-id>/)")
    parser.add_argument("--only", nargs="+", choices=sorted(SUITES), metavar="SUITE",
                        help=f"run only these suites: {', '.join(SUITES)} (default: every one, but --quick runs "
                             f"{', '.join(SIZES['quick']['suites'])})")
    parser.add_argument("--impls", nargs="+", choices=ALL_IMPLEMENTATIONS, metavar="IMPL",
                        help=f"run only these implementations: {', '.join(ALL_IMPLEMENTATIONS)}")
    parser.add_argument("--formats", nargs="+", choices=sorted(MEMORY_FORMATS), metavar="FORMAT",
                        help="run only these memory formats: contiguous, channels_last")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per configuration (default 10)")
    parser.add_argument("--rounds", type=int,
                        help="rounds the timed steps are split into, each a fresh process per configuration, every "
                             "configuration once per round, so that a host's drift during the run reaches every "
                             "row alike (default 2 with --full, else 1)")
    parser.add_argument("--min-time", type=float,
                        help="seconds of timed steps each time process takes at least: a fast step (CondenseNet "
                             "at batch 1) is timed more than --repeats times, so that a short spell of a shared "
                             "host's contention is not half its samples (default 1 with --full and --quick, 0 "
                             "with --smoke)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up steps besides the first one "
                                                   "(default 2 full, else 0)")
    parser.add_argument("--threads", type=int, default=runner.available_cores(),
                        help="torch threads (default: the cores available, %(default)s here)")
    parser.add_argument("--budget-gib", type=float, help="memory budget of the depth search "
                                                         "(default 2; 1/64 with --smoke)")
    parser.add_argument("--depth-search", action=argparse.BooleanOptionalAction,
                        help="search the deepest block within the budget by measurement (default: --full and "
                             "--smoke; --quick reports only a quadratic fit, labelled as such)")
    parser.add_argument("--sweep-timing", action=argparse.BooleanOptionalAction,
                        help="time the depth sweep's rows (default: --full and --smoke; without it the sweep "
                             "and the search measure memory only)")
    parser.add_argument("--busy", type=int, default=0,
                        help="processes that each keep a core busy while every row runs: a shared machine "
                             "(default 0; the tables say how many)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per configuration")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.size == "full" else 0)
    args.rounds = args.rounds if args.rounds is not None else SIZES[args.size]["rounds"]
    args.min_time = args.min_time if args.min_time is not None else SIZES[args.size]["min_time_s"]
    if args.budget_gib is None:
        args.budget_gib = SIZES[args.size]["budget_gib"]
    if args.depth_search is None:
        args.depth_search = SIZES[args.size]["sweep"]["search"]
    if args.sweep_timing is None:
        args.sweep_timing = SIZES[args.size]["sweep"]["timed"]
    for name in ("repeats", "rounds", "threads", "budget_gib", "timeout"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.rounds > args.repeats:
        parser.error(f"--rounds ({args.rounds}) must not exceed --repeats ({args.repeats}): every round times a step")
    if args.busy < 0:
        parser.error(f"--busy must be >= 0, got {args.busy}")
    if args.min_time < 0:
        parser.error(f"--min-time must be >= 0, got {args.min_time}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device is available", file=sys.stderr)
            return 2
    machine = runner.machine_info(args.device, args.threads, args.busy)
    out = args.out or runner.REPO_ROOT / "benchmarks" / "results" / runner.machine_id(machine)
    out.mkdir(parents=True, exist_ok=True)
    configs = [config for name in (args.only or SIZES[args.size]["suites"]) for config in SUITES[name](args)]
    print(f"{len(configs)} configurations on {report.machine_line(machine)}", file=sys.stderr)

    budget = args.budget_gib * 2**30
    with runner.busy_processes(args.busy):
        records = runner.run_all(configs, args.timeout)
        if args.depth_search and any(r["suite"] == "depth" for r in records):
            records += depth_search.run_searches(records, budget, args.timeout)

    options = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    report.write_json(out / "results.json", records, machine, options, budget)  # first: the raw figures
    tables = report.sections(records, budget)
    report.print_tables(tables, machine)
    command = "python -m benchmarks " + shlex.join(argv if argv is not None else sys.argv[1:])
    report.write_markdown(out / "results.md", tables, machine, command.strip())
    print(f"\n{report.cost_line(records)}", file=sys.stderr)
    written = plots.write_plots(out, records, budget)
    print(f"\nwrote {out / 'results.json'}, {out / 'results.md'} and {len(written)} plots to {out}")
    failed = [r for r in records if "error" in r["result"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
