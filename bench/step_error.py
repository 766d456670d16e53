"""`step-error`: error against the reference trajectory after every step (error versus sigma).

    python -m bench step-error --model mnist --solvers all --nfe 5,10 --num-samples 64 \\
        --out bench/results/step-error-cpu

The sweep's `rmse_ref` says how far a solver ends from the exact ODE solution; this says where it
loses the distance. For each solver and NFE it records the state after every step and compares it
with the exact trajectory from the same noise at the same sigma. The reference trajectory is Heun
on the solver's own grid with every interval cut into --substeps log-uniform pieces, so it passes
through each sigma the solver visits; it is checked against twice the substeps (that difference is
recorded per step, with a warning where it is not 10x below the error at that step). Errors are
per-sample RMSE over pixels, averaged over samples, in the model's data units.

Typical reading: a solver that is already far off after the first, largest interval (euler at low
NFE) never recovers; a multistep solver with a poor first step (its warm-up) catches up later.

Writes step-error.csv, step-error.json and step-error.png to --out.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

import models
import provenance
import solvers

from .arguments import options_of, positive_int, positive_int_list
from .errors import BenchError

NAME = "step-error"
REFERENCE_SOLVER = "heun"
COLUMNS = (
    "model",
    "model_fingerprint",
    "solver",
    "schedule",
    "afs",
    "guidance",
    "nfe",
    "steps",
    "step",
    "sigma",
    "rmse",
    "num_samples",
    "reference_substeps",
    "reference_check_rmse",
    "device",
    "dtype",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="per-step error against the exact trajectory (error versus sigma)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mnist", help="any models.load source")
    parser.add_argument("--solvers", default="all", help="comma-separated names, or all (the training-free ones)")
    parser.add_argument("--nfe", type=positive_int_list, default=[5, 10])
    parser.add_argument("--num-samples", type=positive_int, default=64)
    parser.add_argument("--schedule", default="polynomial")
    parser.add_argument("--afs", action="store_true")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--substeps", type=positive_int, default=32, help="reference Heun steps per solver interval")
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(handler=run)


@dataclass(frozen=True)
class Trajectory:
    """States after each step: sigmas (steps,) and states (steps, B, ...)."""

    sigmas: list[float]
    states: Tensor


def _record(denoiser: solvers.Denoiser, noise: Tensor, **options: Any) -> tuple[Trajectory, Tensor]:
    """Run one solver and keep the state after every step; also returns its grid."""
    sigmas: list[float] = []
    states: list[Tensor] = []

    def keep(info: solvers.StepInfo) -> None:
        sigmas.append(info.sigma)
        states.append(info.x.double().cpu())

    with torch.inference_mode():
        result = solvers.sample(denoiser, noise, callback=keep, **options)
    return Trajectory(sigmas, torch.stack(states)), result.sigmas


def reference_through(denoiser: solvers.Denoiser, noise: Tensor, grid: Tensor, substeps: int) -> Trajectory:
    """The exact trajectory at every sigma of `grid` (decreasing, float64): Heun on the grid with each
    interval cut into `substeps` log-uniform pieces, from the noise the solver started from."""
    pieces = [grid[:1]]
    for high, low in zip(grid[:-1].tolist(), grid[1:].tolist(), strict=True):
        pieces.append(torch.logspace(math.log10(high), math.log10(low), substeps + 1, dtype=torch.float64)[1:])
    fine = torch.cat(pieces)
    # the custom schedule starts from fine[0] = grid[0]; make_noise's unit noise is scaled there
    trajectory, _ = _record(
        denoiser,
        noise,
        solver=REFERENCE_SOLVER,
        steps=len(fine) - 1,
        schedule="custom",
        schedule_params={"sigmas": fine.tolist()},
    )
    keep = [(i + 1) * substeps - 1 for i in range(len(grid) - 1)]
    return Trajectory([trajectory.sigmas[i] for i in keep], trajectory.states[keep])


def errors_along(trajectory: Trajectory, reference: Trajectory) -> list[float]:
    """Per step: per-sample RMSE over pixels against the reference, averaged over samples."""
    if not torch.allclose(torch.tensor(trajectory.sigmas), torch.tensor(reference.sigmas), rtol=1e-9):
        raise BenchError("internal: the reference trajectory does not pass through the solver's sigmas")
    difference = (trajectory.states - reference.states).flatten(start_dim=2)
    return difference.pow(2).mean(dim=2).sqrt().mean(dim=1).tolist()


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = provenance.collect(options_of(args))  # at the start: the code and tree this run executes
    names = (
        [s.name for s in solvers.list_solvers() if not s.needs_predictor]
        if args.solvers == "all"
        else [n.strip() for n in args.solvers.split(",") if n.strip()]
    )
    for name in names:
        if name not in solvers.SOLVERS:
            raise BenchError(f"--solvers: unknown solver {name!r}; choose from {', '.join(solvers.SOLVERS.names())}")
        if solvers.SOLVERS.get(name).needs_predictor:
            raise BenchError(f"--solvers: {name!r} needs a trained predictor; step-error runs training-free solvers")
    try:
        model = models.class_conditional(models.load(args.model, device=args.device, dtype=args.dtype))
    except models.ModelError as error:
        raise BenchError(str(error)) from None
    seeds = list(range(args.seed_base, args.seed_base + args.num_samples))
    if model.num_class_embeds is not None:
        labels = torch.tensor([seed % 10 for seed in seeds], device=model.device)
        denoiser = model.conditioned(labels, args.guidance)
    else:
        denoiser = model.conditioned()
    noise = solvers.make_noise(seeds, model.sample_shape, device=model.device)

    rows: list[dict[str, Any]] = []
    checks: list[float] = []
    references: dict[tuple[float, ...], tuple[Trajectory, list[float]]] = {}
    plan = [(name, nfe) for name in names for nfe in args.nfe]
    for name, nfe in tqdm(plan, desc="step error", unit="run"):
        spec = solvers.SOLVERS.get(name)
        steps = spec.steps_for_nfe(nfe, args.afs)
        if steps is None:
            print(f"{name} cannot spend exactly NFE {nfe} (reachable: {spec.reachable_nfe(args.afs, limit=nfe + 3)})")
            continue
        options = {"solver": name, "steps": steps, "schedule": args.schedule, "afs": args.afs}
        trajectory, grid = _record(denoiser, noise, **options)
        key = tuple(grid.tolist())
        if key not in references:  # solvers with the same step count share a grid and its reference
            reference = reference_through(denoiser, noise, grid, args.substeps)
            finer = reference_through(denoiser, noise, grid, 2 * args.substeps)
            references[key] = reference, errors_along(reference, finer)  # the reference's own error, per step
        reference, check = references[key]
        errors = errors_along(trajectory, reference)
        if any(own > error / 10 for own, error in zip(check, errors, strict=True)):
            print(
                f"warning: {name} NFE {nfe}: the reference is not 10x below the error at every step; raise --substeps"
            )
        checks.extend(check)
        for step, (sigma, rmse, own) in enumerate(zip(trajectory.sigmas, errors, check, strict=True), start=1):
            rows.append(
                {
                    "model": args.model,
                    "model_fingerprint": model.fingerprint,
                    "solver": name,
                    "schedule": args.schedule,
                    "afs": args.afs,
                    "guidance": args.guidance,
                    "nfe": nfe,
                    "steps": steps,
                    "step": step,
                    "sigma": sigma,
                    "rmse": rmse,
                    "num_samples": args.num_samples,
                    "reference_substeps": args.substeps,
                    "reference_check_rmse": own,
                    "device": model.device.type,
                    "dtype": args.dtype,
                }
            )
    if not rows:
        raise BenchError("no solver could spend the NFE asked for")
    smallest = min(row["rmse"] for row in rows)
    print(f"reference check: {args.substeps} vs {2 * args.substeps} substeps differ by {max(checks):.2e} RMSE at most")
    print(f"smallest error reported: {smallest:.2e}")
    meta["reference"] = f"{REFERENCE_SOLVER}, {args.substeps} log-uniform substeps per solver interval"
    meta["reference_check_rmse"] = max(checks)
    provenance.write_csv(args.out / "step-error.csv", rows, COLUMNS)
    provenance.write_json(args.out / "step-error.json", meta, rows)
    plot(rows, args.out / "step-error.png")
    return 0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per NFE: error versus sigma (log-log, sigma decreasing left to right), a line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfes = sorted({row["nfe"] for row in rows})
    # one colour per solver in every panel (a solver that cannot spend an NFE is absent from its panel)
    colours = {solver: f"C{k % 10}" for k, solver in enumerate(dict.fromkeys(row["solver"] for row in rows))}
    figure, axes = plt.subplots(1, len(nfes), figsize=(5.5 * len(nfes), 4.2), squeeze=False)
    for axis, nfe in zip(axes[0], nfes, strict=True):
        for solver, colour in colours.items():
            line = [row for row in rows if row["nfe"] == nfe and row["solver"] == solver]
            if line:
                sigmas, errors = [r["sigma"] for r in line], [r["rmse"] for r in line]
                axis.plot(sigmas, errors, marker="o", ms=3, color=colour, label=solver)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.invert_xaxis()
        axis.set_xlabel("sigma reached")
        axis.set_ylabel("RMSE against the exact trajectory")
        axis.set_title(f"NFE {nfe}")
        axis.grid(True, which="both", alpha=0.3)
    for axis in axes[0]:
        axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
