"""Adams-Bashforth solvers on the direction d = dx/dsigma: iPNDM (fixed weights), iPNDM-v
(variable-step, Lagrange in sigma) and DEIS tAB (Lagrange in VP time).

All three are x_{i+1} = x_i + sum_j c_{i,j} d_{i-j} over the last k directions, with the
coefficients c computed in float64 before the loop; they differ only in c. Lower orders are used
while the history fills. AFS puts d_0 = x_0 / sqrt(1 + sigma_0^2) into the history.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Annotated

import numpy as np
import pydantic
import torch
from torch import Tensor

from .contract import Denoiser
from .errors import InvalidParameterError
from .quadrature import lagrange_integrals, polynomial_lagrange_integrals
from .registry import Params, register
from .schedules import fit_vp_betas, vp_sigma, vp_time
from .stepping import Progress, Sigma, coefficient, direction, evaluate, push

# Adams-Bashforth weights for equal steps, newest direction first (also AMED-Plugin's iPNDM base).
AB_WEIGHTS = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


def adams_bashforth_step(x: Tensor, directions: Sequence[Tensor], coefficients: Sequence[Sigma]) -> Tensor:
    """x + sum_j coefficients[j] d_{-1-j}: the step every Adams-Bashforth rule here takes.

    Args:
        x: the state, shape (B, ...).
        directions: the history, newest last (at least len(coefficients)).
        coefficients: newest first; floats, or per-sample float64 (B,) (AMED-Plugin).
    """
    return x + sum(coefficient(c, x) * d for c, d in zip(coefficients, reversed(directions), strict=False))


def ipndm_coefficients(sigma: Sigma, sigma_next: Sigma, order: int, scale: Sigma = 1.0) -> list[Sigma]:
    """iPNDM's step coefficients, newest first: scale h w_j with the equal-step AB weights of `order`."""
    h = sigma_next - sigma
    return [scale * (h * w) for w in AB_WEIGHTS[order - 1]]


def ipndm_v_coefficients(nodes: Sequence[Sigma], sigma_next: Sigma, scale: Sigma = 1.0) -> list[Sigma]:
    """iPNDM-v's step coefficients, newest first: scale times the integrals from nodes[-1] to
    sigma_next of the Lagrange basis through `nodes` (the history's sigmas, newest last)."""
    weights = polynomial_lagrange_integrals(list(reversed(nodes)), nodes[-1], sigma_next)
    return [scale * w for w in weights]


def _adams_bashforth(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    coefficients: Sequence[Sequence[Sigma]],
    *,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...],
) -> Tensor:
    """x_{i+1} = x_i + sum_j coefficients[i][j] d_{i-j}; coefficients[i] newest first."""
    s = sigmas.tolist()
    keep = max(len(c) for c in coefficients)
    history: list[Tensor] = []
    for i, coeffs in enumerate(coefficients):
        denoised = evaluate(denoiser, x, s[i], use_afs=afs and i == 0)
        history = push(history, direction(x, denoised, s[i]), keep)
        x = exact_start[i] if i < len(exact_start) else adams_bashforth_step(x, history, coeffs)
        progress(i, s[i + 1], denoised, x)
    return x


class IPNDMParams(Params):
    max_order: Annotated[int, pydantic.Field(ge=1, le=4)] = 4


@register(
    "ipndm",
    description="improved PNDM: Adams-Bashforth with fixed equal-step weights (order up to 4, second "
    "order on non-uniform grids); 1 call per step",
    params=IPNDMParams,
    evals_per_step=1,
    order=lambda p: min(p.max_order, 2),
    warmup=lambda p: p.max_order - 1,
)
def sample_ipndm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    params: IPNDMParams,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...] = (),
) -> Tensor:
    """iPNDM (Zhang & Chen, DEIS paper): the equal-step AB weights of order min(max_order, i + 1)
    applied to the sigma step h_i = sigma_{i+1} - sigma_i.

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
        exact_start: for order verification only: exact states at sigmas[1..k] replacing the warm-up.
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    s = sigmas.tolist()
    coefficients = [ipndm_coefficients(s[i], s[i + 1], min(params.max_order, i + 1)) for i in range(len(s) - 1)]
    return _adams_bashforth(
        denoiser, x, sigmas, coefficients, afs=afs, progress=progress, exact_start=tuple(exact_start)
    )


def _lagrange_coefficients(
    nodes: list[float], max_order: int, weight: Callable[[np.ndarray], np.ndarray], panels: int
) -> list[list[float]]:
    """For each interval [nodes[i], nodes[i+1]]: integrals of the Lagrange basis through the
    last min(max_order, i + 1) nodes, newest first."""
    coefficients = []
    for i in range(len(nodes) - 1):
        k = min(max_order, i + 1)
        support = [nodes[i - j] for j in range(k)]
        coefficients.append(
            lagrange_integrals(
                support,
                nodes[i],
                nodes[i + 1],
                weight=weight,
                panels=panels,
                points_per_panel=5,
            )
        )
    return coefficients


class IPNDMVParams(Params):
    max_order: Annotated[int, pydantic.Field(ge=1, le=4)] = 4


@register(
    "ipndm_v",
    description="variable-step Adams-Bashforth in sigma (iPNDM-v, equivalent to DEIS rho-AB), order up "
    "to 4; 1 call per step",
    params=IPNDMVParams,
    evals_per_step=1,
    order=lambda p: p.max_order,
    warmup=lambda p: p.max_order - 1,
)
def sample_ipndm_v(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    params: IPNDMVParams,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...] = (),
) -> Tensor:
    """Weights (1/h) int l_j(sigma) dsigma over the Lagrange basis of the last k sigmas, integrated
    exactly (Gauss-Legendre with k points), times h.

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
        exact_start: for order verification only: exact states at sigmas[1..k] replacing the warm-up.
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    s = sigmas.tolist()
    coefficients = [
        ipndm_v_coefficients(s[max(0, i + 1 - params.max_order) : i + 1], s[i + 1]) for i in range(len(s) - 1)
    ]
    return _adams_bashforth(
        denoiser, x, sigmas, coefficients, afs=afs, progress=progress, exact_start=tuple(exact_start)
    )


