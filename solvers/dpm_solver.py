"""DPM-Solver family in the EDM parameterisation (alpha = 1, sigma = e^{-lambda}).

- `dpm_solver_2`: the single-step, noise-prediction DPM-Solver-2 (Lu et al. 2022). With
  alpha = 1 its exponential-integrator update reduces to steps in sigma.
- `dpmpp_2m`, `dpmpp_3m`: multistep DPM-Solver++ on the data prediction (Lu et al. 2022b).
  With h = lambda_{i+1} - lambda_i = log(sigma_i / sigma_{i+1}) the exact solution is
  x_{i+1} = e^{-h} x_i + e^{-h} int_0^h e^tau D(lambda_i + tau) dtau, and the k-th order
  method integrates the degree-(k-1) polynomial through the last k data predictions.

On the third-order coefficient: expanding D around lambda_i, the h^2 D''/2 term integrates to
-h^2 phi_3 D'' with phi_3 = phi_2 / h - 1/2, while the second divided difference D2 that the
official DPM-Solver, k-diffusion and diff-sampler code build approximates h^2 D'' / 2. Their
update `- phi_3 * D2` therefore carries half of the needed term, and the method is second order
in practice. `third_order="corrected"` (the default) uses `- 2 phi_3 D2` and is third order,
which the convergence test measures on the exact Gaussian-mixture model;
`third_order="upstream"` keeps the published form for comparison with published tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import pydantic
import torch
from torch import Tensor

from .contract import Denoiser
from .euler_heun import euler_step
from .registry import Params, register
from .stepping import Progress, Sigma, coefficient, direction, evaluate, expm1, log, push


class DPMSolver2Params(Params):
    # The update adds (0.5 / r) h (d_mid - d), a finite difference whose float32 rounding (~1e-7
    # relative) is amplified by 0.5 / r: 50x at r = 0.01, still far below the discretisation error;
    # below that the step is rounding noise, and at r ~ 1e-300 it overflows. r = 1 puts the
    # intermediate point on sigma_{i+1} (a Heun step in log sigma), still a valid second-order rule.
    r: Annotated[float, pydantic.Field(ge=0.01, le=1, allow_inf_nan=False)] = 0.5
    """Position of the intermediate point in log sigma: s = sigma_{i+1}^r sigma_i^(1-r)."""


def dpm_solver_2_step(
    x: Tensor, d: Tensor, d_mid: Tensor, sigma: Sigma, sigma_next: Sigma, r: Sigma, scale: Sigma = 1.0
) -> Tensor:
    """DPM-Solver-2's update x + h [(1 - 1/(2r)) d + scale/(2r) d_mid], h = sigma_next - sigma, from
    the directions at sigma and at its intermediate point s = sigma_next^r sigma^(1 - r).

    Args:
        x, d: the state at sigma and its direction; d_mid: the direction at s; shape (B, ...).
        sigma, sigma_next, r: floats, or per-sample float64 (B,) (AMED-Plugin's learned r).
        scale: multiplies the intermediate direction's term (AMED's c; 1: the plain rule).
    Returns:
        the state at sigma_next, shape and dtype of x.
    """
    h = sigma_next - sigma
    first, second = 1.0 - 0.5 / r, scale * 0.5 / r
    return x + coefficient(h, x) * (coefficient(first, x) * d + coefficient(second, x) * d_mid)


@register(
    "dpm_solver_2",
    description="DPM-Solver-2 (noise prediction, single step): Euler to s = sigma_{i+1}^r sigma_i^(1-r), "
    "then a second-order update; 2 calls per step",
    params=DPMSolver2Params,
    evals_per_step=2,
    order=2,
)
def sample_dpm_solver_2(
    denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, params: DPMSolver2Params, afs: bool, progress: Progress
) -> Tensor:
    """x_{i+1} = x_i + h [(1 - 1/(2r)) d_i + d_s / (2r)], h = sigma_{i+1} - sigma_i.

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    s = sigmas.tolist()
    r = params.r
    for i in range(len(s) - 1):
        denoised = evaluate(denoiser, x, s[i], use_afs=afs and i == 0)
        d = direction(x, denoised, s[i])
        s_mid = s[i + 1] ** r * s[i] ** (1.0 - r)
        x_mid = euler_step(x, d, s[i], s_mid)
        denoised = evaluate(denoiser, x_mid, s_mid)
        x = dpm_solver_2_step(x, d, direction(x_mid, denoised, s_mid), s[i], s[i + 1], r)
        progress(i, s[i + 1], denoised, x)
    return x


class DPMPPParams(Params):
    lower_order_final: bool = True
    """Below 10 steps, lower the order on the final steps (official DPM-Solver's stabiliser)."""
    thresholding: bool = False
    """Dynamic thresholding (Imagen) of the data prediction; for pixel models in [-1, 1]."""
    # Any quantile works (0: the smallest |x0|, 1: the largest).
    threshold_ratio: Annotated[float, pydantic.Field(ge=0, le=1, allow_inf_nan=False)] = 0.995
    # The scale is clamped to [1, threshold_max] in the model's dtype: 65504 is the largest float16,
    # so the clamp is representable in every dtype a model runs in (beyond float32's 3.4e38 torch
    # cannot even convert it). Data predictions of pixel (+-1) and latent (a few units) models lie
    # far below it, so larger values would mean "no clamp" anyway.
    threshold_max: Annotated[float, pydantic.Field(ge=1, le=65504, allow_inf_nan=False)] = 1.0


