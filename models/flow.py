"""Rectified-flow (flow-matching) models as `solvers.Denoiser`s: the exact map onto the EDM sigma ODE.

A rectified-flow model is trained on x_t = (1 - t) x0 + t eps, t in [0, 1], and predicts the
velocity v(x_t, t) = E[eps - x0 | x_t]. Dividing by (1 - t) gives the EDM form

    x = x_t / (1 - t) = x0 + sigma eps,    sigma = t / (1 - t),    t = sigma / (1 + sigma),

and since x_t = (1 - t) x0_hat + t eps_hat with v = eps_hat - x0_hat, the data prediction is

    D(x, sigma) = x_t - t v(x_t, t) = (x - sigma v) / (1 + sigma),    x_t = x / (1 + sigma).

The EDM probability-flow ODE dx/dsigma = (x - D) / sigma is then the flow ODE dx_t/dt = v
written in other coordinates (docs/models.md, "Rectified-flow models", has the derivation), so every solver of the
registry runs a flow model unchanged. Its range is finite only for t < 1: pure noise (t = 1) is
sigma = inf, so a schedule starts at t_max < 1.

A time shift (SD3's `shift`, Flux's dynamic e^mu) reparameterises the sampling grid,
t' = s t / (1 + (s - 1) t), which is sigma' = s sigma: the network still sees its true t, only
the range a grid spans moves, to [s sigma(t_min), s sigma(t_max)]. All the EDM schedules built from
that range are the unshifted ones times s.

Depends on the solver contract's conventions only; knows no network (the UNet adapter and the
transformer pipelines call `FlowSchedule`'s three maps, a bare velocity function goes through
`FlowDenoiser`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .errors import UnsupportedSchedulerError

FLOW_PREDICTION = "flow_prediction"  # diffusers' name for the velocity target of its flow schedulers
FLOW_SCHEDULERS = frozenset({"FlowMatchEulerDiscreteScheduler"})
TIME_SHIFT_TYPES = ("exponential", "linear")
MAX_TRAIN_TIMESTEPS = 100_000
_DEFAULTS: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 1.0}

# A velocity model with its conditioning bound: v(x_t (B, ...), t (B,)) -> (B, ...).
Velocity = Callable[[Tensor, Tensor], Tensor]


def sigma_of_t(t: Tensor | float) -> Tensor | float:
    """sigma = t / (1 - t): flow time to EDM noise level (t < 1)."""
    return t / (1.0 - t)


def t_of_sigma(sigma: Tensor) -> Tensor:
    """t = sigma / (1 + sigma): EDM noise level to flow time; same shape and dtype."""
    return sigma / (1.0 + sigma)


def shifted_t(t: float, shift: float) -> float:
    """diffusers' shifted time s t / (1 + (s - 1) t), i.e. sigma' = s sigma."""
    return shift * t / (1.0 + (shift - 1.0) * t)


@dataclass(frozen=True)
class FlowSchedule:
    """The time range, shift and timestep convention of a rectified-flow network.

    Attributes:
        t_min, t_max: the unshifted flow times a grid spans, 0 < t_min < t_max < 1.
        shift: s > 0, the grid's time shift (sigma' = s sigma); 1 for none.
        timestep_scale: the network's timestep is t * timestep_scale (diffusers: num_train_timesteps).
    """

    t_min: float
    t_max: float
    shift: float = 1.0
    timestep_scale: float = 1000.0
    prediction_type: str = FLOW_PREDICTION
    # None: continuous in t, no levels for the `discrete` schedule (a bare flow UNet);
    # with_trained_levels() sets the training grid (the SD3 / Flux pipelines).
    sigma_levels: Tensor | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.t_min < self.t_max < 1.0:
            raise UnsupportedSchedulerError(
                "t_min, t_max", (self.t_min, self.t_max), "0 < t_min < t_max < 1 (t = 1 is sigma = inf)"
            )
        if not (math.isfinite(self.shift) and self.shift > 0.0):
            raise UnsupportedSchedulerError("shift", self.shift, "a finite number > 0")
        if not (math.isfinite(self.timestep_scale) and self.timestep_scale > 0.0):
            raise UnsupportedSchedulerError("timestep_scale", self.timestep_scale, "a finite number > 0")

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, mu: float | None = None, t_max: float | None = None
    ) -> FlowSchedule:
        """The schedule of a diffusers FlowMatchEulerDiscreteScheduler config (or its parsed JSON).

        diffusers trains and samples on t = k / N, k = 1..N (N = num_train_timesteps), starting at
        pure noise; here the range is [1 / N, t_max] with t_max = 1 - 1 / N by default, the last
        level short of t = 1 (sigma_max = N - 1 before the shift). Read: num_train_timesteps,
        shift, use_dynamic_shifting and time_shift_type; the grid-only fields (use_karras_sigmas,
        invert_sigmas, shift_terminal, ...) are the schedule's business, not the model's.

        Args:
            mu: the dynamic shift's parameter (Flux: from the image's token count); required when
                use_dynamic_shifting is true: shift = e^mu ("exponential") or mu ("linear").
            t_max: the largest flow time a grid starts at, in (1 / N, 1).
        Raises:
            UnsupportedSchedulerError: naming the field and what is allowed.
        """
        values = {**_DEFAULTS, **config}
        count = values["num_train_timesteps"]
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= MAX_TRAIN_TIMESTEPS:
            raise UnsupportedSchedulerError("num_train_timesteps", count, f"an integer in 2..{MAX_TRAIN_TIMESTEPS}")
        if values.get("use_dynamic_shifting", False):
            kind = values.get("time_shift_type", "exponential")
            if kind not in TIME_SHIFT_TYPES:
                raise UnsupportedSchedulerError("time_shift_type", kind, f"one of {', '.join(TIME_SHIFT_TYPES)}")
            if mu is None or not math.isfinite(mu):
                raise UnsupportedSchedulerError(
                    "mu", mu, "a finite number: use_dynamic_shifting needs the shift parameter of the image size"
                )
            shift = math.exp(mu) if kind == "exponential" else float(mu)
        else:
            shift = values["shift"]
            if isinstance(shift, bool) or not isinstance(shift, Real):
                raise UnsupportedSchedulerError("shift", shift, "a number > 0")
        top = 1.0 - 1.0 / count if t_max is None else t_max
        return cls(t_min=1.0 / count, t_max=float(top), shift=float(shift), timestep_scale=float(count))

    def with_trained_levels(self) -> FlowSchedule:
        """This schedule with `sigma_levels`: the training grid t = k / N, k = 1..N-1 (N =
        timestep_scale), shifted, as sigmas (ascending, float64): the levels diffusers'
        FlowMatchEulerDiscreteScheduler builds its `sigmas` from, t = 1 (sigma = inf) left out. The
        `discrete` schedule then picks the model's own grid from them. Needs the default range
        [1 / N, 1 - 1 / N] (from_config without t_max)."""
        count = round(self.timestep_scale)
        if abs(self.t_min * count - 1.0) > 1e-9 or abs(self.t_max * count - (count - 1)) > 1e-9:
            raise UnsupportedSchedulerError(
                "t_min, t_max", (self.t_min, self.t_max), f"1 / {count} and 1 - 1 / {count} (the training grid's ends)"
            )
        t = torch.arange(1, count, dtype=torch.float64) / count
        return replace(self, sigma_levels=self.shift * t / (1.0 - t))

    @property
    def sigma_min(self) -> float:
        return self.shift * self.t_min / (1.0 - self.t_min)

    @property
    def sigma_max(self) -> float:
        return self.shift * self.t_max / (1.0 - self.t_max)

    # The three maps a network adapter needs (models.diffusers_unet.Parameterisation). `sigma_b`
    # is sigma shaped (B, 1, ..., 1) in x's dtype; `sigma` (B,) of any float dtype.

    def network_input(self, x: Tensor, sigma_b: Tensor) -> Tensor:
        """x_t = x / (1 + sigma): the point on the straight path the network was trained on."""
        return x / (1.0 + sigma_b)

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's timestep t * timestep_scale, t = sigma / (1 + sigma), shape (B,), float64.
        Smooth in sigma (AMED differentiates through it)."""
        sigma64 = sigma.to(torch.float64)
        return t_of_sigma(sigma64) * self.timestep_scale

    def denoised(self, x: Tensor, sigma_b: Tensor, output: Tensor) -> Tensor:
        """D = x_t - t v = (x - sigma v) / (1 + sigma), from the velocity `output`; shape and dtype of x."""
        return (x - sigma_b * output) / (1.0 + sigma_b)


