"""Direct search of a grid: a deterministic, derivative-free minimisation of one full-batch
objective (a solver's error on a fixed set of noises against fixed targets) over the grid's
interior nodes.

Why beside LD3: LD3's minibatch Adam with finite differences is noisy and, at a step small enough
not to overshoot, barely moves from its start in a few hundred steps. With S - 1 <= 8 free nodes,
a simplex search (Nelder-Mead) or Powell's line searches on the exact objective go where that
objective is lowest near the start, so a fit that does not move says something about the grid,
not about the optimiser's noise.

Parameterisation: the end points (sigma_max, sigma_min) stay fixed, as in LD3. The S positive
increments of log sigma are softmax(0, z) of the way from log sigma_max to log sigma_min, so any
z in R^(S-1) is a strictly decreasing grid and the search is unconstrained; z has exactly one
entry per interior node (LD3's S logits carry one redundant shift).

Nothing here knows a model or a solver: the caller's objective does (see bench/amed.py's
oracle-grid and train-schedule --method search). scipy is imported only when a search runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .ld3 import grid_of, logits_of

OPTIMIZERS = ("nelder-mead", "powell")


@dataclass(frozen=True)
class SearchSettings:
    optimizer: str = "nelder-mead"
    max_evals: int = 300
    """Objective evaluations at most (each one solver run over the whole batch)."""
    initial_step: float = 0.3
    """Size of the first simplex (Nelder-Mead) or of the first directions (Powell) in z: 0.3 changes
    an interval's share of log sigma by about 35%."""
    tolerance: float = 1e-5
    """Stop once the objective varies by less than this across the simplex (absolute, RMSE units)."""

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is not one of: {', '.join(OPTIMIZERS)}")
        if self.max_evals < 1:
            raise ValueError(f"max_evals={self.max_evals} is out of range: expected 1 or more")
        if not self.initial_step > 0:
            raise ValueError(f"initial_step={self.initial_step} is out of range: expected > 0")

    def as_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer,
            "max_evals": self.max_evals,
            "initial_step": self.initial_step,
            "tolerance": self.tolerance,
        }


@dataclass
class SearchResult:
    sigmas: Tensor
    initial_sigmas: Tensor
    initial_loss: float
    loss: float
    """The objective at `sigmas` (the lowest seen; never above initial_loss)."""
    evaluations: int
    best_so_far: list[float] = field(default_factory=list)
    """The lowest objective after each evaluation (its trace)."""
    message: str = ""
    wall_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        trace = self.best_so_far
        marks = sorted({min(len(trace), k) for k in (1, 10, 25, 50, 100, 200, 400, 800, len(trace))})
        return {
            "initial_loss": self.initial_loss,
            "loss": self.loss,
            "evaluations": self.evaluations,
            "best_after_evals": {str(k): trace[k - 1] for k in marks if k >= 1},
            "message": self.message,
            "initial_sigmas": self.initial_sigmas.tolist(),
            "wall_seconds": round(self.wall_seconds, 2),
        }


def free_of(sigmas: Tensor) -> Tensor:
    """z (S - 1,) float64 of a decreasing grid (S + 1,): its log-increment logits less the first."""
    xi = logits_of(sigmas)
    return (xi[1:] - xi[0]).to(torch.float64)


def grid_from_free(z: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """The decreasing grid (S + 1,) float64 whose end points are the given ones, from z (S - 1,)."""
    return grid_of(torch.cat([z.new_zeros(1, dtype=torch.float64), z.to(torch.float64)]), sigma_min, sigma_max)


def search_grid(
    objective: Callable[[Tensor], float],
    init_sigmas: Tensor,
    *,
    settings: SearchSettings,
    on_progress: Callable[[str], None] | None = None,
) -> SearchResult:
    """Minimise `objective(grid)` over the interior nodes of `init_sigmas` (end points fixed).

    Args:
        objective: the loss of a grid (S + 1,) float64; deterministic (the same noises and targets
            every call), so the search is too.
        init_sigmas: the start, decreasing, (S + 1,), S >= 2.
    Returns:
        the best grid seen (the start when nothing beat it), with its loss and the trace.
    """
    import numpy as np
    from scipy.optimize import minimize

    if init_sigmas.dim() != 1 or len(init_sigmas) < 3:
        raise ValueError(f"init_sigmas has shape {tuple(init_sigmas.shape)}: expected (S + 1,) with S >= 2")
    began = time.perf_counter()
    say = on_progress or (lambda _text: None)
    start = init_sigmas.to(torch.float64)
    hi, lo = float(start[0]), float(start[-1])
    z0 = free_of(start)
    trace: list[float] = []
    best: dict[str, Any] = {"loss": float("inf"), "z": z0.clone()}

    def evaluate(values: Any) -> float:
        if len(trace) >= settings.max_evals:  # scipy may overrun maxfev by a few within one step
            return float(best["loss"]) + 1.0
        z = torch.as_tensor(np.asarray(values, dtype=np.float64))
        loss = float(objective(grid_from_free(z, lo, hi)))
        if not np.isfinite(loss):
            loss = float("inf")
        if loss < best["loss"]:
            best.update(loss=loss, z=z.clone())
        trace.append(best["loss"])
        if len(trace) % 25 == 0:
            say(f"{len(trace)} evaluations: best {best['loss']:.5f}")
        return loss

    initial_loss = evaluate(z0.numpy())
    say(f"start: {initial_loss:.5f}")
    x0 = z0.numpy()
    dims = len(x0)
    if settings.optimizer == "nelder-mead":
        simplex = np.vstack([x0] + [x0 + settings.initial_step * np.eye(dims)[k] for k in range(dims)])
        outcome = minimize(
            evaluate,
            x0,
            method="Nelder-Mead",
            options={
                "initial_simplex": simplex,
                "maxfev": settings.max_evals,
                "xatol": 1e-4,
                "fatol": settings.tolerance,
                "adaptive": dims > 4,
            },
        )
    else:
        outcome = minimize(
            evaluate,
            x0,
            method="Powell",
            options={
                "direc": settings.initial_step * np.eye(dims),
                "maxfev": settings.max_evals,
                "xtol": 1e-3,
                "ftol": settings.tolerance,
            },
        )
    sigmas = grid_from_free(best["z"], lo, hi)
    say(f"done: {initial_loss:.5f} -> {best['loss']:.5f} in {len(trace)} evaluations ({outcome.message})")
    return SearchResult(
        sigmas=sigmas,
        initial_sigmas=start.clone(),
        initial_loss=initial_loss,
        loss=best["loss"],
        evaluations=len(trace),
        best_so_far=trace,
        message=str(outcome.message),
        wall_seconds=time.perf_counter() - began,
    )


__all__ = ["OPTIMIZERS", "SearchResult", "SearchSettings", "free_of", "grid_from_free", "search_grid"]
