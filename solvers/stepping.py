"""Pieces every solver loop shares: the progress/cancellation hook, the first evaluation (AFS) and
the arithmetic that lets one step rule serve a fixed grid and AMED-Plugin's per-sample grid.

A step rule (euler_step, dpm_solver_2_step, dpmpp_step, adams_bashforth_step) takes its sigmas as
`Sigma`: a Python float when the grid is fixed (every solver's own loop: the coefficients are
float64 scalars, exactly as written before the rules were shared) or a float64 tensor (B,) when
each sample has its own point (AMED-Plugin's learned intermediate times, with gradients during
its training). `coefficient` turns either into the multiplier of a state.

AFS (analytical first step, Dockhorn et al. (GENIE) / AMED): at sigma_0 the data prediction of any
zero-mean data distribution is close to 0, so the first direction is taken as
d_0 = x_0 / sqrt(1 + sigma_0^2) for free, saving one network evaluation. Single-step solvers
replace only their first stage with it; multistep solvers keep it in their history.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import torch
from torch import Tensor

from .contract import Denoiser, StepCallback, StepInfo, per_sample_sigma
from .errors import SamplingCancelled


class Progress:
    """Calls the user's step callback after each step and stops the loop when it returns True."""

    def __init__(self, callback: StepCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total

    def __call__(self, index: int, sigma: float, denoised: Tensor, x: Tensor) -> None:
        """Report that step `index` (0-based) has brought the state `x` to `sigma`."""
        if self.callback is not None and self.callback(StepInfo(index + 1, self.total, sigma, denoised, x)):
            raise SamplingCancelled(index + 1, self.total)


def afs_denoised(x: Tensor, sigma: float) -> Tensor:
    """The data prediction that the AFS direction d_0 = x / sqrt(1 + sigma^2) implies: x - sigma d_0."""
    return x * (1.0 - sigma / math.sqrt(1.0 + sigma * sigma))


def evaluate(denoiser: Denoiser, x: Tensor, sigma: float, *, use_afs: bool = False) -> Tensor:
    """D(x, sigma) for the whole batch, or the AFS stand-in (no call) when `use_afs`."""
    if use_afs:
        return afs_denoised(x, sigma)
    return denoiser(x, per_sample_sigma(sigma, x))


Sigma: TypeAlias = float | Tensor
"""A grid point or a coefficient: one float for the batch, or per sample, float64 (B,)."""


def coefficient(value: Sigma, like: Tensor) -> float | Tensor:
    """`value` as a multiplier of the state `like`: a float as it is (torch rounds it to the
    state's dtype, as before), a per-sample (B,) tensor as a (B, 1, ..., 1) column in like's dtype
    (formed in float64, cast once)."""
    if isinstance(value, Tensor):
        return value.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
    return value


def log(value: Sigma) -> Sigma:
    return torch.log(value) if isinstance(value, Tensor) else math.log(value)


def expm1(value: Sigma) -> Sigma:
    return torch.expm1(value) if isinstance(value, Tensor) else math.expm1(value)


def direction(x: Tensor, denoised: Tensor, sigma: Sigma) -> Tensor:
    """dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / coefficient(sigma, x)


def push(history: list[Tensor], item: Tensor, keep: int) -> list[Tensor]:
    """The history with `item` appended, trimmed to its newest `keep` entries (a new list)."""
    return [*history, item][-keep:]
