"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) that reuses
the next step's evaluation, on the data prediction in the EDM parameterisation.

Per step, with h = lambda_{i+1} - lambda_i (lambda = -log sigma), hh = -h and the last p data
predictions, the base update is the DDIM step x~ = e^{-h} x_i + (1 - e^{-h}) D_i; the
predictor and corrector add -B(h) times a combination of divided differences whose weights
solve R rho = b, with R_{k,j} = r_j^k (r_j the history nodes relative to h) and b_k from the
phi functions. B(h) = hh for "bh1" and expm1(hh) for "bh2". The corrector evaluates D at the
predicted point; that evaluation becomes the next step's history, so the corrector costs no
extra call, and the last step has no corrector. NFE = S.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import pydantic
from torch import Tensor

from .contract import Denoiser
from .dpm_solver import LOWER_ORDER_FINAL_BELOW, multistep_orders
from .registry import MAX_STEPS, Params, register
from .stepping import Progress, evaluate, push


class UniPCParams(Params):
    order: Annotated[int, pydantic.Field(ge=1, le=3)] = 2
    """Predictor order p (UniP-p); the corrector raises the order by one."""
    variant: Literal["bh1", "bh2"] = "bh2"
    """B(h) = -h ("bh1") or expm1(-h) ("bh2")."""
    corrector: bool = True
    lower_order_final: bool = True
    """Lower the predictor's order on the final steps: step i of S uses order at most S - i."""
    lower_order_final_below: Annotated[int, pydantic.Field(ge=1, le=MAX_STEPS)] | None = LOWER_ORDER_FINAL_BELOW
    """Lower only when the run has fewer steps than this; none (the default, as diffusers' UniPC
    and the official code): at every step count."""


def _coefficients(rks: list[float], h: float, variant: str) -> tuple[np.ndarray, np.ndarray, float]:
    """R (p x p), b (p,) and B(h) for history nodes rks (the last entry is 1.0, the new point)."""
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1
    rows, b = [], []
    r = np.asarray(rks, dtype=np.float64)
    for k in range(1, len(rks) + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.stack(rows), np.asarray(b), b_h


@register(
    "unipc",
    description="UniPC: multistep predictor-corrector (bh1/bh2, order p <= 3); the corrector reuses the "
    "next evaluation, 1 call per step",
    params=UniPCParams,
    evals_per_step=1,
    order=lambda p: p.order + 1 if p.corrector else p.order,
    min_steps=lambda p: p.order,
    warmup=lambda p: p.order - 1,
)
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    params: UniPCParams,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...] = (),
) -> Tensor:
    """UniPC-p with UniC corrector on all but the last step.

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), S >= order, last entry > 0.
        exact_start: for order verification only: exact states at sigmas[1..k] that replace the
            lower-order warm-up steps (their evaluations fill the history).
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    s = sigmas.tolist()
    lam = [-math.log(v) for v in s]
    steps = len(s) - 1
    orders = multistep_orders(steps, params.order, params.lower_order_final, params.lower_order_final_below)
    history: list[Tensor] = [evaluate(denoiser, x, s[0], use_afs=afs)]  # D at grid points, newest last
    for i in range(steps):
        last = i == steps - 1
        if i < len(exact_start):
            x = exact_start[i]
            history = push(history, evaluate(denoiser, x, s[i + 1]), params.order)
            progress(i, s[i + 1], history[-1], x)
            continue
        order = min(orders[i], len(history))
        h = lam[i + 1] - lam[i]
        m0 = history[-1]
        rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)]
        diffs = [(history[-1 - k] - m0) / rk for k, rk in enumerate(rks, start=1)]
        big_r, b, b_h = _coefficients([*rks, 1.0], h, params.variant)
        x_base = (s[i + 1] / s[i]) * x - math.expm1(-h) * m0
        x_pred = x_base
        if diffs:
            rhos_p = [0.5] if order == 2 else np.linalg.solve(big_r[:-1, :-1], b[:-1]).tolist()
            x_pred = x_base - b_h * sum(float(rho) * dk for rho, dk in zip(rhos_p, diffs, strict=True))
        if last or not params.corrector:
            x = x_pred
            if not last:
                history = push(history, evaluate(denoiser, x, s[i + 1]), params.order)
            progress(i, s[i + 1], history[-1], x)
            continue
        m_t = evaluate(denoiser, x_pred, s[i + 1])
        rhos_c = [0.5] if order == 1 else np.linalg.solve(big_r, b).tolist()
        corr = sum((float(rho) * dk for rho, dk in zip(rhos_c[:-1], diffs, strict=True)), start=0.0 * m0)
        x = x_base - b_h * (corr + rhos_c[-1] * (m_t - m0))
        history = push(history, m_t, params.order)
        progress(i, s[i + 1], m_t, x)
    return x
