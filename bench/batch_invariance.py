"""`batch-invariance`: how much a seed's image changes with the batch it is sampled in, per dtype.

    python -m bench batch-invariance                  # float64, float32, bfloat16 on this device
    python -m bench batch-invariance --dtypes float32 --solvers euler heun dpm_solver_2 --steps 3 10 \
        --out bench/results/batch-invariance-solvers  # per solver and step count

The service promises that a seed means the same image alone, in a batched request or merged with
other clients' requests: its noise comes from one CPU generator per seed. What is left is the
network's arithmetic: kernels chosen by batch size sum in different orders, and the ODE carries
those differences to the end. For each dtype this samples --seeds seeds alone and in batches of
--batch (same labels, each of --solvers at each of --steps) and reports, over seeds, the largest
absolute pixel difference, the largest and median per-seed RMSE, and the share of pixels that
differ by more than one 8-bit level (pixel range [-1, 1]; one level is 2/255). The source of it
all is in `denoiser_max_abs_diff`: the largest difference of one network evaluation, the first of
the run, alone vs in the batch; max_abs_diff / denoiser_max_abs_diff is how much the solver's
steps amplify it. `rowwise_max_abs_diff` repeats the comparison with the network run one row per
forward (`one_row_per_forward`): everything else (noise, the adapter's scaling, guidance, the
solver) then sees the batch, and 0 there shows that all of the difference is the network's
batch-size-dependent arithmetic, none of it a per-batch computation of ours.

With --gains it measures instead how much of one evaluation's difference each solver carries to
the image: in float64, D at one evaluation of the run is perturbed by uniform noise of amplitude
1e-4 and the largest change of the final image, divided by 1e-4, is that evaluation's gain
(batch-invariance-gains.csv: solver, steps, evaluation, sigma, gain).

    python -m bench batch-invariance --gains --solvers euler dpm_solver_2 heun dpmpp_2m --steps 3 10 \
        --seeds 4 --out bench/results/batch-invariance-gains

Writes bench/results/batch-invariance.csv and .json (or batch-invariance-gains.csv and .json).
"""

from __future__ import annotations

import argparse
import contextlib
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import models
import provenance
import solvers
from solvers.contract import per_sample_sigma

from .arguments import options_of, positive_int
from .errors import BenchError

NAME = "batch-invariance"
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "dtype",
    "device",
    "seeds",
    "batch",
    "solver",
    "steps",
    "denoiser_max_abs_diff",
    "max_abs_diff",
    "rowwise_max_abs_diff",
    "max_seed_rmse",
    "median_seed_rmse",
    "share_pixels_over_one_level",
    "torch_threads",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="difference of a seed's image alone vs batched, per dtype",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32", "bfloat16"])
    parser.add_argument("--seeds", type=positive_int, default=40)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--solvers", nargs="+", default=["dpmpp_2m"], help="registered training-free solvers")
    parser.add_argument("--steps", type=positive_int, nargs="+", default=[10])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--gains", action="store_true", help="per-evaluation gains in float64 (see above)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.set_defaults(handler=run)


