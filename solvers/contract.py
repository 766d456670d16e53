"""The contract between solvers and models.

A model reaches a solver only as a `Denoiser`: the data prediction D(x, sigma) of the EDM sigma
parameterisation, x = x0 + sigma * eps, whose probability-flow ODE is

    dx/dsigma = (x - D(x, sigma)) / sigma.

Conditioning (labels, guidance) is bound into the denoiser before sampling, so solvers never see
it. This module imports nothing else of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Denoiser(Protocol):
    """D(x, sigma) -> x0 estimate.

    Attributes:
        sigma_min, sigma_max: the sigma range the model was trained on.
        sigma_levels: the trained sigmas of a discrete-time model, ascending, float64, shape (T,)
            (index = training timestep); None for continuous-time models.
        evals_per_call: network evaluations per call (2 under classifier-free guidance, else 1).
    """

    sigma_min: float
    sigma_max: float
    sigma_levels: Tensor | None
    evals_per_call: int

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Args: x (B, ...) in the solver's dtype; sigma (B,), one per sample.
        Returns: the data prediction, same shape and dtype as x."""
        ...


@runtime_checkable
class FeatureDenoiser(Denoiser, Protocol):
    """A denoiser that can also return the U-Net's bottleneck feature (the AMED predictor's input)."""

    def denoise_with_feature(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """The same evaluation as __call__ (counted as one call), plus the lowest-resolution
        activation averaged over channels, shape (B, h, w)."""
        ...


@dataclass(frozen=True)
class StepInfo:
    """What a step callback receives after each completed step.

    Attributes:
        step: steps completed so far, 1..total.
        total: the number of steps (intervals) of the schedule.
        sigma: the sigma the state has just reached.
        denoised: the latest data prediction, shape (B, ...); for previews. Do not modify it.
        x: the state at `sigma`, shape (B, ...) (teacher trajectories, per-step error). Do not modify it.
    """

    step: int
    total: int
    sigma: float
    denoised: Tensor
    x: Tensor


class StepCallback(Protocol):
    """Progress, previews and cancellation: return True to stop sampling (raises SamplingCancelled)."""

    def __call__(self, info: StepInfo) -> bool | None: ...


class CountingDenoiser:
    """Wraps a denoiser and counts its calls; forwards `denoise_with_feature` when the wrapped one has it.

    `calls` is the NFE of the sampling run (each call covers the whole batch, so it is also the
    per-sample count); `network_evals` = calls x evals_per_call.
    """

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.sigma_min = inner.sigma_min
        self.sigma_max = inner.sigma_max
        self.sigma_levels = inner.sigma_levels
        self.evals_per_call = inner.evals_per_call
        self.calls = 0

    @property
    def network_evals(self) -> int:
        return self.calls * self.evals_per_call

    @property
    def has_feature(self) -> bool:
        return isinstance(self.inner, FeatureDenoiser)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.calls += 1
        return self.inner(x, sigma)

    def denoise_with_feature(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        if not isinstance(self.inner, FeatureDenoiser):
            raise TypeError(f"{type(self.inner).__name__} does not provide denoise_with_feature")
        self.calls += 1
        return self.inner.denoise_with_feature(x, sigma)


def per_sample_sigma(sigma: float, x: Tensor) -> Tensor:
    """The scalar `sigma` as the per-sample tensor (B,) a Denoiser takes, in x's dtype and device."""
    return torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)
