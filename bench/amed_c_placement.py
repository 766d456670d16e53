"""`amed-c-placement`: where c applies in AMED-Plugin on DPM-Solver-2 (issue 18, item 7).

    python -m bench amed-c-placement --model mnist --nfe 5 --num-samples 1000 --cache .cache/sweep-cpu \\
        --out bench/results/amed-c-placement-cpu

With d_i the direction at sigma_i, d_s the one at the learned intermediate point and h the step:
- "direction" (this project's until issue 18): x_{i+1} = x_i + h [(1 - 1/(2r)) d_i + c/(2r) d_s];
- "update" (the official AMED code, sampled since): x_{i+1} = x_i + c h [(1 - 1/(2r)) d_i + 1/(2r) d_s].
They agree at r = 1/2 and differ by (c - 1) h (1 - 1/(2r)) d_i. c is trained together with r, so
a predictor belongs to its placement: for each NFE both are trained with the plugin's recipe
(`sampler-amed train`'s defaults: the base as teacher with M = 2, 1000 trajectories at batch 100,
lr 5e-3, dc 0.01, seed 0, polynomial, AFS) and each predictor is scored under both placements:
1. `rmse_teacher`: against the teacher's final state on held-out noises (seeds 2**43 + k, disjoint
   from training's 2**40 + k and every benchmark's; labels k mod 10), mean per-sample RMSE;
2. a sweep row on the sweep's seeds, labels and reference (bench/sweep.py): in-domain FD with its
   bootstrap interval, `rmse_ref`, class accuracy.
The predictors are scratch (not shipped); out/results.csv and results.json carry the provenance.

`--model gmm` runs the same study on the exact Gaussian mixture (8 dimensions, sigma in [0.002, 80],
float64, a table-mode predictor: the model has no bottleneck feature), where it is cheap: every
NFE 3-10 (odd with AFS, even without), several training seeds (`--seeds`), and `rmse_exact`
against the exact ODE solution instead of the sweep row.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

import provenance
import solvers
from models.analytic import GaussianMixtureDenoiser, reference_solution
from solvers.amed import IntervalUpdate, PredictorConfig
from solvers.amed.predictor import AMEDPredictor
from solvers.amed.solver import run_intervals
from solvers.amed.training import TrainingSettings, new_predictor, teacher_states, train_predictor
from solvers.contract import Denoiser
from solvers.stepping import Progress

from .amed import _conditioning
from .arguments import int_list, options_of, positive_int, positive_int_list
from .errors import BenchError
from .frechet import FeatureStats, frechet_distance
from .mnist_quality import quantise
from .sweep import SingleProcess, SweepConfig, _reference_chunk, bootstrap_interval, prepare

NAME = "amed-c-placement"
PLACEMENTS: tuple[Literal["direction", "update"], ...] = ("direction", "update")
HELD_OUT_SEED_BASE = 2**43
SUBSTEPS = 2  # the plugin recipe's M


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="AMED-Plugin on DPM-Solver-2: c on the intermediate direction or on the whole update",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mnist", help="a sweep model, or gmm (the exact Gaussian mixture)")
    parser.add_argument("--nfe", type=positive_int_list, default=[5], help="odd (AFS): 3, 5, 7, 9")
    parser.add_argument("--num-samples", type=positive_int, default=1000)
    parser.add_argument("--held-out", type=positive_int, default=256)
    parser.add_argument("--trajectories", type=positive_int, default=1000)
    parser.add_argument("--batch-size", type=positive_int, default=100)
    parser.add_argument("--seeds", type=int_list, default=[0], help="training seeds (gmm: one predictor each)")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="the sweep's cache (its reference); not for gmm")
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(handler=run)


def plugin_run(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, update: IntervalUpdate, predictor: AMEDPredictor, afs: bool = True
) -> Tensor:
    """AMED-Plugin from x at sigmas[0] (AFS on the first interval if asked), as solvers.sample runs it."""
    with torch.no_grad():
        return run_intervals(
            denoiser, x, sigmas, update=update, afs=afs, progress=Progress(None, len(sigmas) - 1), predictor=predictor
        )


def gmm_study(args: argparse.Namespace, meta: dict[str, Any]) -> int:
    """The study on the exact Gaussian mixture (see the module docstring)."""
    model = GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0, sigma_min=0.002, sigma_max=80.0)
    shape = (2, 2, 2)
    settings = TrainingSettings(
        trajectories=args.trajectories,
        batch_size=args.batch_size,
        lr=5e-3,
        teacher="dpm_solver_2",
        teacher_params={},
        teacher_substeps=SUBSTEPS,
        seed=0,
        objective="interval",
    )
    held_seeds = list(range(HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + args.held_out))
    noise = solvers.make_noise(held_seeds, shape, dtype=torch.float64)
    rows: list[dict[str, Any]] = []
    for nfe in args.nfe:
        afs = nfe % 2 == 1  # 2 S - AFS calls: odd NFE with AFS, even without
        steps = (nfe + int(afs)) // 2
        sigmas = solvers.build_sigmas("polynomial", steps, sigma_min=0.002, sigma_max=80.0)
        teacher_sigmas = solvers.build_sigmas("polynomial", (SUBSTEPS + 1) * steps, sigma_min=0.002, sigma_max=80.0)
        x0 = noise * 80.0
        teacher = teacher_states(model, x0, teacher_sigmas, "dpm_solver_2", {}, SUBSTEPS + 1)[-1]
        exact = reference_solution(model, x0, 80.0, 0.002)[0].reshape(teacher.shape)
        predictors = {}
        for seed, placement in itertools.product(args.seeds, PLACEMENTS):
            predictor = new_predictor(PredictorConfig(), seed).double()
            summary = train_predictor(
                predictor,
                update=IntervalUpdate("dpm_solver_2", 1, c_scales=placement),
                sigmas=sigmas,
                teacher_sigmas=teacher_sigmas,
                afs=afs,
                make_batch=lambda seeds: (model, solvers.make_noise(seeds, shape, dtype=torch.float64)),
                settings=dataclasses.replace(settings, seed=seed),
            )
            predictors[seed, placement] = (predictor, summary)
        for (seed, trained_for), (predictor, summary) in predictors.items():
            for placement in PLACEMENTS:
                update = IntervalUpdate("dpm_solver_2", 1, c_scales=placement)
                x = plugin_run(model, x0, sigmas, update, predictor, afs=afs)
                row = {
                    "model": "gmm",
                    "nfe": nfe,
                    "steps": steps,
                    "afs": afs,
                    "seed": seed,
                    "trained_for": trained_for,
                    "placement": placement,
                    "rmse_teacher": float((x - teacher).flatten(1).pow(2).mean(1).sqrt().mean()),
                    "rmse_exact": float((x - exact).flatten(1).pow(2).mean(1).sqrt().mean()),
                    "final_loss": sum(summary.final_loss),
                    "held_out": args.held_out,
                    "git_rev": (meta.get("git") or {}).get("revision"),
                }
                rows.append(row)
                print(
                    f"gmm NFE {nfe} afs={afs} seed {seed} trained for {trained_for}, run with {placement}: "
                    f"rmse_teacher {row['rmse_teacher']:.5f} rmse_exact {row['rmse_exact']:.5f}",
                    file=sys.stderr,
                )
    provenance.write_csv(args.out / "results-gmm.csv", rows)
    provenance.write_json(args.out / "results-gmm.json", meta, rows)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = provenance.collect(options_of(args))
    if args.model == "gmm":
        return gmm_study(args, meta)
    if args.cache is None:
        raise BenchError(f"--model {args.model}: give --cache, the sweep's cache with its reference")
    config = SweepConfig(model=args.model, solvers=["dpm_solver_2"], nfe=args.nfe, num_samples=args.num_samples)
    context = prepare(config, args.cache, SingleProcess())
    model, scorer, labels = context.model, context.scorer, context.labels
    if scorer is None or labels is None:
        raise SystemExit(f"--model {args.model}: expected a class-conditional MNIST-like model (FD and labels)")
    conditioned = _conditioning(model, [], 1.0)
    probe = conditioned([0])
    assert isinstance(probe, solvers.FeatureDenoiser)
    with torch.no_grad():
        _, feature = probe.denoise_with_feature(
            torch.zeros(1, *model.sample_shape, device=model.device), torch.ones(1, device=model.device)
        )
    predictor_config = PredictorConfig(feature_shape=(int(feature.shape[1]), int(feature.shape[2])))
    settings = TrainingSettings(
        trajectories=args.trajectories,
        batch_size=args.batch_size,
        lr=5e-3,
        teacher="dpm_solver_2",
        teacher_params={},
        teacher_substeps=SUBSTEPS,
        seed=0,
        objective="interval",
    )
    rows = []
    for nfe in args.nfe:
        steps = (nfe + 1) // 2
        if 2 * steps - 1 != nfe:
            raise SystemExit(f"--nfe {nfe}: with AFS the DPM-Solver-2 plugin spends 2 S - 1, an odd NFE")

        def grid(count: int) -> Tensor:
            return solvers.build_sigmas("polynomial", count, sigma_min=model.sigma_min, sigma_max=model.sigma_max)

        sigmas, teacher_sigmas = grid(steps), grid((SUBSTEPS + 1) * steps)
        held_seeds = list(range(HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + args.held_out))
        held_denoiser = conditioned(held_seeds)
        held_x0 = solvers.make_noise(held_seeds, model.sample_shape, device=model.device) * sigmas[0].item()
        held_target = teacher_states(held_denoiser, held_x0, teacher_sigmas, "dpm_solver_2", {}, SUBSTEPS + 1)[-1]
        predictors = {}
        for placement in PLACEMENTS:
            predictor = new_predictor(predictor_config, settings.seed).to(model.device)
            summary = train_predictor(
                predictor,
                update=IntervalUpdate("dpm_solver_2", 1, c_scales=placement),
                sigmas=sigmas,
                teacher_sigmas=teacher_sigmas,
                afs=True,
                make_batch=lambda seeds: (
                    conditioned(seeds),
                    solvers.make_noise(seeds, model.sample_shape, device=model.device),
                ),
                settings=settings,
            )
            predictors[placement] = (predictor, summary)
            print(f"NFE {nfe}: trained for c on the {placement}: loss {summary.final_loss}", file=sys.stderr)
        for trained_for, (predictor, summary) in predictors.items():
            for placement in PLACEMENTS:
                update = IntervalUpdate("dpm_solver_2", 1, c_scales=placement)
                began = time.perf_counter()
                held = plugin_run(held_denoiser, held_x0, sigmas, update, predictor)
                rmse_teacher = float((held - held_target).flatten(1).pow(2).mean(1).sqrt().mean())
                features, errors, predicted = [], [], []
                for chunk, start, stop in context.chunks:
                    noise = solvers.make_noise(context.seeds[start:stop], model.sample_shape, device=model.device)
                    denoiser = model.conditioned(labels[start:stop].to(model.device), 1.0)
                    images = plugin_run(denoiser, noise * sigmas[0].item(), sigmas, update, predictor).float().cpu()
                    reference = _reference_chunk(context, chunk, start, stop)
                    errors.append((images - reference).flatten(1).pow(2).mean(1).sqrt())
                    chunk_features = scorer.features(quantise(images))
                    with torch.inference_mode():
                        logits = scorer.classifier.classify(chunk_features.to(scorer.device))
                    features.append(chunk_features.float())
                    predicted.append(logits.argmax(1).cpu())
                stacked = torch.cat(features)
                low, high = bootstrap_interval(stacked, scorer.test_stats, config.bootstrap)
                row = {
                    "model": args.model,
                    "nfe": nfe,
                    "steps": steps,
                    "trained_for": trained_for,
                    "placement": placement,
                    "rmse_teacher": rmse_teacher,
                    "fd_indomain": frechet_distance(FeatureStats.of(stacked), scorer.test_stats),
                    "fd_ci_low": low,
                    "fd_ci_high": high,
                    "rmse_ref": float(torch.cat(errors).double().mean()),
                    "class_acc": float(torch.eq(torch.cat(predicted), labels).double().mean()),
                    "final_loss": sum(summary.final_loss),
                    "training_s": summary.wall_seconds,
                    "eval_s": time.perf_counter() - began,
                    "num_samples": args.num_samples,
                    "held_out": args.held_out,
                    "git_rev": (meta.get("git") or {}).get("revision"),
                }
                rows.append(row)
                print(
                    f"NFE {nfe} trained for {trained_for}, run with {placement}: rmse_teacher {rmse_teacher:.4f} "
                    f"FD {row['fd_indomain']:.3f} [{low:.3f}, {high:.3f}] rmse_ref {row['rmse_ref']:.4f}",
                    file=sys.stderr,
                )
                provenance.write_csv(args.out / "results.csv", rows)
                provenance.write_json(args.out / "results.json", meta, rows)
    return 0
