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

import math
from typing import Annotated, Literal

import pydantic
import torch
from torch import Tensor

from .contract import Denoiser
from .registry import MAX_STEPS, Params, register
from .stepping import Progress, direction, evaluate, push


class DPMSolver2Params(Params):
    # The update adds (0.5 / r) h (d_mid - d), a finite difference whose float32 rounding (~1e-7
    # relative) is amplified by 0.5 / r: 50x at r = 0.01, still far below the discretisation error;
    # below that the step is rounding noise, and at r ~ 1e-300 it overflows. r = 1 puts the
    # intermediate point on sigma_{i+1} (a Heun step in log sigma), still a valid second-order rule.
    r: Annotated[float, pydantic.Field(ge=0.01, le=1, allow_inf_nan=False)] = 0.5
    """Position of the intermediate point in log sigma: s = sigma_{i+1}^r sigma_i^(1-r)."""


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
        h = s[i + 1] - s[i]
        denoised = evaluate(denoiser, x, s[i], use_afs=afs and i == 0)
        d = direction(x, denoised, s[i])
        s_mid = s[i + 1] ** r * s[i] ** (1.0 - r)
        x_mid = x + (s_mid - s[i]) * d
        denoised = evaluate(denoiser, x_mid, s_mid)
        d_mid = direction(x_mid, denoised, s_mid)
        x = x + h * ((1.0 - 0.5 / r) * d + (0.5 / r) * d_mid)
        progress(i, s[i + 1], denoised, x)
    return x


# By default the final steps are lowered at every step count (none: no threshold). A threshold (the
# official DPM-Solver's 10, diffusers' 15) makes quality jump the wrong way where it stops applying:
# on mnist dpmpp_3m's FD went from 0.94 at NFE 9 to 17.7 at NFE 10 (docs/solvers.md, "Lowering the
# order on the final steps"; bench/results/final-order-cpu).
LOWER_ORDER_FINAL_BELOW: int | None = None


class DPMPPParams(Params):
    lower_order_final: bool = True
    """Lower the order on the final steps: step i of S uses order at most S - i, so the last step
    is first order (DDIM) and, for 3M, the one before second order. The last interval of a
    few-step grid is the widest in log sigma, where extrapolating the history is least stable."""
    lower_order_final_below: Annotated[int, pydantic.Field(ge=1, le=MAX_STEPS)] | None = LOWER_ORDER_FINAL_BELOW
    """Lower only when the run has fewer steps than this (diffusers: 15, the official DPM-Solver:
    10); none (the default, as the official AMED code): at every step count."""
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
    lower_order_final_steps: Annotated[int, pydantic.Field(ge=1, le=2)] = 2
    """How many final steps `lower_order_final` lowers: 2 (orders 2, 1, as diffusers and the
    official code) or 1 (only the last step first order, as diffusers' euler_at_final)."""


def dynamic_threshold(x0: Tensor, ratio: float, max_value: float) -> Tensor:
    """Clamp each sample to its `ratio` quantile of |x0| (at least 1, at most max_value), rescaled."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    if flat.dtype not in (torch.float32, torch.float64):  # quantile takes only these
        flat = flat.float()
    scale = torch.quantile(flat, ratio, dim=1).clamp(min=1.0, max=max_value).to(x0.dtype)
    scale = scale.reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, scale), -scale) / scale


def multistep_orders(
    steps: int, max_order: int, lower_order_final: bool, below: int | None, lowered_steps: int | None = None
) -> list[int]:
    """Order used on each step: warm-up from 1; with `lower_order_final` (and fewer than `below`
    steps, if given) the last `lowered_steps` steps (default all that need it) use at most the
    number of steps left, so the final step is first order."""
    lowered = max_order - 1 if lowered_steps is None else lowered_steps
    lower = lower_order_final and (below is None or steps < below)
    orders = []
    for i in range(steps):
        order = min(max_order, i + 1)
        if lower and steps - i <= lowered:
            order = min(order, steps - i)
        orders.append(order)
    return orders


def _dpmpp_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    max_order: int,
    params: DPMPPParams,
    third_factor: float,
    lowered_steps: int | None,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...],
) -> Tensor:
    s = sigmas.tolist()
    lam = [-math.log(v) for v in s]
    steps = len(s) - 1
    orders = multistep_orders(steps, max_order, params.lower_order_final, params.lower_order_final_below, lowered_steps)
    history: list[Tensor] = []  # data predictions, newest last
    for i in range(steps):
        denoised = evaluate(denoiser, x, s[i], use_afs=afs and i == 0)
        if params.thresholding:
            denoised = dynamic_threshold(denoised, params.threshold_ratio, params.threshold_max)
        history = push(history, denoised, max_order)
        if i < len(exact_start):
            x = exact_start[i]
            progress(i, s[i + 1], denoised, x)
            continue
        h = lam[i + 1] - lam[i]
        phi_1 = math.expm1(-h)  # e^{-h} - 1
        order = min(orders[i], len(history))
        update = denoised
        if order == 2:
            r = (lam[i] - lam[i - 1]) / h
            update = denoised + (0.5 / r) * (denoised - history[-2])
            x = (s[i + 1] / s[i]) * x - phi_1 * update
        elif order == 3:
            h0, h1 = lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
            r0, r1 = h0 / h, h1 / h
            d1_0 = (denoised - history[-2]) / r0
            d1_1 = (history[-2] - history[-3]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            x = (s[i + 1] / s[i]) * x - phi_1 * denoised + phi_2 * d1 - (third_factor * phi_3) * d2
        else:
            x = (s[i + 1] / s[i]) * x - phi_1 * denoised
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
        lowered_steps=None,
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
        lowered_steps=params.lower_order_final_steps,
        afs=afs,
        progress=progress,
        exact_start=tuple(exact_start),
    )
