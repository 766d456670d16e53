"""`accuracy`: every solver's error against the exact ODE solution on the Gaussian-mixture model.

Two studies, both in float64 on `GaussianMixtureDenoiser.smooth` (3 components, mixture seed 0),
from unit noise of seeds 0..batch-1 (one generator per seed, `solvers.make_noise`, so row k is
the same noise whatever the batch) scaled to sigma_max, AFS off:

1. Error vs NFE (accuracy-gmm.csv): `polynomial` schedule (rho 7) on [0.002, 80], NFE 3..20
   through the public `solvers.sample`, with the step count `spec.steps_for_nfe(nfe)` and the
   counted NFE checked against it. An NFE the solver cannot spend exactly is a row with
   reachable=false and no error, never rounded to a neighbour. `local_order` is
   -d log(rmse) / d log(nfe) between consecutive reachable NFEs of one variant.
2. Convergence order (accuracy-gmm-order.csv): `logsnr` schedule on [0.02, 80], 16..256 steps,
   order = slope of log2 error over the last two doublings; end to end, and with the
   multistep warm-up replaced by exact states and the final steps not lowered (`exact_start`:
   the formula's own order, as in tests/test_convergence.py), next to the declared order.

The error is the RMSE over all samples and coordinates of the final state against SciPy's DOP853
solution from the same noise (`models.analytic.reference_solution`, rtol 1e-12); the reference's
own error is estimated against an rtol 1e-13 solve and stored in the metadata.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import provenance
import solvers
from models.analytic import GaussianMixtureDenoiser, reference_solution
from solvers.contract import CountingDenoiser
from solvers.registry import Params, SolverSpec
from solvers.stepping import Progress

from . import sweep
from .arguments import options_of, positive_int
from .errors import BenchError

NAME = "accuracy"
RESULTS = Path(__file__).resolve().parent / "results"

MIXTURE = {"components": 3, "seed": 0}
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SCHEDULE, SCHEDULE_PARAMS = "polynomial", {"rho": 7.0}
NFES = tuple(range(3, 21))

ORDER_SCHEDULE = "logsnr"
ORDER_SIGMA_MIN = 0.02
ORDER_STEPS = (16, 32, 64, 128, 256)
ORDER_FIT_DOUBLINGS = 2  # the order is the mean slope over the last two doublings
ORDER_TOLERANCE = 0.3  # |measured - declared| beyond this is flagged

REFERENCE_RTOL = 1e-12  # reference_solution's default
CHECK_RTOL = 1e-13  # a tighter solve, only to estimate the reference's own error
FLOOR_MARGIN = 100.0  # errors within this factor of the reference error are flagged

# Parameter variants beside every solver's defaults. Those equal to a default (ipndm max_order 4,
# ipndm_v max_order 4, deis max_order 3, unipc order 2 bh2) are that default's row.
EXTRA_VARIANTS: tuple[tuple[str, Mapping[str, Any]], ...] = (
    ("dpmpp_3m", {"third_order": "upstream"}),
    ("unipc", {"order": 1}),
    ("unipc", {"order": 2}),
    ("unipc", {"order": 3}),
    ("unipc", {"order": 2, "variant": "bh1"}),
    ("ipndm", {"max_order": 4}),
    ("ipndm_v", {"max_order": 4}),
    ("deis", {"max_order": 3}),
)

ACCURACY_COLUMNS = (
    "solver",
    "variant",
    "params",
    "declared_order",
    "schedule",
    "schedule_params",
    "afs",
    "nfe",
    "steps",
    "reachable",
    "rmse",
    "local_order",
)


@dataclass(frozen=True)
class ConfiguredSolver:
    """One solver with one parameter set."""

    spec: SolverSpec[Any]
    params: Params

    @property
    def label(self) -> str:
        """The solver name, plus the parameters that differ from its defaults: unipc[order=3]."""
        changed = self.params.model_dump(mode="json", exclude_defaults=True)
        if not changed:
            return self.spec.name
        return self.spec.name + "[" + ",".join(f"{k}={v}" for k, v in changed.items()) + "]"

    @property
    def params_json(self) -> str:
        """All parameters, defaults included, as compact JSON (spec.parse_params reads it back)."""
        return json.dumps(self.params.model_dump(mode="json"), separators=(",", ":"), sort_keys=True)

    @property
    def declared_order(self) -> int:
        return self.spec.order_of(self.params)

    @property
    def warmup(self) -> int:
        return self.spec.warmup_of(self.params)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="solver error vs NFE and convergence order on the exact Gaussian-mixture model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder (default: bench/results)")
    parser.add_argument("--dim", type=positive_int, default=8, help="dimension of the mixture (default: 8)")
    parser.add_argument("--batch", type=positive_int, default=64, help="samples, seeds 0..batch-1 (default: 64)")
    parser.set_defaults(handler=run)


def variants() -> list[ConfiguredSolver]:
    """Every solver that needs no predictor with default parameters, then EXTRA_VARIANTS; a
    parameter set that is already listed is not repeated."""
    found: list[ConfiguredSolver] = []
    seen: set[tuple[str, str]] = set()
    requests: list[tuple[str, Mapping[str, Any]]] = [
        (spec.name, {}) for spec in solvers.list_solvers() if not spec.needs_predictor
    ]
    for name, overrides in [*requests, *EXTRA_VARIANTS]:
        spec = solvers.SOLVERS.get(name)
        variant = ConfiguredSolver(spec, spec.parse_params(overrides))
        key = (name, variant.params_json)
        if key not in seen:
            seen.add(key)
            found.append(variant)
    return found


def rmse(x: Tensor, reference: Tensor) -> float:
    """Root mean square of x - reference over every sample and coordinate."""
    return (x.to(torch.float64) - reference).pow(2).mean().sqrt().item()


def _log_slope(nfe_a: int, err_a: float, nfe_b: int, err_b: float) -> float | None:
    """-d log(err) / d log(nfe) between two points; None where an error is 0."""
    if err_a <= 0 or err_b <= 0:
        return None
    return -(math.log(err_b) - math.log(err_a)) / (math.log(nfe_b) - math.log(nfe_a))


def error_vs_nfe(
    model: GaussianMixtureDenoiser, noise: Tensor, reference: Tensor, variant: ConfiguredSolver
) -> list[dict[str, Any]]:
    """One row per NFE in NFES (see the module docstring)."""
    rows = []
    previous: tuple[int, float] | None = None
    for nfe in NFES:
        steps = variant.spec.steps_for_nfe(nfe, afs=False, params=variant.params)
        row: dict[str, Any] = {
            "solver": variant.spec.name,
            "variant": variant.label,
            "params": variant.params_json,
            "declared_order": variant.declared_order,
            "schedule": SCHEDULE,
            "schedule_params": json.dumps(SCHEDULE_PARAMS, separators=(",", ":")),
            "afs": False,
            "nfe": nfe,
            "steps": steps,
            "reachable": steps is not None,
            "rmse": None,
            "local_order": None,
        }
        if steps is not None:
            result = solvers.sample(
                model,
                noise,
                solver=variant.spec.name,
                steps=steps,
                schedule=SCHEDULE,
                schedule_params=SCHEDULE_PARAMS,
                solver_params=variant.params,
                afs=False,
            )
            if result.nfe != nfe:
                raise BenchError(
                    f"{variant.label}: {steps} steps made {result.nfe} denoiser calls, the registry announced nfe={nfe}"
                )
            row["rmse"] = rmse(result.images, reference)
            if previous is not None:
                row["local_order"] = _log_slope(*previous, nfe, row["rmse"])
            previous = (nfe, row["rmse"])
        rows.append(row)
    return rows


@dataclass(frozen=True)
class OrderGrid:
    """One step count of the order study: its sigmas and the exact states on it."""

    steps: int
    sigmas: Tensor
    exact_start: tuple[Tensor, ...]  # exact states at sigmas[1..k], k = the largest warm-up
    exact_end: Tensor


def order_grids(model: GaussianMixtureDenoiser, x_start: Tensor, warmup: int) -> list[OrderGrid]:
    grids = []
    for steps in ORDER_STEPS:
        sigmas = solvers.build_sigmas(ORDER_SCHEDULE, steps, sigma_min=model.sigma_min, sigma_max=model.sigma_max)
        # One solve reports every wanted state; DOP853's steps do not depend on where it reports.
        wanted = [*sigmas[1 : warmup + 1].tolist(), sigmas[-1].item()]
        states = reference_solution(model, x_start, sigmas[0].item(), wanted)
        grids.append(OrderGrid(steps, sigmas, tuple(states[:-1]), states[-1]))
    return grids


def final_error(
    model: GaussianMixtureDenoiser, x_start: Tensor, grid: OrderGrid, variant: ConfiguredSolver, exact: bool
) -> float:
    """RMSE at sigmas[-1] of the solver function called directly, optionally with exact warm-up states."""
    extra = {"exact_start": grid.exact_start[: variant.warmup]} if exact and variant.warmup else {}
    params = variant.params
    if exact and "lower_order_final" in type(params).model_fields:
        params = params.model_copy(update={"lower_order_final": False})  # the formula's own order
    counter = CountingDenoiser(model)
    x = variant.spec.fn(
        counter,
        x_start,
        grid.sigmas,
        params=params,
        afs=False,
        progress=Progress(None, grid.steps),
        **extra,
    )
    if not extra and counter.calls != variant.spec.nfe(grid.steps, afs=False):
        raise BenchError(f"{variant.label}: {grid.steps} steps made {counter.calls} denoiser calls")
    return rmse(x, grid.exact_end)


def _order(errors: Sequence[float]) -> float | None:
    """Mean slope of log2(error) over the last ORDER_FIT_DOUBLINGS doublings of the step count."""
    first, last = errors[-1 - ORDER_FIT_DOUBLINGS], errors[-1]
    if first <= 0 or last <= 0:
        return None
    return math.log2(first / last) / ORDER_FIT_DOUBLINGS


def order_row(
    model: GaussianMixtureDenoiser, x_start: Tensor, grids: Sequence[OrderGrid], variant: ConfiguredSolver, floor: float
) -> dict[str, Any]:
    end_to_end = [final_error(model, x_start, grid, variant, exact=False) for grid in grids]
    exact = [final_error(model, x_start, grid, variant, exact=True) for grid in grids] if variant.warmup else end_to_end
    declared = variant.declared_order
    order_e2e, order_exact = _order(end_to_end), _order(exact)
    fitted = [*end_to_end[-1 - ORDER_FIT_DOUBLINGS :], *exact[-1 - ORDER_FIT_DOUBLINGS :]]
    row: dict[str, Any] = {
        "solver": variant.spec.name,
        "variant": variant.label,
        "params": variant.params_json,
        "schedule": ORDER_SCHEDULE,
        "sigma_min": model.sigma_min,
        "sigma_max": model.sigma_max,
        "warmup_steps": variant.warmup,
        "declared_order": declared,
        "order_end_to_end": order_e2e,
        "order_exact_start": order_exact,
        "exact_start_deviation": None if order_exact is None else order_exact - declared,
        "exact_start_within_tolerance": order_exact is not None and abs(order_exact - declared) <= ORDER_TOLERANCE,
        "near_reference_floor": min(fitted) < FLOOR_MARGIN * floor,
    }
    for name, errors in (("end_to_end", end_to_end), ("exact_start", exact)):
        for steps, error in zip(ORDER_STEPS, errors, strict=True):
            row[f"rmse_{name}_{steps}"] = error
        for (steps_a, err_a), (steps_b, err_b) in itertools.pairwise(zip(ORDER_STEPS, errors, strict=True)):
            row[f"slope_{name}_{steps_a}_{steps_b}"] = _log_slope(steps_a, err_a, steps_b, err_b)
    return row


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    meta = provenance.collect(options_of(args))
    seeds = list(range(args.batch))
    noise = solvers.make_noise(seeds, (args.dim,), dtype=torch.float64)
    chosen = variants()

    # Study 1: error vs NFE on the polynomial schedule.
    model = GaussianMixtureDenoiser.smooth(dim=args.dim, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, **MIXTURE)
    x_start = noise * SIGMA_MAX
    reference = reference_solution(model, x_start, SIGMA_MAX, SIGMA_MIN)[0]
    reference_error = rmse(
        reference, reference_solution(model, x_start, SIGMA_MAX, SIGMA_MIN, rtol=CHECK_RTOL, atol=CHECK_RTOL)[0]
    )
    rows = [row for variant in chosen for row in error_vs_nfe(model, noise, reference, variant)]
    sweep_s = time.perf_counter() - started

    # Study 2: convergence order on the logsnr schedule.
    order_model = GaussianMixtureDenoiser.smooth(
        dim=args.dim, sigma_min=ORDER_SIGMA_MIN, sigma_max=SIGMA_MAX, **MIXTURE
    )
    grids = order_grids(order_model, x_start, max(v.warmup for v in chosen))
    order_floor = rmse(
        grids[-1].exact_end,
        reference_solution(order_model, x_start, SIGMA_MAX, ORDER_SIGMA_MIN, rtol=CHECK_RTOL, atol=CHECK_RTOL)[0],
    )
    order_rows = [order_row(order_model, x_start, grids, variant, order_floor) for variant in chosen]
    wall_s = time.perf_counter() - started

    meta["setup"] = {
        "model": {"class": "GaussianMixtureDenoiser.smooth", "dim": args.dim, **MIXTURE},
        "noise": {"seeds": f"0..{args.batch - 1}", "shape": [args.batch, args.dim], "dtype": "float64"},
        "afs": False,
        "error": "RMSE over all samples and coordinates of the final state vs the reference from the same noise",
        "reference": {"method": "scipy DOP853 in log sigma", "rtol": REFERENCE_RTOL, "atol": REFERENCE_RTOL},
        "error_vs_nfe": {
            "schedule": SCHEDULE,
            "schedule_params": SCHEDULE_PARAMS,
            "sigma_min": SIGMA_MIN,
            "sigma_max": SIGMA_MAX,
            "nfe": [NFES[0], NFES[-1]],
            "reference_error_estimate": reference_error,
        },
        "order": {
            "schedule": ORDER_SCHEDULE,
            "sigma_min": ORDER_SIGMA_MIN,
            "sigma_max": SIGMA_MAX,
            "steps": list(ORDER_STEPS),
            "fit": f"mean slope of log2(rmse) over the last {ORDER_FIT_DOUBLINGS} doublings",
            "tolerance": ORDER_TOLERANCE,
            "reference_error_estimate": order_floor,
            "near_floor_margin": FLOOR_MARGIN,
        },
    }
    meta["wall_s"] = {"error_vs_nfe": sweep_s, "total": wall_s}

    out: Path = args.out
    written = [
        provenance.write_csv(out / "accuracy-gmm.csv", rows, ACCURACY_COLUMNS),
        provenance.write_csv(out / "accuracy-gmm-order.csv", order_rows),
        provenance.write_json(out / "accuracy-gmm.json", meta, rows, order_rows=order_rows),
        provenance.write_csv(out / "accuracy-gmm-schema.csv", in_sweep_schema(rows, meta, args), sweep.COLUMNS),
    ]
    print(format_error_table(rows, args.batch, args.dim))
    print()
    print(format_order_table(order_rows))
    print()
    print(f"reference error estimates: {reference_error:.1e} (sigma_min {SIGMA_MIN}), {order_floor:.1e} (order study)")
    print(f"wall time {wall_s:.1f} s; wrote " + ", ".join(str(path) for path in written))
    return 0


def in_sweep_schema(
    rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """The error-vs-NFE rows in the shared result schema of bench/sweep.py (tier `analytic`;
    `rmse_ref` is the error against the exact ODE solution; image metrics are empty)."""
    setup = json.dumps({"dim": args.dim, **MIXTURE}, sort_keys=True)
    fingerprint = hashlib.sha256(setup.encode()).hexdigest()
    return [
        {
            "model": f"gmm-analytic(dim={args.dim})",
            "model_fingerprint": fingerprint,
            "solver": row["variant"],
            "base": row["solver"],
            "schedule": row["schedule"],
            "schedule_params": row["schedule_params"],
            "afs": row["afs"],
            "guidance": None,
            "steps": row["steps"],
            "nfe": row["nfe"],
            "network_evals": row["nfe"] if row["reachable"] else None,
            "num_samples": args.batch,
            "tier": "analytic",
            "rmse_ref": row["rmse"],
            "device": "cpu",
            "dtype": "float64",
            "batch": args.batch,
            "tf32": False,
            "git_rev": (meta.get("git") or {}).get("revision"),
            "command": meta.get("command"),
            "reachable": row["reachable"],
            "solver_params": row["params"],
            "reference": f"scipy DOP853 in log sigma, rtol {REFERENCE_RTOL:g}",
            "processes": 1,
            "cached": False,
        }
        for row in rows
    ]


def format_error_table(rows: Sequence[Mapping[str, Any]], batch: int, dim: int) -> str:
    """RMSE by variant (rows) and NFE (columns); '-' where the NFE is not reachable."""
    by_variant: dict[str, dict[int, Any]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], {})[row["nfe"]] = row["rmse"]
    width = max(len(label) for label in by_variant)
    title = (
        f"RMSE vs NFE: {SCHEDULE} rho={SCHEDULE_PARAMS['rho']:g} on [{SIGMA_MIN}, {SIGMA_MAX}], AFS off, "
        f"{batch} seeds, dim {dim}"
    )
    lines = [title, "NFE".ljust(width) + "".join(f"{nfe:>8d}" for nfe in NFES)]
    for label, errors in by_variant.items():
        cells = "".join(f"{'-':>8}" if errors[nfe] is None else f"{errors[nfe]:8.1e}" for nfe in NFES)
        lines.append(label.ljust(width) + cells)
    return "\n".join(lines)


def format_order_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Declared vs measured order; '!' marks an exact-start order off by more than the tolerance."""
    width = max(len(row["variant"]) for row in rows)
    steps = ORDER_STEPS[-1 - ORDER_FIT_DOUBLINGS]
    lines = [
        f"Convergence order: {ORDER_SCHEDULE} on [{ORDER_SIGMA_MIN}, {SIGMA_MAX}], slope over steps "
        f"{steps}..{ORDER_STEPS[-1]}; '!' = exact-start order off the declared one by > {ORDER_TOLERANCE}",
        "variant".ljust(width) + f"{'declared':>10}{'end-to-end':>12}{'exact-start':>13}{'rmse@256':>11}",
    ]

    def cell(value: float | None, size: int) -> str:
        return f"{'n/a':>{size}}" if value is None else f"{value:{size}.2f}"

    for row in rows:
        flag = "" if row["exact_start_within_tolerance"] else " !"
        if row["near_reference_floor"]:
            flag += " (near reference floor)"
        lines.append(
            row["variant"].ljust(width)
            + f"{row['declared_order']:>10d}"
            + cell(row["order_end_to_end"], 12)
            + cell(row["order_exact_start"], 13)
            + f"{row[f'rmse_exact_start_{ORDER_STEPS[-1]}']:11.1e}"
            + flag
        )
    return "\n".join(lines)
