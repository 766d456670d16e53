"""An exact model: a Gaussian mixture whose denoiser is known in closed form.

Data x0 ~ sum_k pi_k N(mu_k, diag(s_k^2)); at noise level sigma, x ~ sum_k pi_k N(mu_k,
diag(s_k^2 + sigma^2)), and the exact data prediction is

    D(x, sigma) = sum_k w_k(x, sigma) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],

with w_k the posterior responsibilities. The solvers are verified against it: `reference_solution`
integrates the probability-flow ODE with SciPy's DOP853 to rtol 1e-12, in t = log sigma where
dx/dt = x - D(x, e^t). `GaussianMixtureFlow` is the same mixture under rectified flow (its
velocity in flow time t) and `flow_reference_solution` integrates dx_t/dt = v in t: the check of
the flow-to-sigma map (models/flow.py). Float64 throughout. Imports only the solver contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from solvers.contract import Denoiser


class GaussianMixtureDenoiser:
    """The exact denoiser of a diagonal Gaussian mixture, as a `solvers.Denoiser` (float64).

    Args:
        means: (K, dim) component means.
        stds: (K, dim) or (K,) component standard deviations.
        weights: (K,) mixture weights (normalised here).
        sigma_min, sigma_max: the range schedules are built in.
    Samples x have shape (B, *shape) with prod(shape) = dim.
    """

    sigma_levels: Tensor | None = None
    evals_per_call = 1

    def __init__(
        self,
        means: Tensor,
        stds: Tensor,
        weights: Tensor | None = None,
        *,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        self.means = means.to(torch.float64)
        count, dim = self.means.shape
        stds = stds.to(torch.float64)
        self.stds = stds[:, None].expand(count, dim).clone() if stds.dim() == 1 else stds.clone()
        w = torch.ones(count, dtype=torch.float64) if weights is None else weights.to(torch.float64)
        self.log_weights = torch.log(w / w.sum())
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.dim = dim

    @classmethod
    def smooth(cls, dim: int = 8, components: int = 3, seed: int = 0, **kwargs: float) -> GaussianMixtureDenoiser:
        """A well-conditioned mixture for convergence tests: means at distance ~2 apart, component
        stds 0.6-0.9 (>= 0.3 x the mean separation), unequal weights."""
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(components, dim, generator=g, dtype=torch.float64)
        means = means / means.norm(dim=1, keepdim=True) * 1.4
        stds = 0.6 + 0.3 * torch.rand(components, dim, generator=g, dtype=torch.float64)
        weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, stds, weights, **kwargs)

    def _flat(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.dim).to(torch.float64)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """Args: x (B, ...) with prod(...) = dim; sigma (B,). Returns D(x, sigma), shape and dtype of x."""
        flat = self._flat(x)
        s2 = sigma.to(torch.float64).reshape(-1, 1, 1) ** 2  # (B, 1, 1)
        var = self.stds[None] ** 2 + s2  # (B, K, dim)
        diff = flat[:, None, :] - self.means[None]  # (B, K, dim)
        log_p = -0.5 * ((diff**2) / var + torch.log(2 * math.pi * var)).sum(-1) + self.log_weights
        resp = torch.softmax(log_p, dim=1)  # (B, K)
        posterior_mean = self.means[None] + (self.stds[None] ** 2 / var) * diff
        out = (resp[..., None] * posterior_mean).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def sample_data(self, count: int, seed: int = 0) -> Tensor:
        """Exact samples from the data distribution, shape (count, dim)."""
        g = torch.Generator().manual_seed(seed)
        k = torch.multinomial(self.log_weights.exp(), count, replacement=True, generator=g)
        return self.means[k] + self.stds[k] * torch.randn(count, self.dim, generator=g, dtype=torch.float64)


class GaussianMixtureFlow:
    """The exact velocity of rectified flow on the same mixture, written in flow time t (float64).

    With x_t = (1 - t) x0 + t eps and a = 1 - t, given component k: x_t ~ N(a mu_k, a^2 s_k^2 + t^2),
    E[x0 | x_t, k] = mu_k + a s_k^2 / (a^2 s_k^2 + t^2) (x_t - a mu_k) and
    E[eps | x_t, k] = t / (a^2 s_k^2 + t^2) (x_t - a mu_k); the velocity
    v(x_t, t) = E[eps - x0 | x_t] weighs these by the posterior responsibilities. Derived in t-space
    on its own, so a flow adapter checked against it is not checked against itself (the sigma-form
    denoiser of the same mixture is `GaussianMixtureDenoiser`).
    """

    def __init__(self, mixture: GaussianMixtureDenoiser) -> None:
        self.means, self.stds, self.log_weights, self.dim = (
            mixture.means,
            mixture.stds,
            mixture.log_weights,
            mixture.dim,
        )

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Args: x_t (B, ...) with prod(...) = dim; t (B,) in (0, 1). Returns v, shape and dtype of x_t."""
        flat = x_t.reshape(x_t.shape[0], self.dim).to(torch.float64)
        t64 = t.to(torch.float64).reshape(-1, 1, 1)  # (B, 1, 1)
        a = 1.0 - t64
        var = (a * self.stds[None]) ** 2 + t64**2  # (B, K, dim)
        diff = flat[:, None, :] - a * self.means[None]  # (B, K, dim)
        log_p = -0.5 * ((diff**2) / var + torch.log(2 * math.pi * var)).sum(-1) + self.log_weights
        resp = torch.softmax(log_p, dim=1)  # (B, K)
        x0 = self.means[None] + a * self.stds[None] ** 2 / var * diff
        eps = t64 / var * diff
        out = (resp[..., None] * (eps - x0)).sum(1)
        return out.reshape(x_t.shape).to(x_t.dtype)


