"""First- and second-order single-step solvers: Euler (= DDIM) and Heun (EDM, Alg. 1).

Pure functions of (denoiser, x, sigmas); no state survives a call.
"""

from __future__ import annotations

from torch import Tensor

from .contract import Denoiser
from .registry import NoParams, register
from .stepping import Progress, Sigma, coefficient, direction, evaluate


def euler_step(x: Tensor, d: Tensor, sigma: Sigma, sigma_next: Sigma, scale: Sigma = 1.0) -> Tensor:
    """The Euler step x + scale (sigma_next - sigma) d (`euler`'s rule; AMED-Plugin runs it on its
    merged grid with per-sample sigmas and its learned scale c).

    Args:
        x, d: the state at sigma and its direction, shape (B, ...).
        sigma, sigma_next: floats, or per-sample float64 (B,) (see stepping.Sigma).
        scale: multiplies the step (1: the plain rule).
    Returns:
        the state at sigma_next, shape and dtype of x.
    """
    return x + coefficient(scale * (sigma_next - sigma), x) * d


@register(
    "euler",
    description="Euler on the probability-flow ODE in sigma (identical to DDIM); order 1, 1 call per step",
    params=NoParams,
    evals_per_step=1,
    order=1,
)
def sample_euler(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, params: NoParams, afs: bool, progress: Progress
) -> Tensor:
    """Euler steps x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d(x_i, sigma_i).

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = evaluate(denoiser, x, s[i], use_afs=afs and i == 0)
        x = euler_step(x, direction(x, denoised, s[i]), s[i], s[i + 1])
        progress(i, s[i + 1], denoised, x)
    return x


@register(
    "heun",
    description="Heun's second-order method (EDM Alg. 1), a Heun step on every interval; 2 calls per step",
    params=NoParams,
    evals_per_step=2,
    order=2,
)
def sample_heun(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, params: NoParams, afs: bool, progress: Progress
) -> Tensor:
    """Trapezoidal correction of an Euler predictor on every interval (the grid ends at sigma_min > 0,
    so the last step is a Heun step too).

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        h = s[i + 1] - s[i]
        denoised = evaluate(denoiser, x, s[i], use_afs=afs and i == 0)
        d = direction(x, denoised, s[i])
        x_pred = x + h * d
        denoised = evaluate(denoiser, x_pred, s[i + 1])
        x = x + (0.5 * h) * (d + direction(x_pred, denoised, s[i + 1]))
        progress(i, s[i + 1], denoised, x)
    return x