class FlowDenoiser:
    """A velocity function v(x_t, t) with its conditioning bound, as a `solvers.Denoiser`.

    For models that are not diffusers UNets (the SD3 / Flux transformers, closed-form fields); a
    flow UNet goes through `UNetDenoiser` with a `FlowSchedule`, which calls the same maps.

    Args:
        velocity: v(x_t, t): x_t (B, ...) in x's dtype, t (B,) float64 in (0, 1) -> (B, ...).
        schedule: the range, shift and timestep convention.
        evals_per_call: network evaluations per call of `velocity` (2 when it runs a guided pair).
    """

    def __init__(self, velocity: Velocity, schedule: FlowSchedule, *, evals_per_call: int = 1) -> None:
        self.velocity = velocity
        self.schedule = schedule
        self.sigma_min = schedule.sigma_min
        self.sigma_max = schedule.sigma_max
        self.sigma_levels: Tensor | None = None
        self.evals_per_call = evals_per_call

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """D(x, sigma): x (B, ...) = x0 + sigma eps, sigma (B,). Returns the data prediction, shape and dtype of x."""
        sigma_b = sigma.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        t = t_of_sigma(sigma.to(device=x.device, dtype=torch.float64))
        v = self.velocity(self.schedule.network_input(x, sigma_b), t).to(x.dtype)
        return self.schedule.denoised(x, sigma_b, v)


__all__ = [
    "FLOW_PREDICTION",
    "FLOW_SCHEDULERS",
    "FlowDenoiser",
    "FlowSchedule",
    "Velocity",
    "shifted_t",
    "sigma_of_t",
    "t_of_sigma",
]
