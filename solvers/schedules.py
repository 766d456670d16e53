"""Time schedules: the decreasing sigma grids the solvers step along.

Every schedule returns float64 sigmas of length steps + 1, strictly decreasing, the last entry
> 0 and the whole grid inside the model's trained range. With u = i / steps:

- `polynomial` (Karras et al. 2022): sigma_i = (smax^(1/rho) + u (smin^(1/rho) - smax^(1/rho)))^rho.
- `logsnr`: uniform in log sigma (uniform in half-log-SNR lambda = -log sigma).
- `time_uniform`: uniform in VP time t_i = (1 + u (eps_s^(1/rho) - 1))^rho, mapped through
  sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) with beta_d, beta_min fitted so that
  sigma(1) = sigma_max and sigma(eps_s) = sigma_min (`fit_vp_betas`).
- `discrete`: the trained levels of a discrete-time model, picked with leading / trailing /
  linspace spacing (the diffusers conventions), always ending at the smallest trained sigma.
- `custom`: an explicit list, validated.
- `learned`: a grid trained for one model, solver, NFE, AFS and guidance (GITS or LD3,
  solvers/learned), looked up by the caller in the artifact store and passed in as `grid`;
  validated here like any other grid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

import pydantic
import torch
from torch import Tensor

from .errors import InvalidParameterError, UnknownScheduleError
from .registry import MAX_STEPS, Params, Registry, parse_params

PositiveFloat = Annotated[float, pydantic.Field(gt=0, allow_inf_nan=False)]


class RangeParams(Params):
    """Optional narrowing of the model's sigma range (must stay inside it)."""

    sigma_min: PositiveFloat | None = None
    sigma_max: PositiveFloat | None = None


# rho of the polynomial and time-uniform grids. The grids are computed relative to their top end,
# so no rho overflows (the textbook smax^(1/rho) does below rho ~ 0.007 for smax = 80). rho = 0.01
# already puts every sigma but the last within 7% of the top at 1000 steps (one jump to the
# bottom); much lower, consecutive sigmas coincide in float64. Above 100 the polynomial grid is
# indistinguishable from `logsnr` (its rho -> infinity limit).
Rho = Annotated[float, pydantic.Field(ge=0.01, le=100, allow_inf_nan=False)]


class PolynomialParams(RangeParams):
    rho: Rho = 7.0


class LogSNRParams(RangeParams):
    pass


class TimeUniformParams(RangeParams):
    rho: Rho = 1.0
    # VP time of sigma_min (sigma_max sits at t = 1). fit_vp_betas also needs
    # eps_s (2 - eps_s) log(1 + sigma_max^2) > log(1 + sigma_min^2), checked per model: 4.9e-6 for
    # EDM's 0.002..80, so 1e-6 leaves room for models with a smaller sigma_min. Up to 0.99 the grid
    # still spans [eps_s, 1] with finite betas.
    eps_s: Annotated[float, pydantic.Field(ge=1e-6, le=0.99, allow_inf_nan=False)] = 1e-3


class DiscreteParams(Params):
    spacing: Literal["linspace", "leading", "trailing"] = "linspace"
    offset: Annotated[int, pydantic.Field(ge=0, le=10)] = 1
    """Added to `leading` timesteps (diffusers' steps_offset); ignored by the other spacings."""


class CustomParams(Params):
    sigmas: Annotated[list[float], pydantic.Field(min_length=2, max_length=MAX_STEPS + 1)]


LEARNED_METHODS = ("gits", "ld3")


class LearnedParams(Params):
    method: Literal["gits", "ld3"] | None = None
    """Which trained grid: LD3 (trained sigmas) or GITS (dynamic programming over a fine grid).
    Unset: the model's better grid for this solver and NFE, as the store resolves it (the only
    one trained, else the one its folder's ranking scored lower, else LD3)."""


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    description: str
    params: type[Params]
    fn: Callable[..., Tensor]
    needs_levels: bool = False
    needs_grid: bool = False
    """A stored grid (the `learned` schedule): the caller looks it up and passes it as `grid`."""

    def parse_params(self, value: Params | Mapping[str, Any] | None) -> Params:
        return parse_params(self.params, value, "schedule_params")


SCHEDULES: Registry[ScheduleSpec] = Registry("schedule", UnknownScheduleError)

# The decorator hands the schedule function back unchanged, signature included.
ScheduleFn = TypeVar("ScheduleFn", bound=Callable[..., Tensor])


def _register(
    name: str, description: str, params: type[Params], *, needs_levels: bool = False, needs_grid: bool = False
) -> Callable[[ScheduleFn], ScheduleFn]:
    def wrap(fn: ScheduleFn) -> ScheduleFn:
        SCHEDULES.add(name, ScheduleSpec(name, description, params, fn, needs_levels, needs_grid))
        return fn

    return wrap


