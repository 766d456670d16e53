"""A sampling run validated once: `plan(...)` checks a solver, its parameters, the step budget, the
schedule and its grid, and returns a frozen `SamplingPlan` that `sample(denoiser, noise, plan=...)`
runs without looking anything up again.

A plan depends on the model only through its sigma range (and the trained sigma levels of a
discrete-time model), so a service builds it at the boundary, before a request is admitted, and
the grid that is reported is the grid that runs. Imports nothing outside `solvers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .errors import InvalidParameterError
from .registry import MAX_STEPS, SOLVERS, Params, SolverSpec
from .schedules import SCHEDULES, build_sigmas


@dataclass(frozen=True)
class SamplingPlan:
    """What a sampling run will do, validated: everything but the model, the noise and the predictor.

    Attributes:
        spec: the solver's registry entry.
        params: its parsed parameters.
        schedule, schedule_params: the schedule's name and parsed parameters.
        grid: the whole float64 grid of `steps` intervals, shape (steps + 1,) (do not modify it).
        steps: intervals of the whole grid.
        start: image-to-image: the run enters the grid after this many intervals (0: from noise).
        afs: analytical first step (the first direction costs no call).
        final_denoise: the run ends with D(x, sigmas[-1]), one more call.
        sigma_min, sigma_max: the model range the grid was built and checked for.
    """

    spec: SolverSpec[Any]
    params: Params
    schedule: str
    schedule_params: Params
    grid: Tensor = field(repr=False)
    steps: int
    start: int = 0
    afs: bool = False
    final_denoise: bool = False
    sigma_min: float = 0.0
    sigma_max: float = 0.0

    @property
    def solver(self) -> str:
        return self.spec.name

    @property
    def sigmas(self) -> Tensor:
        """The float64 grid that is run, from the start step on: shape (run_steps + 1,)."""
        return self.grid[self.start :]

    @property
    def run_steps(self) -> int:
        """Intervals run: steps - start."""
        return self.steps - self.start

    @property
    def solver_nfe(self) -> int:
        """Denoiser calls per sample of the solver's steps (final_denoise not included)."""
        return self.spec.nfe(self.run_steps, self.afs)

    @property
    def nfe(self) -> int:
        """Denoiser calls per sample of the whole run, final_denoise included (what is counted)."""
        return self.solver_nfe + int(self.final_denoise)

    @property
    def evals_per_step(self) -> int:
        """Denoiser calls per step of the solver (before AFS); each call costs the denoiser's
        evals_per_call network evaluations (2 under classifier-free guidance)."""
        return self.spec.evals_per_step

    @property
    def needs_predictor(self) -> bool:
        return self.spec.needs_predictor


def check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InvalidParameterError("steps", steps, f"an integer in 1..{MAX_STEPS}")
    return steps


def plan(
    solver: str,
    *,
    steps: int | None = None,
    nfe: int | None = None,
    schedule: str = "polynomial",
    schedule_params: Params | Mapping[str, Any] | None = None,
    solver_params: Params | Mapping[str, Any] | None = None,
    afs: bool = False,
    sigma_min: float,
    sigma_max: float,
    sigma_levels: Tensor | None = None,
    grid: Tensor | None = None,
    start: int = 0,
    final_denoise: bool = False,
    image_to_image: bool = False,
) -> SamplingPlan:
    """Validate a sampling run once and build its grid.

    Args:
        solver: a name from SOLVERS (see list_solvers()).
        steps: intervals of the schedule, 1..1000; or
        nfe: the solver's denoiser calls per sample over the whole grid (final_denoise not
            included): the step count that costs exactly that many (refused, naming the nearest
            reachable values, when none does). Give steps or nfe, not both.
        schedule, schedule_params: a name from SCHEDULES and its parameters.
        solver_params: the solver's parameters (a mapping or its Params model).
        afs: analytical first step: the first direction costs no call (saves 1 NFE).
        sigma_min, sigma_max, sigma_levels: the model's range (and trained levels, discrete-time
            models) the grid is built in.
        grid: the stored sigmas of the `learned` schedule, float64 (steps + 1,).
        start: enter the grid after this many intervals (image-to-image; see start_step).
        final_denoise: end with D(x, sigmas[-1]), one more counted call.
        image_to_image: the run will start from an init image (AFS is refused then).
    Returns:
        the frozen SamplingPlan.
    Raises:
        UnknownSolverError, UnknownScheduleError, InvalidParameterError, UnreachableNFEError.
    """
    spec = SOLVERS.get(solver)
    if steps is not None and nfe is not None:
        raise InvalidParameterError("nfe", nfe, "unset when steps is given: give steps or nfe")
    if nfe is None:
        steps = check_steps(steps)
    params = spec.parse_params(solver_params)
    if not isinstance(afs, bool):
        raise InvalidParameterError("afs", afs, "a boolean")
    if steps is None:
        if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
            raise InvalidParameterError("nfe", nfe, "a positive integer")
        steps = spec.require_steps_for_nfe(nfe, afs, params)
    min_steps = spec.min_steps_of(params)
    if steps < min_steps:
        raise InvalidParameterError("steps", steps, f"at least {min_steps} for solver {solver!r} with these parameters")
    if spec.nfe(steps, afs) < 1:
        raise InvalidParameterError(
            "afs", afs, f"afs=False with steps={steps}: that AFS run would make no network call"
        )
    if not isinstance(final_denoise, bool):
        raise InvalidParameterError("final_denoise", final_denoise, "a boolean")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < steps:
        raise InvalidParameterError("start", start, f"an integer in 0..{steps - 1}")
    if image_to_image and afs:
        # AFS's free first direction assumes D = 0 at the start: true of noise, not of an image.
        raise InvalidParameterError(
            "afs", afs, "False when sampling from an init image (AFS assumes the run starts from noise)"
        )
    if start and steps - start < min_steps:
        raise InvalidParameterError(
            "start", start, f"at most {steps - min_steps}: solver {solver!r} needs {min_steps} steps"
        )
    if start and spec.needs_predictor:
        raise InvalidParameterError("start", start, f"0: solver {solver!r}'s predictor is trained on the whole grid")
    parsed_schedule = SCHEDULES.get(schedule).parse_params(schedule_params)
    sigmas = build_sigmas(
        schedule,
        steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        sigma_levels=sigma_levels,
        params=parsed_schedule,
        grid=grid,
    )
    spec.check_grid(params, sigmas, sigma_min, sigma_max)
    return SamplingPlan(
        spec=spec,
        params=params,
        schedule=schedule,
        schedule_params=parsed_schedule,
        grid=sigmas,
        steps=steps,
        start=start,
        afs=afs,
        final_denoise=final_denoise,
        sigma_min=float(sigma_min),
        sigma_max=float(sigma_max),
    )


__all__ = ["SamplingPlan", "check_steps", "plan"]
