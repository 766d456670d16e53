"""`report`: regenerate the README's results section (tables and plot) from committed sweep results.

    python -m bench report            # rewrites README.md between the bench-report markers
    python -m bench report --check    # exit 1 when README.md is not what the results say

Reads every `bench/results/fd-vs-nfe-*/results.json` (rows in the shared schema). For each tier
it writes the in-domain FD, the reference RMSE and the class accuracy by solver (rows) and NFE
(columns) on the polynomial schedule, then each solver on its best schedule of those measured
(lowest mean log rmse_ref over the NFE both schedules reached), then the rows on other settings
(AFS, `time_uniform`), where AMED's rows sit beside the training-free solvers they compete with,
with each predictor's training cost, and redraws `bench/results/fd-vs-nfe.png`,
`fd-vs-nfe-other.png` and each `step-error-*/step-error.png` from its JSON. Each
`amed-ablation-*/results.json` becomes a table of its variants.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import solvers
from solvers.amed import MULTISTEP

from . import step_error
from .errors import BenchError
from .sweep import plot

NAME = "report"
START, END = "<!-- bench-report:start -->", "<!-- bench-report:end -->"
RESULTS = Path("bench/results")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="regenerate the README's results tables and plot from bench/results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when out of date")
    parser.set_defaults(handler=run)


def load_rows(results: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows: list[dict[str, Any]] = []
    commands: list[str] = []
    for path in sorted(results.glob("fd-vs-nfe-*/results.json")):
        document = json.loads(path.read_text())
        rows.extend(r for r in document["rows"] if r.get("reachable"))
        commands.append(f"{document['meta']['command']}  # {path.parent.name}, git {_short(document['meta'])}")
    return rows, commands


def _short(meta: dict[str, Any]) -> str:
    revision = (meta.get("git") or {}).get("revision") or "unknown"
    return str(revision)[:10]


def _cell(value: float | None, best: bool) -> str:
    if value is None:
        return "–"
    text = f"{value:.3g}" if value < 100 else f"{value:.0f}"
    return f"**{text}**" if best else text


def solver_name(row: dict[str, Any]) -> str:
    """The solver, and for an AMED plugin its base with the base's order limit."""
    given = json.loads(row.get("solver_params") or "{}")
    if not row.get("base") or row["base"] == row["solver"]:  # parameters shown where not the defaults
        shown = ", ".join(f"{key} {value}" for key, value in sorted(given.items()))
        return f"{row['solver']} ({shown})" if shown else str(row["solver"])
    params = solvers.SOLVERS.get(row["solver"]).parse_params(given)
    order = f", order {params.order_limit()}" if row["base"] in MULTISTEP and hasattr(params, "order_limit") else ""
    return f"{row['solver']} ({row['base']}{order})"


def other_name(row: dict[str, Any]) -> str:
    """A line of the other-settings table: solver (with an AMED plugin's base), schedule (a learned
    one with its method), AFS."""
    schedule = row["schedule"]
    if schedule == "learned":
        schedule += f" ({json.loads(row.get('schedule_params') or '{}').get('method', 'gits')})"
    return f"{solver_name(row)}, {schedule}" + (", AFS" if row["afs"] else "")


def is_plain(row: dict[str, Any]) -> bool:
    """Rows of the main tables: no AFS, on polynomial or logsnr."""
    return not row["afs"] and row["schedule"] in ("polynomial", "logsnr")


def predictor_costs(rows: list[dict[str, Any]]) -> str:
    """What each AMED row's predictor cost to train (from its card), one line per predictor."""
    lines = ["| predictor | trajectories | training time |", "|---|---:|---:|"]
    seen = dict.fromkeys(
        (f"{other_name(r)}, NFE {r['nfe']}", r.get("predictor_trajectories"), r.get("predictor_training_s"))
        for r in sorted(rows, key=lambda r: (other_name(r), r["nfe"]))
        if r.get("predictor")
    )
    for name, trajectories, seconds in seen:
        lines.append(f"| {name} | {trajectories} | {f'{seconds:.0f} s' if seconds else '–'} |")
    return "\n".join(lines)