def _range(params: RangeParams, sigma_min: float, sigma_max: float) -> tuple[float, float]:
    lo = sigma_min if params.sigma_min is None else params.sigma_min
    hi = sigma_max if params.sigma_max is None else params.sigma_max
    tol = 1e-9
    if lo < sigma_min * (1 - tol) or lo > sigma_max:
        raise InvalidParameterError("schedule_params.sigma_min", lo, f"a value in [{sigma_min}, {sigma_max})")
    if hi > sigma_max * (1 + tol) or hi <= lo:
        raise InvalidParameterError("schedule_params.sigma_max", hi, f"a value in ({lo}, {sigma_max}]")
    return lo, hi


def _u(steps: int) -> Tensor:
    return torch.arange(steps + 1, dtype=torch.float64) / steps


@_register("polynomial", "Karras et al. (EDM) polynomial spacing in sigma, rho=7 by default", PolynomialParams)
def polynomial(steps: int, sigma_min: float, sigma_max: float, params: PolynomialParams, **_: Any) -> Tensor:
    lo, hi = _range(params, sigma_min, sigma_max)
    # (hi^(1/rho) + u (lo^(1/rho) - hi^(1/rho)))^rho with hi^(1/rho) factored out (no overflow);
    # float ** float is typed Any (it may be complex): the base is positive here.
    ratio: float = (lo / hi) ** (1.0 / params.rho)
    sigmas = hi * (1.0 + _u(steps) * (ratio - 1.0)) ** params.rho
    sigmas[0], sigmas[-1] = hi, lo  # exact endpoints despite rounding in the power
    return sigmas


@_register("logsnr", "uniform in log sigma (uniform log-SNR)", LogSNRParams)
def logsnr(steps: int, sigma_min: float, sigma_max: float, params: LogSNRParams, **_: Any) -> Tensor:
    lo, hi = _range(params, sigma_min, sigma_max)
    sigmas = torch.exp(math.log(hi) + _u(steps) * (math.log(lo) - math.log(hi)))
    sigmas[0], sigmas[-1] = hi, lo
    return sigmas


