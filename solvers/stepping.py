"""Pieces every solver loop shares: the progress/cancellation hook and the first evaluation (AFS).

AFS (analytical first step, Dockhorn et al. (GENIE) / AMED): at sigma_0 the data prediction of any
zero-mean data distribution is close to 0, so the first direction is taken as
d_0 = x_0 / sqrt(1 + sigma_0^2) for free, saving one network evaluation. Single-step solvers
replace only their first stage with it; multistep solvers keep it in their history.
"""

from __future__ import annotations

import math

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


def direction(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    """dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / sigma


def push(history: list[Tensor], item: Tensor, keep: int) -> list[Tensor]:
    """The history with `item` appended, trimmed to its newest `keep` entries (a new list)."""
    return [*history, item][-keep:]