class DEISParams(Params):
    max_order: Annotated[int, pydantic.Field(ge=1, le=3)] = 3
    # VP schedule of the time variable (both or neither); default: fitted to the model's sigma range,
    # as time_uniform (17.5 and -0.005 for EDM's 0.002..80). The VP SDE literature uses beta_d
    # 19.9, beta_min 0.1; the bounds leave orders of magnitude around those. Whether a pair is
    # usable also depends on the grid (a beta_min far below zero makes VP time a large number whose
    # low bits carry sigma): `check_deis_grid` refuses such grids before sampling.
    beta_d: Annotated[float, pydantic.Field(ge=0.01, le=1000, allow_inf_nan=False)] | None = None
    beta_min: Annotated[float, pydantic.Field(ge=-1000, le=1000, allow_inf_nan=False)] | None = None

    @pydantic.model_validator(mode="after")
    def _both_or_neither(self) -> DEISParams:
        if (self.beta_d is None) != (self.beta_min is None):
            raise ValueError("beta_d and beta_min together, or neither (then they are fitted to the model)")
        return self

    def betas(self, sigma_min: float, sigma_max: float) -> tuple[float, float]:
        """(beta_d, beta_min): the given pair, or the VP schedule fitted to the model's range."""
        if self.beta_d is None or self.beta_min is None:
            return fit_vp_betas(sigma_min, sigma_max)
        return self.beta_d, self.beta_min


# The largest relative error of sigma -> VP time -> sigma on a grid that DEIS accepts: float32
# samples resolve 6e-8, so beyond 1e-6 the quadrature would integrate over the wrong intervals.
DEIS_ROUND_TRIP_TOLERANCE = 1e-6


def check_deis_grid(params: DEISParams, sigmas: Tensor, sigma_min: float, sigma_max: float) -> None:
    """Refuse a VP time variable that cannot represent this grid (see DEISParams)."""
    beta_d, beta_min = params.betas(sigma_min, sigma_max)
    grid = sigmas.to(torch.float64)
    taus = vp_time(grid, beta_d, beta_min)
    error = float(((vp_sigma(taus, beta_d, beta_min) - grid).abs() / grid).max())
    if not math.isfinite(error) or error > DEIS_ROUND_TRIP_TOLERANCE or not bool((taus[1:] < taus[:-1]).all()):
        raise InvalidParameterError(
            "solver_params.beta_min",
            beta_min,
            f"a VP schedule that resolves this grid (with beta_d={beta_d:g}, sigma -> VP time -> sigma "
            f"is off by {error:.2g} relative; at most {DEIS_ROUND_TRIP_TOLERANCE:g} is usable)",
        )


@register(
    "deis",
    description="DEIS tAB: Adams-Bashforth with Lagrange extrapolation in VP time, order <= 3; 1 call per step",
    params=DEISParams,
    evals_per_step=1,
    order=lambda p: p.max_order,
    warmup=lambda p: p.max_order - 1,
    grid_check=check_deis_grid,
)
def sample_deis(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    params: DEISParams,
    afs: bool,
    progress: Progress,
    exact_start: tuple[Tensor, ...] = (),
) -> Tensor:
    """c_j = int_{tau_i}^{tau_{i+1}} l_j(tau) dsigma/dtau dtau (10,240-point composite Gauss-Legendre),
    tau = VP time of sigma.

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
        exact_start: for order verification only: exact states at sigmas[1..k] replacing the warm-up.
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    beta_d, beta_min = params.betas(denoiser.sigma_min, denoiser.sigma_max)
    taus = vp_time(sigmas.to(torch.float64), beta_d, beta_min).tolist()

    def dsigma_dtau(tau: np.ndarray) -> np.ndarray:
        exponent = 0.5 * beta_d * tau**2 + beta_min * tau
        return (beta_d * tau + beta_min) * np.exp(exponent) / (2.0 * np.sqrt(np.expm1(exponent)))

    coefficients = _lagrange_coefficients(taus, params.max_order, dsigma_dtau, panels=2048)
    return _adams_bashforth(
        denoiser, x, sigmas, coefficients, afs=afs, progress=progress, exact_start=tuple(exact_start)
    )
