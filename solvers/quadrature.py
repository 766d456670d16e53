"""Integrals of Lagrange basis polynomials, for the variable-step Adams-Bashforth solvers.

`lagrange_integrals(nodes, a, b)` returns w_j = integral over [a, b] of l_j(u) du, where l_j is
the Lagrange basis polynomial of `nodes` (l_j(nodes[k]) = [j == k]); `weight` multiplies the
integrand (DEIS integrates l_j(tau) dsigma/dtau over VP time tau, with thousands of points: float64
NumPy, computed once per run, before the loop). `polynomial_lagrange_integrals` is the unweighted
case (ipndm_v, AMED-Plugin's ipndm_v base) in plain arithmetic, so its nodes may be floats or
per-sample float64 tensors (B,) that carry gradients; on floats it gives lagrange_integrals'
values bit for bit (the same operations in the same order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

_GL_CACHE: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _gauss_legendre(points: int) -> tuple[np.ndarray, np.ndarray]:
    if points not in _GL_CACHE:
        _GL_CACHE[points] = np.polynomial.legendre.leggauss(points)
    return _GL_CACHE[points]


def lagrange_basis(nodes: Sequence[float], u: np.ndarray) -> np.ndarray:
    """Values of every basis polynomial at u: shape (len(nodes), len(u))."""
    t = np.asarray(nodes, dtype=np.float64)
    out = np.ones((len(t), len(u)), dtype=np.float64)
    for j in range(len(t)):
        for k in range(len(t)):
            if k != j:
                out[j] *= (u - t[k]) / (t[j] - t[k])
    return out


def lagrange_integrals(
    nodes: Sequence[float],
    a: float,
    b: float,
    weight: Callable[[np.ndarray], np.ndarray] | None = None,
    panels: int = 1,
    points_per_panel: int | None = None,
) -> list[float]:
    """w_j = integral_a^b l_j(u) weight(u) du by composite Gauss-Legendre quadrature.

    Without `weight` the integrand is a polynomial of degree len(nodes) - 1, which one panel of
    len(nodes) points integrates exactly. With a smooth weight, use many panels
    (DEIS uses 2048 panels x 5 points = 10,240 points).
    """
    points = points_per_panel or max(1, len(nodes))
    x, w = _gauss_legendre(points)
    edges = np.linspace(a, b, panels + 1)
    half = 0.5 * (edges[1:] - edges[:-1])
    mid = 0.5 * (edges[1:] + edges[:-1])
    u = (mid[:, None] + half[:, None] * x[None, :]).ravel()
    wu = (half[:, None] * w[None, :]).ravel()
    if weight is not None:
        wu = wu * weight(u)
    # An elementwise sum, not a matrix product: BLAS would start its thread pool for this tiny
    # product and fight the torch threads (measured 800 vs 280 µs per DEIS step on 2 cores).
    weights: list[float] = (lagrange_basis(nodes, u) * wu).sum(axis=1).tolist()
    return weights


def polynomial_lagrange_integrals(
    nodes: Sequence[float | Tensor], a: float | Tensor, b: float | Tensor
) -> list[float | Tensor]:
    """w_j = integral_a^b l_j(u) du, exactly (Gauss-Legendre with len(nodes) points).

    Args:
        nodes: the interpolation nodes, floats or per-sample float64 tensors (B,).
        a, b: the interval's ends, of the nodes' kind.
    Returns:
        one weight per node, of the nodes' kind.
    """
    points, weights = _gauss_legendre(max(1, len(nodes)))
    half, mid = 0.5 * (b - a), 0.5 * (b + a)
    out: list[float | Tensor] = []
    for j in range(len(nodes)):
        total: Any = 0.0
        for x_p, w_p in zip(points.tolist(), weights.tolist(), strict=True):
            u = mid + half * x_p
            basis: Any = 1.0
            for m in range(len(nodes)):
                if m != j:
                    basis = basis * ((u - nodes[m]) / (nodes[j] - nodes[m]))
            total = total + basis * (half * w_p)
        out.append(total)
    return out
