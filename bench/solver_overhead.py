"""`solver-overhead`: summarise the pytest-benchmark report of bench/speed/test_solver_overhead.py.

`make bench` runs the benchmarks with `--benchmark-json` and then this command, which turns each
benchmark's timings into microseconds per step (the run's time / extra_info["steps"]) and writes
bench/results/solver-overhead.csv and .json. The JSON's meta holds the provenance of the
measurement (added to the report by bench/speed/conftest.py), pytest-benchmark's own machine and
commit info, and the provenance of this summary.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import provenance

from .arguments import options_of
from .errors import BenchError

NAME = "solver-overhead"
RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("loop", "sample")  # the order of the printed columns
STATS = ("median", "min", "mean", "stddev", "iqr")

COLUMNS = (
    "solver",
    "group",
    "params",
    "steps",
    "nfe",
    *(f"us_per_step_{stat}" for stat in STATS),
    "us_per_call_median",
    "rounds",
    "iterations",
    "shape",
    "dtype",
    "denoiser",
    "torch_threads",
    "allocator",
    "benchmark",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="summarise the solver-overhead pytest-benchmark JSON into microseconds per step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--raw", type=Path, required=True, help="the pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: bench/results)")
    parser.set_defaults(handler=run)


def load_report(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except FileNotFoundError:
        raise BenchError(f"--raw={str(path)!r} does not exist: run `make bench` (pytest bench/speed) first") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"--raw={str(path)!r} is not a readable JSON file: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("benchmarks"), list):
        raise BenchError(f"--raw={str(path)!r} is not a pytest-benchmark report: expected a 'benchmarks' list")
    return report


def summarise(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per solver benchmark of the report; others (no extra_info['solver']) are skipped."""
    rows = []
    for bench in report["benchmarks"]:
        info = bench.get("extra_info", {})
        if "solver" not in info:
            continue
        steps, nfe, stats = info["steps"], info["nfe"], bench["stats"]
        row = {
            "solver": info["solver"],
            "group": info.get("group", bench.get("group")),
            "params": info.get("params"),
            "steps": steps,
            "nfe": nfe,
        }
        row |= {f"us_per_step_{stat}": stats[stat] * 1e6 / steps for stat in STATS}
        row |= {
            "us_per_call_median": stats["median"] * 1e6 / nfe,
            "rounds": stats["rounds"],
            "iterations": stats.get("iterations"),
            "shape": "x".join(str(n) for n in info.get("shape", [])),
            "dtype": info.get("dtype"),
            "denoiser": info.get("denoiser"),
            "torch_threads": info.get("torch_threads"),
            "allocator": info.get("allocator"),
            "benchmark": bench.get("fullname", bench.get("name")),
        }
        rows.append(row)
    if not rows:
        raise BenchError("the report has no solver benchmarks (extra_info['solver']): was it made by bench/speed?")
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Median microseconds per step per solver, one column per group, IQR beside it."""
    table: dict[str, dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        table.setdefault(row["solver"], {})[row["group"]] = row
    groups = [g for g in GROUPS if any(g in by_group for by_group in table.values())]
    width = max(len("solver"), *(len(name) for name in table))
    first = rows[0]
    lines = [
        f"Solver overhead, µs per step (median, ± IQR): zero-cost denoiser, {first['shape']} {first['dtype']}, "
        f"{first['steps']} steps per run, {first['torch_threads']} torch threads",
        "solver".ljust(width) + f"{'calls/step':>11}" + "".join(f"{group:>22}" for group in groups),
    ]
    for name, by_group in table.items():
        any_row = next(iter(by_group.values()))
        cells = ""
        for group in groups:
            cell = by_group.get(group)
            cells += (
                f"{'-':>22}"
                if cell is None
                else f"{cell['us_per_step_median']:>13.1f} ± {cell['us_per_step_iqr']:<6.1f}"
            )
        lines.append((name.ljust(width) + f"{any_row['nfe'] / any_row['steps']:>11g}" + cells).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    report = load_report(args.raw)
    rows = summarise(report)
    meta = {
        "measurement": report.get("provenance"),
        "pytest_benchmark": {key: report.get(key) for key in ("version", "datetime", "machine_info", "commit_info")},
        "source": str(args.raw),
        "summary": provenance.collect(options_of(args)),
    }
    written = [
        provenance.write_csv(args.out / "solver-overhead.csv", rows, COLUMNS),
        provenance.write_json(args.out / "solver-overhead.json", meta, rows),
    ]
    print(format_table(rows))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0