@contextlib.contextmanager
def one_row_per_forward(model: models.DiffusionModel) -> Iterator[None]:
    """Within the block, the model's network (the diffusers UNet, not our adapter) runs each row of a
    batch as its own forward and concatenates the outputs: kernels then never see the batch size."""
    unet = model.unet
    forward: Any = unet.forward

    def rowwise(x: torch.Tensor, timestep: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        def row(i: int) -> torch.Tensor:
            labels = kwargs.get("class_labels")
            picked = {**kwargs, "class_labels": labels[i : i + 1] if labels is not None else None}
            return forward(x[i : i + 1], timestep[i : i + 1], *args, **picked).sample

        return types.SimpleNamespace(sample=torch.cat([row(i) for i in range(x.shape[0])]))

    unet.forward = rowwise  # type: ignore[method-assign]  # this instance only, undone below
    try:
        yield
    finally:
        del unet.forward  # the instance attribute: the class's forward shows through again


def _sample(model: models.DiffusionModel, seeds: list[int], solver: str, steps: int) -> torch.Tensor:
    labels = torch.tensor([seed % 10 for seed in seeds], device=model.device)
    denoiser = model.conditioned(labels, 1.0) if model.num_class_embeds is not None else model.conditioned()
    noise = solvers.make_noise(seeds, model.sample_shape, device=model.device)
    with torch.inference_mode():
        return solvers.sample(denoiser, noise, solver=solver, steps=steps).images.double().cpu()


def _first_evaluation(model: models.DiffusionModel, seeds: list[int]) -> torch.Tensor:
    """D(x, sigma_max) of the seeds' starting points, as one batch."""
    labels = torch.tensor([seed % 10 for seed in seeds], device=model.device)
    denoiser = model.conditioned(labels, 1.0) if model.num_class_embeds is not None else model.conditioned()
    x = solvers.make_noise(seeds, model.sample_shape, device=model.device) * model.sigma_max  # as sample() does
    with torch.inference_mode():
        return denoiser(x, per_sample_sigma(model.sigma_max, x)).double().cpu()


def measure(model: models.DiffusionModel, seeds: int, batch: int, solver: str, steps: int) -> dict[str, float]:
    differences, first, rowwise = [], [], []
    for start in range(0, seeds - seeds % batch, batch):
        group = list(range(start, start + batch))
        batched = _sample(model, group, solver, steps)
        batched_first = _first_evaluation(model, group)
        for k, seed in enumerate(group):
            differences.append((_sample(model, [seed], solver, steps)[0] - batched[k]).flatten())
            first.append((_first_evaluation(model, [seed])[0] - batched_first[k]).flatten())
        with one_row_per_forward(model):
            batched = _sample(model, group, solver, steps)
            for k, seed in enumerate(group):
                rowwise.append((_sample(model, [seed], solver, steps)[0] - batched[k]).flatten())
    stacked = torch.stack(differences)
    rmse = stacked.pow(2).mean(dim=1).sqrt()
    return {
        "denoiser_max_abs_diff": float(torch.stack(first).abs().max()),
        "max_abs_diff": float(stacked.abs().max()),
        "rowwise_max_abs_diff": float(torch.stack(rowwise).abs().max()),
        "max_seed_rmse": float(rmse.max()),
        "median_seed_rmse": float(rmse.median()),
        "share_pixels_over_one_level": float((stacked.abs() > 2 / 255).double().mean()),
    }


GAIN_PERTURBATION = 1e-4
GAIN_COLUMNS = ("solver", "steps", "evaluation", "sigma", "gain", "seeds", "device", "torch_threads")


class _PerturbedAt:
    """The denoiser, with D at call `index` (0-based; -1: none) plus a fixed uniform perturbation of
    amplitude GAIN_PERTURBATION; records the sigma of every call."""

    def __init__(self, inner: solvers.Denoiser, index: int) -> None:
        self.inner, self.index = inner, index
        self.sigmas: list[float] = []
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.sigma_levels, self.evals_per_call = inner.sigma_levels, inner.evals_per_call

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = self.inner(x, sigma)
        if len(self.sigmas) == self.index:
            generator = torch.Generator().manual_seed(1)
            noise = torch.rand(out.shape, generator=generator, dtype=torch.float64) * 2 - 1
            out = out + GAIN_PERTURBATION * noise.to(out)
        self.sigmas.append(float(sigma[0]))
        return out


def gains(model: models.DiffusionModel, seeds: int, solver: str, steps: int) -> list[dict[str, Any]]:
    """Each evaluation's gain (see the module docstring) for the seeds 0..seeds-1 as one batch."""
    group = list(range(seeds))
    labels = torch.tensor([seed % 10 for seed in group], device=model.device)
    noise = solvers.make_noise(group, model.sample_shape, device=model.device, dtype=torch.float64)
    rows = []
    with torch.inference_mode():
        unperturbed = _PerturbedAt(model.conditioned(labels, 1.0), -1)
        base = solvers.sample(unperturbed, noise, solver=solver, steps=steps).images
        for index, sigma in enumerate(unperturbed.sigmas):
            perturbed = _PerturbedAt(model.conditioned(labels, 1.0), index)
            images = solvers.sample(perturbed, noise, solver=solver, steps=steps).images
            change = float((images - base).abs().max()) / GAIN_PERTURBATION
            rows.append({"solver": solver, "steps": steps, "evaluation": index + 1, "sigma": sigma, "gain": change})
    return rows


def run_gains(args: argparse.Namespace, meta: dict[str, Any]) -> int:
    try:
        model = models.class_conditional(models.load(args.model, device=args.device, dtype="float64"))
    except models.ModelError as error:
        raise BenchError(str(error)) from None
    rows = []
    for solver in args.solvers:
        for steps in args.steps:
            for row in gains(model, args.seeds, solver, steps):
                rows.append(
                    {**row, "seeds": args.seeds, "device": str(model.device), "torch_threads": torch.get_num_threads()}
                )
            line = " ".join(f"{r['gain']:.2f}" for r in rows if r["solver"] == solver and r["steps"] == steps)
            print(f"{solver:>12} {steps:>3} steps: gain per evaluation {line}")
    provenance.write_csv(args.out / "batch-invariance-gains.csv", rows, GAIN_COLUMNS)
    provenance.write_json(args.out / "batch-invariance-gains.json", meta, rows)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = provenance.collect(options_of(args))  # at the start: the code and tree this run executes
    if args.seeds < args.batch:
        raise BenchError(f"--seeds {args.seeds} is below --batch {args.batch}: expected at least one full batch")
    for solver in args.solvers:
        spec = solvers.SOLVERS.get(solver) if solver in solvers.SOLVERS else None
        if spec is None or spec.needs_predictor:
            raise BenchError(f"--solvers {solver!r}: expected registered training-free solvers")
    if args.gains:
        return run_gains(args, meta)
    rows = []
    for dtype in args.dtypes:
        try:
            model = models.class_conditional(models.load(args.model, device=args.device, dtype=dtype))
        except models.ModelError as error:
            raise BenchError(str(error)) from None
        for solver in args.solvers:
            for steps in args.steps:
                row = {
                    "dtype": dtype,
                    "device": str(model.device),
                    "seeds": args.seeds - args.seeds % args.batch,
                    "batch": args.batch,
                    "solver": solver,
                    "steps": steps,
                    **measure(model, args.seeds, args.batch, solver, steps),
                    "torch_threads": torch.get_num_threads(),
                }
                rows.append(row)
                print(
                    f"{dtype:>9} {solver:>12} {steps:>3} steps: max |alone - batched| {row['max_abs_diff']:.2e} "
                    f"(one evaluation: {row['denoiser_max_abs_diff']:.2e}; network one row per forward: "
                    f"{row['rowwise_max_abs_diff']:.2e}), per-seed RMSE max "
                    f"{row['max_seed_rmse']:.2e} median {row['median_seed_rmse']:.2e}, pixels off by more than "
                    f"one 8-bit level {100 * row['share_pixels_over_one_level']:.2f}%"
                )
    provenance.write_csv(args.out / "batch-invariance.csv", rows, COLUMNS)
    provenance.write_json(args.out / "batch-invariance.json", meta, rows)
    return 0
