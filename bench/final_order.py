"""`final-order`: what lowering the order on the final steps does to DPM-Solver++(2M, 3M) and UniPC
as NFE grows (issue 18, item 8).

    python -m bench final-order --runs bench/results/final-order-cpu --out bench/results/final-order-cpu

Variants (solver parameters beside the defaults):
- never: `lower_order_final=false`;
- below10: lower below 10 steps (the official DPM-Solver's rule; this project's old default);
- below15: lower below 15 steps (diffusers' DPMSolverMultistepScheduler);
- always: lower at every step count (the official AMED code; diffusers' UniPC);
- always-last1 (3M only): at every step count, but only the last step (first order; the one
  before keeps third order), as diffusers' `euler_at_final`.
Lowering means step i of S uses order at most S - i.

Two measurements per (solver, variant, NFE), NFE 3..20 on the `polynomial` schedule without AFS:
1. `rmse_gmm`: RMSE against the exact solution on the Gaussian mixture, in the setup of the
   `accuracy` bench (bench/accuracy.py: 8 dimensions, 64 seeds, float64, sigma in [0.002, 80]).
2. `fd_indomain`, `fd_ci_low`, `fd_ci_high`, `rmse_ref` on a sweep model (mnist, N = 1000 CPU tier)
   from `fd-vs-nfe` runs under --runs (one folder per run, e.g. never/, always/, always-last1/,
   each made with --solver-params spelling out its variant). A variant whose per-step orders at
   an NFE equal those of a measured row makes the same network evaluations on the same inputs, so
   that row is its row: `measured_as` names the run folder it came from.

Writes results.csv, results.json (rows and provenance) and table.md (FD and GMM RMSE per NFE).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import provenance
import solvers
from models.analytic import GaussianMixtureDenoiser, reference_solution
from solvers.dpm_solver import DPMPP3MParams, DPMPPParams, multistep_orders
from solvers.registry import Params
from solvers.unipc import UniPCParams

from .accuracy import MIXTURE, SIGMA_MAX, SIGMA_MIN, ConfiguredSolver, error_vs_nfe
from .arguments import options_of
from .errors import BenchError

NAME = "final-order"
SOLVERS = ("dpmpp_2m", "dpmpp_3m", "unipc")
NFES = tuple(range(3, 21))
VARIANTS: dict[str, dict[str, Any]] = {
    "never": {"lower_order_final": False},
    "below10": {"lower_order_final_below": 10},
    "below15": {"lower_order_final_below": 15},
    "always": {"lower_order_final_below": None},
    "always-last1": {"lower_order_final_below": None, "lower_order_final_steps": 1},
}
ONLY_FOR = {"always-last1": ("dpmpp_3m",)}
COLUMNS = (
    "solver",
    "variant",
    "solver_params",
    "nfe",
    "steps",
    "orders",
    "rmse_gmm",
    "fd_indomain",
    "fd_ci_low",
    "fd_ci_high",
    "rmse_ref",
    "measured_as",
    "model",
    "num_samples",
    "git_rev",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="final-step order lowering of dpmpp_2m, dpmpp_3m and unipc versus NFE (GMM RMSE, sweep FD)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=Path, required=True, help="folder of fd-vs-nfe runs, one per subfolder")
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(handler=run)


def step_orders(solver: str, params: Params, steps: int) -> tuple[int, ...]:
    """The order each of the `steps` steps uses (the solvers' own rule, solvers.dpm_solver)."""
    if isinstance(params, UniPCParams):
        return tuple(multistep_orders(steps, params.order, params.lower_order_final, params.lower_order_final_below))
    if not isinstance(params, DPMPPParams):
        raise BenchError(f"{solver}: not a multistep solver with lower_order_final")
    lowered = params.lower_order_final_steps if isinstance(params, DPMPP3MParams) else None
    max_order = 3 if isinstance(params, DPMPP3MParams) else 2
    return tuple(multistep_orders(steps, max_order, params.lower_order_final, params.lower_order_final_below, lowered))


def measured_rows(runs: Path) -> dict[tuple[str, tuple[int, ...]], tuple[str, dict[str, Any]]]:
    """(solver, per-step orders) -> (run folder, sweep row), for the plain polynomial rows of --runs."""
    found: dict[tuple[str, tuple[int, ...]], tuple[str, dict[str, Any]]] = {}
    for path in sorted(runs.glob("*/results.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row["solver"] not in SOLVERS or row["afs"] or row["schedule"] != "polynomial" or not row["reachable"]:
                continue
            spec = solvers.SOLVERS.get(row["solver"])
            params = spec.parse_params(json.loads(row["solver_params"]))
            key = (row["solver"], step_orders(row["solver"], params, row["steps"]))
            if key in found and found[key][1]["fd_indomain"] != row["fd_indomain"]:
                raise BenchError(f"{path.parent.name} and {found[key][0]} disagree on {key}")
            found.setdefault(key, (path.parent.name, row))
    return found


def gmm_errors(variants: Sequence[tuple[str, str, Params]]) -> dict[tuple[str, str], list[float | None]]:
    """RMSE per NFE on the exact Gaussian mixture (the accuracy bench's first study)."""
    noise = solvers.make_noise(list(range(64)), (8,), dtype=torch.float64)
    model = GaussianMixtureDenoiser.smooth(dim=8, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **MIXTURE)
    reference = reference_solution(model, noise * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN)[0]
    errors = {}
    for solver, variant, params in variants:
        rows = error_vs_nfe(model, noise, reference, ConfiguredSolver(solvers.SOLVERS.get(solver), params))
        errors[solver, variant] = [row["rmse"] for row in rows if row["nfe"] in NFES]
    return errors


def build_rows(runs: Path) -> list[dict[str, Any]]:
    variants = [
        (solver, name, solvers.SOLVERS.get(solver).parse_params(overrides))
        for solver in SOLVERS
        for name, overrides in VARIANTS.items()
        if solver in ONLY_FOR.get(name, SOLVERS)
    ]
    errors = gmm_errors(variants)
    measured = measured_rows(runs)
    rows = []
    for solver, name, params in variants:
        spec = solvers.SOLVERS.get(solver)
        for nfe, rmse_gmm in zip(NFES, errors[solver, name], strict=True):
            steps = spec.steps_for_nfe(nfe, afs=False, params=params)
            if steps is None:
                raise BenchError(f"{solver} cannot spend NFE {nfe}")
            orders = step_orders(solver, params, steps)
            run_name, sweep = measured.get((solver, orders), (None, {}))
            rows.append(
                {
                    "solver": solver,
                    "variant": name,
                    "solver_params": json.dumps(VARIANTS[name], sort_keys=True),
                    "nfe": nfe,
                    "steps": steps,
                    "orders": "".join(map(str, orders)),
                    "rmse_gmm": rmse_gmm,
                    "fd_indomain": sweep.get("fd_indomain"),
                    "fd_ci_low": sweep.get("fd_ci_low"),
                    "fd_ci_high": sweep.get("fd_ci_high"),
                    "rmse_ref": sweep.get("rmse_ref"),
                    "measured_as": run_name,
                    "model": sweep.get("model"),
                    "num_samples": sweep.get("num_samples"),
                    "git_rev": sweep.get("git_rev"),
                }
            )
    return rows


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per solver: one line per NFE, FD (and GMM RMSE) of every variant side by side."""
    parts = []
    for solver in SOLVERS:
        mine = [r for r in rows if r["solver"] == solver]
        names = list(dict.fromkeys(r["variant"] for r in mine))
        parts.append(f"### {solver}\n")
        parts.append(
            "| NFE | " + " | ".join(f"FD {n}" for n in names) + " | " + " | ".join(f"GMM {n}" for n in names) + " |"
        )
        parts.append("|---:|" + "---:|" * (2 * len(names)))
        for nfe in NFES:
            cells = {r["variant"]: r for r in mine if r["nfe"] == nfe}
            fd = [_number(cells[n]["fd_indomain"], 3) for n in names]
            gmm = [_number(cells[n]["rmse_gmm"], 4) for n in names]
            parts.append(f"| {nfe} | " + " | ".join(fd) + " | " + " | ".join(gmm) + " |")
        parts.append("")
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    meta = provenance.collect(options_of(args))
    rows = build_rows(args.runs)
    meta["variants"] = VARIANTS
    meta["runs"] = sorted(p.parent.name for p in args.runs.glob("*/results.json"))
    provenance.write_csv(args.out / "results.csv", rows, COLUMNS)
    provenance.write_json(args.out / "results.json", meta, rows)
    table = markdown(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    missing = sum(r["fd_indomain"] is None for r in rows)
    print(f"wrote {args.out}/results.csv, results.json, table.md ({missing} rows without a sweep row)", file=sys.stderr)
    return 0
