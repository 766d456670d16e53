"""The entry point: `sample(denoiser, noise, plan=...)` (or `solver=..., steps=...`) and per-sample noise.

`noise` is unit-variance Gaussian noise; it is scaled by the first sigma of the schedule here,
so callers never scale it themselves. NFE is measured by a counting wrapper around the
denoiser, never computed from a formula (the registry's formula is what tests compare it with).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .contract import CountingDenoiser, Denoiser, StepCallback, per_sample_sigma
from .errors import InvalidParameterError, MissingPredictorError
from .planning import SamplingPlan, check_steps
from .planning import plan as make_plan
from .registry import SOLVERS, Params
from .stepping import Progress

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SampleResult:
    """What a sampling run produced and what it cost.

    Attributes:
        images: the samples at sigmas[-1] (or D(x, sigma_min) with final_denoise), shape of the noise.
        nfe: denoiser calls per sample, counted.
        network_evals: nfe x evals_per_call (2 per call under classifier-free guidance), counted.
        sigmas: the float64 grid that was run, shape (steps + 1,) (from the start step on, for img2img).
        steps: the number of intervals run.
        solver: the solver's registry name.
    """

    images: Tensor
    nfe: int
    network_evals: int
    sigmas: Tensor
    steps: int
    solver: str


def _check_noise(noise: object) -> Tensor:
    if not isinstance(noise, Tensor):
        raise InvalidParameterError("noise", type(noise).__name__, "a torch.Tensor of shape (B, ...)")
    if noise.dim() < 2 or noise.shape[0] < 1 or noise.numel() == 0:
        raise InvalidParameterError("noise", tuple(noise.shape), "a non-empty tensor of shape (B, ...), B >= 1")
    if not noise.is_floating_point():
        raise InvalidParameterError("noise", noise.dtype, "a floating-point tensor (float32 or float64)")
    if not bool(torch.isfinite(noise).all()):
        raise InvalidParameterError("noise", "non-finite values", "finite values (no NaN or inf)")
    return noise


def start_step(steps: int, strength: float) -> int:
    """Where an image-to-image run enters a grid of `steps` intervals over the full sigma range,
    as diffusers' img2img pipelines do: after steps - int(steps * strength) intervals, so that
    int(steps * strength) are run (strength 1: all of them, from pure noise).

    Raises:
        InvalidParameterError: strength outside (0, 1], or so small that no step would run.
    """
    steps = check_steps(steps)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
        raise InvalidParameterError("strength", strength, "a number in (0, 1]")
    run = min(int(steps * strength), steps)
    if run < 1:
        raise InvalidParameterError(
            "strength", strength, f"at least {1 / steps:.6g} with steps={steps} (int(steps * strength) >= 1)"
        )
    return steps - run


def sample(
    denoiser: Denoiser,
    noise: Tensor,
    *,
    plan: SamplingPlan | None = None,
    solver: str | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    schedule: str = "polynomial",
    schedule_params: Params | Mapping[str, Any] | None = None,
    solver_params: Params | Mapping[str, Any] | None = None,
    afs: bool = False,
    predictor: Any = None,
    grid: Tensor | None = None,
    callback: StepCallback | None = None,
    final_denoise: bool = False,
    init: Tensor | None = None,
    start: int = 0,
) -> SampleResult:
    """Integrate the probability-flow ODE from sigma_max-scaled noise down to sigmas[-1].

    Either run a `plan` (built once by `solvers.plan`; nothing is looked up or validated again
    but the noise, the init image and the predictor), or describe the run with the keywords
    below: then this is `plan(...)` for the denoiser's sigma range followed by the run.

    Args:
        denoiser: the model, with its conditioning already bound; its sigma range must be the plan's.
        noise: unit-variance noise, shape (B, ...); scaled by sigmas[0] here. Its dtype is the
            solver state's dtype (float32, or float64 for exact references).
        plan: a SamplingPlan; when given, solver .. final_denoise below must be left unset.
        solver: a name from SOLVERS (see list_solvers()).
        steps: intervals of the schedule, 1..1000: len(sigmas) = steps + 1; or
        nfe: the solver's calls per sample (see `plan`).
        schedule, schedule_params: a name from SCHEDULES and its parameters.
        solver_params: the solver's parameters (a mapping or its Params model).
        afs: analytical first step: the first direction costs no call (saves 1 NFE).
        predictor: the trained predictor of solvers that need one (AMED); else None.
        grid: the stored sigmas of the `learned` schedule, float64 (steps + 1,) (solvers/learned
            finds them); validated like any grid. Ignored by the other schedules.
        callback: called after each step with a StepInfo; return True to cancel.
        final_denoise: end with D(x, sigmas[-1]), one more counted call.
        init: image-to-image: the clean start (B, ...) (e.g. encoded latents), shape of the noise;
            the run starts from init + sigmas[start] * noise. None: from noise alone.
        start: enter the grid of `steps` intervals after this many (see start_step); the steps
            from there on are run and counted. 0 with init is None.
    Returns:
        SampleResult with the images and the counted nfe and network_evals.
    Raises:
        UnknownSolverError, UnknownScheduleError, InvalidParameterError, UnreachableNFEError,
        MissingPredictorError, SamplingCancelled.
    """
    if plan is None:
        if solver is None:
            raise InvalidParameterError("solver", solver, "a solver name (or a plan)")
        plan = make_plan(
            solver,
            steps=steps,
            nfe=nfe,
            schedule=schedule,
            schedule_params=schedule_params,
            solver_params=solver_params,
            afs=afs,
            sigma_min=denoiser.sigma_min,
            sigma_max=denoiser.sigma_max,
            sigma_levels=denoiser.sigma_levels,
            grid=grid,
            start=start,
            final_denoise=final_denoise,
            image_to_image=init is not None,
        )
    else:
        given = {
            "solver": solver is not None,
            "steps": steps is not None,
            "nfe": nfe is not None,
            "schedule": schedule != "polynomial",
            "schedule_params": schedule_params is not None,
            "solver_params": solver_params is not None,
            "afs": afs is not False,
            "grid": grid is not None,
            "final_denoise": final_denoise is not False,
            "start": start != 0,
        }
        clash = [name for name, set_ in given.items() if set_]
        if clash:
            raise InvalidParameterError(clash[0], "set with a plan", "unset: the plan says it")
    return run(plan, denoiser, noise, predictor=predictor, callback=callback, init=init)


def run(
    plan: SamplingPlan,
    denoiser: Denoiser,
    noise: Tensor,
    *,
    predictor: Any = None,
    callback: StepCallback | None = None,
    init: Tensor | None = None,
) -> SampleResult:
    """Run a validated plan (see `sample`): only the noise, the init image and the predictor are checked.

    Raises:
        InvalidParameterError, MissingPredictorError, SamplingCancelled.
    """
    spec = plan.spec
    noise = _check_noise(noise)
    if (denoiser.sigma_min, denoiser.sigma_max) != (plan.sigma_min, plan.sigma_max):
        raise InvalidParameterError(
            "plan",
            f"sigma range [{plan.sigma_min:g}, {plan.sigma_max:g}]",
            f"a plan built for this denoiser's range [{denoiser.sigma_min:g}, {denoiser.sigma_max:g}]",
        )
    if init is not None:
        if not isinstance(init, Tensor) or init.shape != noise.shape:
            shape = tuple(init.shape) if isinstance(init, Tensor) else type(init).__name__
            raise InvalidParameterError("init", shape, f"a tensor of the noise's shape {tuple(noise.shape)}")
        if plan.afs:
            # AFS's free first direction assumes D = 0 at the start: true of noise, not of an image.
            raise InvalidParameterError(
                "afs", plan.afs, "False when sampling from an init image (AFS assumes the run starts from noise)"
            )
    if spec.needs_predictor and predictor is None:
        raise MissingPredictorError(f"solver {spec.name!r}", [], f"sampler-amed train --solver {spec.name}")
    if not spec.needs_predictor and predictor is not None:
        raise InvalidParameterError(
            "predictor", type(predictor).__name__, f"None: solver {spec.name!r} uses no predictor"
        )
    sigmas = plan.sigmas
    counter = CountingDenoiser(denoiser)
    x = noise * sigmas[0].item()
    if init is not None:
        x = init.to(dtype=noise.dtype, device=noise.device) + x
    extra = {"predictor": predictor} if spec.needs_predictor else {}
    progress = Progress(callback, plan.run_steps)
    x = spec.fn(counter, x, sigmas, params=plan.params, afs=plan.afs, progress=progress, **extra)
    if plan.final_denoise:
        x = counter(x, per_sample_sigma(sigmas[-1].item(), x))
    return SampleResult(x, counter.calls, counter.network_evals, sigmas, plan.run_steps, spec.name)


def make_noise(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Unit Gaussian noise (len(seeds), *shape): one CPU generator per seed, drawn in float32, then
    moved, so a sample depends only on its seed, not on its batch, host or device."""
    rows = []
    for index, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidParameterError(f"seeds[{index}]", seed, f"an integer in 0..{MAX_SEED}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        rows.append(torch.randn(tuple(shape), generator=generator, dtype=torch.float32))
    if not rows:
        raise InvalidParameterError("seeds", list(seeds), "at least one seed")
    return torch.stack(rows).to(device=device, dtype=dtype)


def nfe_of(solver: str, steps: int, afs: bool = False, final_denoise: bool = False) -> int:
    """What a run will cost in denoiser calls per sample (the registry's announcement)."""
    return SOLVERS.get(solver).nfe(check_steps(steps), afs) + int(final_denoise)


__all__ = ["MAX_SEED", "SampleResult", "make_noise", "nfe_of", "run", "sample", "start_step"]