def flow_reference_solution(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x_start: Tensor,
    t_start: float,
    t_ends: Sequence[float] | float,
    *,
    rtol: float = 1e-12,
    atol: float = 1e-12,
) -> list[Tensor]:
    """Solve the flow ODE dx_t/dt = v(x_t, t) in t with DOP853, from (x_start, t_start) down to each of t_ends.

    Args:
        x_start: x_t at t_start, shape (B, ...) (the whole batch is one system).
        t_ends: one or more times < t_start, decreasing.
    Returns:
        x_t at each of t_ends, float64, shape of x_start.
    """
    import numpy as np
    from scipy.integrate import solve_ivp  # the [bench] extra's, as in reference_solution

    ends = [t_ends] if isinstance(t_ends, (int, float)) else list(t_ends)
    shape = x_start.shape

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).reshape(shape)
        return velocity(x, torch.full((shape[0],), t, dtype=torch.float64)).reshape(-1).numpy()

    result = solve_ivp(
        rhs,
        (t_start, ends[-1]),
        x_start.to(torch.float64).reshape(-1).numpy(),
        method="DOP853",
        t_eval=ends,
        rtol=rtol,
        atol=atol,
    )
    if not result.success:
        raise RuntimeError(f"reference flow ODE solve failed: {result.message}")
    return [torch.from_numpy(result.y[:, j].copy()).reshape(shape) for j in range(len(ends))]


def reference_solution(
    denoiser: Denoiser,
    x_start: Tensor,
    sigma_start: float,
    sigma_ends: Sequence[float] | float,
    *,
    rtol: float = 1e-12,
    atol: float = 1e-12,
) -> list[Tensor]:
    """Solve dx/dt = x - D(x, e^t), t = log sigma, from (x_start, sigma_start) with DOP853.

    Args:
        x_start: the state at sigma_start, shape (B, ...) (the whole batch is one system).
        sigma_ends: one or more sigmas < sigma_start, decreasing, at which to report the state.
    Returns:
        the states at each of sigma_ends, float64, shape of x_start.
    """
    import numpy as np
    from scipy.integrate import solve_ivp  # the [bench] extra's: only tests and benchmarks solve references

    ends = [sigma_ends] if isinstance(sigma_ends, (int, float)) else list(sigma_ends)
    shape = x_start.shape
    batch = shape[0]

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(y).reshape(shape)
        sigma = torch.full((batch,), math.exp(t), dtype=torch.float64)
        return (x - denoiser(x, sigma)).reshape(-1).numpy()

    t_eval = [math.log(s) for s in ends]
    result = solve_ivp(
        rhs,
        (math.log(sigma_start), t_eval[-1]),
        x_start.to(torch.float64).reshape(-1).numpy(),
        method="DOP853",
        t_eval=t_eval,
        rtol=rtol,
        atol=atol,
    )
    if not result.success:
        raise RuntimeError(f"reference ODE solve failed: {result.message}")
    return [torch.from_numpy(result.y[:, j].copy()).reshape(shape) for j in range(len(ends))]