class DPMPP3MParams(DPMPPParams):
    third_order: Literal["corrected", "upstream"] = "corrected"
    """"corrected": 2 phi_3 on the second difference (third order); "upstream": phi_3 as published."""


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Clamp each sample to its `ratio` quantile of |x0| (at least 1, at most max_value), rescaled."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    if flat.dtype not in (torch.float32, torch.float64):  # quantile takes only these
        flat = flat.float()
    scale = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value).to(x0.dtype)
    scale = scale.reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, scale), -scale) / scale


def _multistep_orders(steps: int, max_order: int, lower_order_final: bool) -> list[int]:
    """Order used on each step: warm-up from 1, and the official lower-order final steps below 10 steps."""
    orders = []
    for i in range(steps):
        order = min(max_order, i + 1)
        if lower_order_final and steps < 10:
            order = min(order, steps - i)
        orders.append(order)
    return orders


def dpmpp_step(
    x: Tensor,
    denoised: Sequence[Tensor],
    sigmas: Sequence[Sigma],
    sigma_next: Sigma,
    order: int,
    *,
    third_factor: float = 2.0,
    scale: Sigma = 1.0,
) -> Tensor:
    """One multistep DPM-Solver++ step of `order` (1-3) from sigmas[-1] to sigma_next, through the
    last `order` data predictions (see the module docstring; `third_factor` 2: corrected, 1: upstream).

    Args:
        x: the state at sigmas[-1], shape (B, ...).
        denoised: data predictions, newest last (at least `order`), shape of x each.
        sigmas: their sigmas, newest last: floats, or per-sample float64 (B,) (AMED-Plugin's merged grid).
        scale: multiplies the model terms (AMED's c; 1: the plain rule).
    Returns:
        the state at sigma_next, shape and dtype of x.
    """
    lam = [-log(v) for v in sigmas[-order:]]
    h = -log(sigma_next) - lam[-1]
    phi_1 = expm1(-h)  # e^{-h} - 1
    ratio = coefficient(sigma_next / sigmas[-1], x)
    d0 = denoised[-1]
    if order == 2:
        r = (lam[-1] - lam[-2]) / h
        update = d0 + coefficient(0.5 / r, x) * (d0 - denoised[-2])
        return ratio * x - coefficient(scale * phi_1, x) * update
    if order == 3:
        h0, h1 = lam[-1] - lam[-2], lam[-2] - lam[-3]
        r0, r1 = h0 / h, h1 / h
        d1_0 = (d0 - denoised[-2]) / coefficient(r0, x)
        d1_1 = (denoised[-2] - denoised[-3]) / coefficient(r1, x)
        d1 = d1_0 + coefficient(r0 / (r0 + r1), x) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / coefficient(r0 + r1, x)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        return (
            ratio * x
            - coefficient(scale * phi_1, x) * d0
            + coefficient(scale * phi_2, x) * d1
            - coefficient(scale * (third_factor * phi_3), x) * d2
        )
    return ratio * x - coefficient(scale * phi_1, x) * d0


def _dpmpp_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    max_order: int,
    params: DPMPPParams,
    third_factor: float,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...],
) -> Tensor:
    s = sigmas.tolist()
    steps = len(s) - 1
    orders = _multistep_orders(steps, max_order, params.lower_order_final)
    history: list[Tensor] = []  # data predictions, newest last
    for i in range(steps):
        denoised = evaluate(denoiser, x, s[i], use_afs=afs and i == 0)
        if params.thresholding:
            denoised = dynamic_threshold(denoised, params.threshold_ratio, params.threshold_max)
        history = push(history, denoised, max_order)
        if i < len(exact_start):
            x = exact_start[i]
        else:
            order = min(orders[i], len(history))
            x = dpmpp_step(x, history, s[i + 1 - order : i + 1], s[i + 1], order, third_factor=third_factor)
        progress(i, s[i + 1], denoised, x)
    return x


@register(
    "dpmpp_2m",
    description="DPM-Solver++(2M): multistep, data prediction, second order; 1 call per step",
    params=DPMPPParams,
    evals_per_step=1,
    order=2,
    warmup=lambda _p: 1,
)
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    params: DPMPPParams,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...] = (),
) -> Tensor:
    """Multistep DPM-Solver++ of order 2 (the first step, with no history, is DDIM).

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
        exact_start: for order verification only: exact states at sigmas[1..k] that replace the
            lower-order warm-up steps.
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    return _dpmpp_multistep(
        denoiser,
        x,
        sigmas,
        max_order=2,
        params=params,
        third_factor=0.0,
        afs=afs,
        progress=progress,
        exact_start=tuple(exact_start),
    )


@register(
    "dpmpp_3m",
    description="DPM-Solver++(3M): multistep, data prediction, third order with the corrected "
    "second-difference coefficient (third_order='upstream' for the published form); 1 call per step",
    params=DPMPP3MParams,
    evals_per_step=1,
    order=lambda p: 3 if p.third_order == "corrected" else 2,
    warmup=lambda _p: 2,
)
def sample_dpmpp_3m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    params: DPMPP3MParams,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...] = (),
) -> Tensor:
    """Multistep DPM-Solver++ of order 3 (orders 1 and 2 on the first two steps).

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
        exact_start: for order verification only (see sample_dpmpp_2m).
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    factor = 2.0 if params.third_order == "corrected" else 1.0
    return _dpmpp_multistep(
        denoiser,
        x,
        sigmas,
        max_order=3,
        params=params,
        third_factor=factor,
        afs=afs,
        progress=progress,
        exact_start=tuple(exact_start),
    )