def fit_vp_betas(sigma_min: float, sigma_max: float, eps_s: float = 1e-3) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP schedule with sigma(1) = sigma_max and sigma(eps_s) = sigma_min.

    log(1 + sigma(t)^2) = beta_d t^2 / 2 + beta_min t is linear in (beta_d, beta_min), so the two
    conditions are a 2x2 linear system. For 0.002 / 80 it gives beta_d = 17.538, beta_min = -0.00477.
    """
    a = math.log1p(sigma_max**2)
    b = math.log1p(sigma_min**2)
    # sigma(t) is increasing on [eps_s, 1] iff its exponent's slope beta_d t + beta_min is positive
    # at both ends; at eps_s it always is, at 1 it needs b < a eps_s (2 - eps_s).
    if b >= a * eps_s * (2.0 - eps_s):
        needed = 1.0 - math.sqrt(max(0.0, 1.0 - b / a))
        raise InvalidParameterError(
            "schedule_params.eps_s",
            eps_s,
            f"a value above {needed:.3g} for the range [{sigma_min}, {sigma_max}]",
            "a VP time grid needs log(1 + sigma_min^2) < eps_s (2 - eps_s) log(1 + sigma_max^2)",
        )
    det = 0.5 * eps_s - 0.5 * eps_s**2  # | 1/2 1 ; eps^2/2 eps |
    beta_d = (a * eps_s - b) / det
    beta_min = (0.5 * b - 0.5 * eps_s**2 * a) / det
    return beta_d, beta_min


def vp_sigma(t: Tensor, beta_d: float, beta_min: float) -> Tensor:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    return torch.sqrt(torch.expm1(0.5 * beta_d * t**2 + beta_min * t))


def vp_time(sigma: Tensor, beta_d: float, beta_min: float) -> Tensor:
    """The inverse of `vp_sigma`: the positive root of beta_d t^2 / 2 + beta_min t = log(1 + sigma^2)."""
    level = torch.log1p(sigma**2)
    root = torch.sqrt(beta_min**2 + 2 * beta_d * level)
    if beta_min > 0:  # the same root without the cancellation of root - beta_min
        return 2 * level / (root + beta_min)
    return (root - beta_min) / beta_d


@_register(
    "time_uniform",
    "uniform in VP time (DPM-Solver's time-uniform), VP betas fitted to the range",
    TimeUniformParams,
)
def time_uniform(steps: int, sigma_min: float, sigma_max: float, params: TimeUniformParams, **_: Any) -> Tensor:
    lo, hi = _range(params, sigma_min, sigma_max)
    beta_d, beta_min = fit_vp_betas(lo, hi, params.eps_s)
    inv = 1.0 / params.rho
    t = (1.0 + _u(steps) * (params.eps_s**inv - 1.0)) ** params.rho
    sigmas = vp_sigma(t, beta_d, beta_min)
    sigmas[0], sigmas[-1] = hi, lo
    return sigmas


@_register(
    "discrete",
    "the model's trained sigma levels, leading / trailing / linspace spacing",
    DiscreteParams,
    needs_levels=True,
)
def discrete(steps: int, params: DiscreteParams, sigma_levels: Tensor, **_: Any) -> Tensor:
    """Picks S+1 trained levels. `linspace`: round(linspace(T-1, 0, S+1)); `leading`: the
    timesteps k * (T // S) + offset for k = S-1..0, then 0; `trailing`: round(T - k T / S) - 1
    for k = 0..S-1, then 0. Index 0 (the smallest trained sigma) always ends the grid."""
    levels = sigma_levels.to(torch.float64)
    count = levels.numel()
    idx = _discrete_indices(count, steps, params)
    if not _strictly_decreasing(idx):
        most = next(s for s in range(steps - 1, 0, -1) if _strictly_decreasing(_discrete_indices(count, s, params)))
        raise InvalidParameterError(
            "steps", steps, f"at most {most} steps for spacing {params.spacing!r} over {count} trained levels"
        )
    return levels[idx]


def _discrete_indices(count: int, steps: int, params: DiscreteParams) -> Tensor:
    """The S+1 trained indices of `discrete` (see there), possibly with repeats when S is too large."""
    if params.spacing == "linspace":
        return torch.linspace(count - 1, 0, steps + 1, dtype=torch.float64).round().long()
    if params.spacing == "leading":
        ratio = count // steps
        starts = torch.arange(steps - 1, -1, -1, dtype=torch.long) * ratio + params.offset
        return torch.cat([starts.clamp(max=count - 1), torch.zeros(1, dtype=torch.long)])
    starts = (count - torch.arange(steps, dtype=torch.float64) * count / steps).round().long() - 1
    return torch.cat([starts, torch.zeros(1, dtype=torch.long)])


def _strictly_decreasing(idx: Tensor) -> bool:
    return bool((idx[1:] < idx[:-1]).all())


@_register("custom", "an explicit decreasing list of sigmas (steps + 1 values)", CustomParams)
def custom(steps: int, params: CustomParams, **_: Any) -> Tensor:
    if len(params.sigmas) != steps + 1:
        raise InvalidParameterError(
            "schedule_params.sigmas", f"{len(params.sigmas)} values", f"steps + 1 = {steps + 1} values"
        )
    return torch.tensor(params.sigmas, dtype=torch.float64)


@_register(
    "learned",
    "a grid trained for this model, solver, NFE, AFS and guidance (method gits or ld3; sampler-amed train-schedule)",
    LearnedParams,
    needs_grid=True,
)
def learned(steps: int, params: LearnedParams, grid: Tensor | None, **_: Any) -> Tensor:
    if grid is None:  # the caller resolves the grid; a bare call has nothing to step along
        raise InvalidParameterError(
            "schedule", "learned", "a stored grid: look it up in the artifact store (sampler-amed list)"
        )
    if grid.numel() != steps + 1:
        raise InvalidParameterError("schedule", f"learned grid of {grid.numel()} sigmas", f"{steps + 1} sigmas")
    return grid.to(torch.float64).cpu()


def build_sigmas(
    schedule: str,
    steps: int,
    *,
    sigma_min: float,
    sigma_max: float,
    sigma_levels: Tensor | None = None,
    params: Params | Mapping[str, Any] | None = None,
    grid: Tensor | None = None,
) -> Tensor:
    """The grid of `schedule` for `steps` intervals within the model's [sigma_min, sigma_max].
    `grid` is the stored grid of the `learned` schedule (ignored by the others).

    Returns:
        float64 CPU tensor (steps + 1,), strictly decreasing, last entry > 0, inside the range.
    Raises:
        UnknownScheduleError, InvalidParameterError.
    """
    spec = SCHEDULES.get(schedule)
    parsed = spec.parse_params(params)
    if spec.needs_levels and sigma_levels is None:
        raise InvalidParameterError(
            "schedule", schedule, "a continuous-time schedule (this model has no trained sigma levels)"
        )
    sigmas = spec.fn(
        steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, params=parsed, sigma_levels=sigma_levels, grid=grid
    )
    check_sigmas(sigmas, sigma_min, sigma_max, field="schedule_params.sigmas" if schedule == "custom" else "schedule")
    return sigmas


def check_sigmas(sigmas: Tensor, sigma_min: float, sigma_max: float, field: str = "sigmas") -> None:
    """Raise InvalidParameterError unless sigmas is finite, strictly decreasing, > 0 and in range."""
    values = sigmas.tolist()
    tol = 1e-9
    if len(values) < 2:
        raise InvalidParameterError(field, values, "at least two sigmas")
    if not all(math.isfinite(v) for v in values):
        raise InvalidParameterError(field, values, "finite values")
    if any(b >= a for a, b in itertools.pairwise(values)):
        raise InvalidParameterError(field, values, "a strictly decreasing sequence")
    if values[-1] <= 0:
        raise InvalidParameterError(field, values, "a last entry > 0")
    if values[-1] < sigma_min * (1 - tol) or values[0] > sigma_max * (1 + tol):
        raise InvalidParameterError(field, values, f"values inside the model's range [{sigma_min}, {sigma_max}]")
