"""`afs-probe`: what the analytical first step (AFS) gets wrong on a model, at the first step.

    python -m bench afs-probe --models mnist,mnist-flow --nfe 3,5,7,9 --out bench/results/afs-probe-cpu

AFS takes x / sqrt(1 + sigma_0^2) as the first direction instead of calling the network, i.e. it
puts D(x, sigma_0) = x (1 - sigma_0 / sqrt(1 + sigma_0^2)), which is about 0 at a large sigma_0:
it assumes zero-mean data. This measures, on the sweep's own noises and labels (seeds 0..N-1,
balanced digits), the real D(x, sigma_0) (its mean pixel and RMS), how far AFS's stand-in is from
it, and what that does to the state after the first step of each solver grid: the step
x_1 = D + (sigma_1 / sigma_0)(x - D) lands (1 - sigma_1 / sigma_0) |D - D_afs| away, to be compared
with sigma_1, the noise scale the rest of the trajectory starts from. The quality cost at the end
(the same grid with and without AFS) is in the fd-vs-nfe rows: with AFS at NFE n a solver of one
call per step walks the grid that it walks without AFS at NFE n + 1.

Writes afs-probe.csv and afs-probe.json (rows per model and NFE, provenance in meta).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

import models
import provenance
import solvers
from solvers.stepping import afs_denoised

from .arguments import options_of, positive_int, positive_int_list
from .errors import BenchError
from .sweep import balanced_labels

NAME = "afs-probe"
COLUMNS = (
    "model",
    "model_fingerprint",
    "schedule",
    "solver",
    "nfe",
    "steps",
    "sigma_0",
    "sigma_1",
    "num_samples",
    "denoised_mean",
    "denoised_rms",
    "afs_error_rms",
    "first_state_error_rms",
    "first_state_error_over_sigma_1",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="what AFS's zero-mean assumption costs at the first step, per model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default="mnist,mnist-flow", help="comma-separated models.load sources")
    parser.add_argument("--solver", default="euler", help="a solver of one call per step (its AFS grid is used)")
    parser.add_argument("--nfe", type=positive_int_list, default=[3, 5, 7, 9])
    parser.add_argument("--schedule", default="polynomial")
    parser.add_argument("--num-samples", type=positive_int, default=250)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(handler=run)


def _rms(values: torch.Tensor) -> float:
    """Per-sample RMS over pixels, averaged over samples."""
    return float(values.double().flatten(1).pow(2).mean(1).sqrt().mean())


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = provenance.collect(options_of(args))
    spec = solvers.SOLVERS.get(args.solver)
    if spec.evals_per_step != 1 or spec.needs_predictor:
        raise BenchError(f"--solver {args.solver}: expected a training-free solver of one call per step")
    rows: list[dict[str, Any]] = []
    seeds = list(range(args.num_samples))
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        try:
            model = models.class_conditional(models.load(name, device="cpu"))
        except models.ModelError as error:
            raise BenchError(str(error)) from None
        if model.num_class_embeds is not None:
            classes = model.null_class if model.null_class is not None else model.num_class_embeds
            denoiser = model.conditioned(balanced_labels(len(seeds), classes, 0), args.guidance)
        else:
            denoiser = model.conditioned()
        for nfe in args.nfe:
            steps = spec.require_steps_for_nfe(nfe, True)
            sigmas = solvers.build_sigmas(
                args.schedule,
                steps,
                sigma_min=model.sigma_min,
                sigma_max=model.sigma_max,
                sigma_levels=model.sigma_levels,
            )
            sigma_0, sigma_1 = float(sigmas[0]), float(sigmas[1])
            x = solvers.make_noise(seeds, model.sample_shape) * sigma_0
            with torch.inference_mode():
                denoised = denoiser(x, torch.full((len(seeds),), sigma_0))
            miss = denoised - afs_denoised(x, sigma_0)
            first = (1.0 - sigma_1 / sigma_0) * miss  # x_1's displacement: D + (s1/s0)(x - D) is linear in D
            rows.append(
                {
                    "model": name,
                    "model_fingerprint": model.fingerprint,
                    "schedule": args.schedule,
                    "solver": args.solver,
                    "nfe": nfe,
                    "steps": steps,
                    "sigma_0": sigma_0,
                    "sigma_1": sigma_1,
                    "num_samples": len(seeds),
                    "denoised_mean": float(denoised.double().mean()),
                    "denoised_rms": _rms(denoised),
                    "afs_error_rms": _rms(miss),
                    "first_state_error_rms": _rms(first),
                    "first_state_error_over_sigma_1": _rms(first) / sigma_1,
                }
            )
            row = rows[-1]
            print(
                f"{name} NFE {nfe} (AFS, {steps} steps): sigma {sigma_0:.4g} -> {sigma_1:.4g}; D mean "
                f"{row['denoised_mean']:.3f}, RMS {row['denoised_rms']:.3f}; "
                f"AFS misses D by {row['afs_error_rms']:.3f}; "
                f"x_1 off by {row['first_state_error_rms']:.3f} = {row['first_state_error_over_sigma_1']:.2e} sigma_1"
            )
    provenance.write_csv(args.out / "afs-probe.csv", rows, COLUMNS)
    provenance.write_json(args.out / "afs-probe.json", meta, rows)
    return 0