def table(
    rows: list[dict[str, Any]],
    metric: str,
    with_schedule: bool = False,
    higher_is_better: bool = False,
    label: Callable[[dict[str, Any]], str] = solver_name,
) -> str:
    """Solvers down, NFE across; the best value of each NFE column in bold."""
    pick = max if higher_is_better else min
    nfes = sorted({r["nfe"] for r in rows})
    by_solver: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        by_solver[label(row)][row["nfe"]] = row
    best = {
        n: pick((r[metric] for r in rows if r["nfe"] == n and r.get(metric) is not None), default=None) for n in nfes
    }
    head = "| solver |" + (" schedule |" if with_schedule else "") + "".join(f" {n} |" for n in nfes)
    rule = "|---|" + ("---|" if with_schedule else "") + "---:|" * len(nfes)
    lines = [head, rule]
    for name, cells in by_solver.items():
        schedule = next(iter(cells.values()))["schedule"]
        values = [cells[n].get(metric) if n in cells else None for n in nfes]
        line = f"| {name} |" + (f" {schedule} |" if with_schedule else "")
        line += "".join(f" {_cell(v, v is not None and v == best[n])} |" for v, n in zip(values, nfes, strict=True))
        lines.append(line)
    return "\n".join(lines)


def best_schedule(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each solver's rows on the schedule with the lowest mean log rmse_ref over common NFE (solvers
    measured on one schedule only are left out)."""
    chosen: list[dict[str, Any]] = []
    by_solver: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        by_solver[solver_name(row)][row["schedule"]][row["nfe"]] = row
    for schedules in by_solver.values():
        if len(schedules) < 2:
            continue
        common = set.intersection(*(set(cells) for cells in schedules.values()))

        def score(cells: dict[int, dict[str, Any]], common: set[int] = common) -> float:
            return sum(math.log(cells[n]["rmse_ref"]) for n in common) / max(len(common), 1)

        chosen.extend(min(schedules.values(), key=score).values())
    return chosen


def step_error_runs(results: Path) -> list[tuple[str, str]]:
    """(plot path as the README links it, command) of each committed `step-error-*` run."""
    runs = []
    for path in sorted(results.glob("step-error-*/step-error.json")):
        meta = json.loads(path.read_text())["meta"]
        picture = (path.parent / "step-error.png").as_posix()
        runs.append((picture, f"{meta['command']}  # {path.parent.name}, git {_short(meta)}"))
    return runs


def ablation_tables(results: Path) -> list[str]:
    """One table per committed `amed-ablation-*` run: a row per variant, then its command."""
    parts = []
    for path in sorted(results.glob("amed-ablation-*/results.json")):
        document = json.loads(path.read_text())
        meta, rows = document["meta"], document["rows"]
        sample = rows[0]
        parts.append(
            f"\nAMED ablations (`python -m bench amed-ablation`; {path.parent.name}): one setting changed per row, "
            f"N = {sample['num_samples']}, scored like the sweep rows (same seeds, labels and reference); the "
            "predictors were trained on other noises.\n"
        )
        lines = [
            "| variant | what | NFE | RMSE | FD [90% interval] | class acc | training s | final loss |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            fd = f"{r['fd_indomain']:.2f}" if r.get("fd_indomain") is not None else ""
            if fd and r.get("fd_ci_low") is not None:
                fd += f" [{r['fd_ci_low']:.2f}, {r['fd_ci_high']:.2f}]"
            acc = f"{r['class_acc']:.3f}" if r.get("class_acc") is not None else ""
            seconds = f"{r['predictor_training_s']:.0f}" if r.get("predictor_training_s") is not None else ""
            loss = f"{r['final_loss']:.3g}" if r.get("final_loss") is not None else ""
            lines.append(
                f"| {r['variant']} | {r['question']} | {r['nfe']} | {r['rmse_ref']:.4f} | {fd} | {acc} | {seconds} "
                f"| {loss} |"
            )
        parts.append("\n".join(lines))
        parts.append(f"```\n{meta['command']}  # {path.parent.name}, git {_short(meta)}\n```")
    return parts


def render(rows: list[dict[str, Any]], commands: list[str], results: Path) -> str:
    if not rows:
        return f"{START}\nNo sweep results under {results}/fd-vs-nfe-*/ yet: run `python -m bench fd-vs-nfe`.\n{END}"
    parts = [START, "<!-- generated by `python -m bench report` from bench/results; do not edit by hand -->"]
    for tier in sorted({r["tier"] for r in rows}):
        tier_rows = [r for r in rows if r["tier"] == tier]
        sample = tier_rows[0]
        plain = [r for r in tier_rows if is_plain(r)]
        polynomial = [r for r in plain if r["schedule"] == "polynomial"]
        other = [r for r in tier_rows if not is_plain(r)]
        floor = sample.get("fd_indomain_floor")
        parts.append(
            f"\n**Tier {tier}**: model `{sample['model']}` ({sample['model_fingerprint'][:12]}), "
            f"N = {sample['num_samples']} per row, guidance {sample['guidance']}, {sample['dtype']} on "
            f"{sample['device']}, reference {sample['reference']}."
        )
        if polynomial:
            parts.append(
                f"\nIn-domain FD (MNIST classifier features; noise floor at this N: {floor:.3g}), "
                "polynomial schedule:\n"
            )
            parts.append(table(polynomial, "fd_indomain"))
            parts.append("\nRMSE against the reference sample from the same noise, polynomial schedule:\n")
            parts.append(table(polynomial, "rmse_ref"))
            if any(r.get("class_acc") is not None for r in polynomial):
                parts.append(
                    "\nClass accuracy of the conditional samples (the MNIST classifier), polynomial schedule:\n"
                )
                parts.append(table(polynomial, "class_acc", higher_is_better=True))
        if len({r["schedule"] for r in plain}) > 1:
            chosen = best_schedule(plain)
            parts.append("\nEach solver on its best schedule (polynomial or logsnr, by mean log RMSE): in-domain FD\n")
            parts.append(table(chosen, "fd_indomain", with_schedule=True))
            parts.append("\nand RMSE against the reference:\n")
            parts.append(table(chosen, "rmse_ref", with_schedule=True))
        if other:
            parts.append(
                "\nOther settings: the analytical first step (AFS: the first step takes x / sqrt(1 + sigma_max^2) "
                "as its direction, saving one evaluation) and the `time_uniform` schedule, where AMED's predictors "
                "were trained, beside training-free solvers on the same settings. In-domain FD:\n"
            )
            parts.append(table(other, "fd_indomain", label=other_name))
            parts.append("\nand RMSE against the reference:\n")
            parts.append(table(other, "rmse_ref", label=other_name))
        if any(r.get("predictor") for r in tier_rows):
            parts.append("\nThe AMED rows' predictors and what training them cost (this tier's device):\n")
            parts.append(predictor_costs(tier_rows))
    parts.append("\n![quality versus NFE](bench/results/fd-vs-nfe.png)\n")
    if not all(is_plain(r) for r in rows):
        parts.append("![quality versus NFE, other settings, AMED included](bench/results/fd-vs-nfe-other.png)\n")
    parts.append("Commands (each run's results.json records its revision, device and library versions):\n")
    parts.append("```\n" + "\n".join(commands) + "\n```")
    for picture, command in step_error_runs(results):
        parts.append(
            "\nWhere the error is made: RMSE against the exact trajectory after each step "
            "(`python -m bench step-error`):\n"
        )
        parts.append(f"![error versus sigma]({picture})\n")
        parts.append(f"```\n{command}\n```")
    parts.extend(ablation_tables(results))
    parts.append(END)
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    rows, commands = load_rows(args.results)
    text = args.readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise BenchError(f"{args.readme} has no {START} ... {END} section to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = head + render(rows, commands, args.results) + tail
    if args.check:
        if updated != text:
            print(f"{args.readme} is out of date with {args.results}: run `python -m bench report`", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(updated, encoding="utf-8")
    polynomial = [r for r in rows if is_plain(r) and r["schedule"] == "polynomial"]
    if polynomial:
        plot(polynomial, args.results / "fd-vs-nfe.png", label=solver_name)
    other = [r for r in rows if not is_plain(r)]
    if other:
        plot(other, args.results / "fd-vs-nfe-other.png", label=other_name)
    for path in sorted(args.results.glob("step-error-*/step-error.json")):
        step_error.plot(json.loads(path.read_text())["rows"], path.parent / "step-error.png")
    print(f"updated {args.readme} from {len(rows)} rows", file=sys.stderr)
    return 0
