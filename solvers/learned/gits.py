"""GITS (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML 2024):
pick the S coarse sigmas among the F + 1 points of a fine grid by dynamic programming on the
local error of the given solver along a few teacher trajectories.

1. Teacher trajectories: for a handful of noises, a fine teacher solve whose states at the F + 1
   candidate sigmas are kept (the teacher takes `substeps` + 1 steps per candidate interval).
2. Cost: C[i, j] (i < j) is the mean L2 distance, over the trajectories, between one interval of
   the student solver from the teacher's state at candidate i to candidate j and the teacher's
   state at j. The student is the registered solver function itself on the grid [s_i, s_j], so a
   single-step solver (heun,
   dpm_solver_2, the AMED plugin) is charged its own local error. A multistep solver run on one
   interval is its first-order start (Euler = DDIM in this parameterisation), which is exactly
   the paper's cost (its code charges an Euler step for every solver): the cost cannot carry the
   history, which depends on the path, not on the pair (i, j).
3. Dynamic program: V_1(i) = C[i, F], V_k(i) = min_{j > i} C[i, j] + coeff V_{k-1}(j); the grid is
   the minimising path from 0 with S intervals. coeff > 1 makes later (lower-sigma) errors count
   more, as in the paper. With AFS (as the official code does) the DP places S - 1 intervals and
   the free AFS point is inserted between sigma_max and the path's first node (up to 6 positions
   tried on held-out noise): charged to the DP, the AFS step's error made it take a tiny first step.
4. Selection (ours): the DP is solved for several `coeffs` (the paper's own sweep) and the grid
   kept is the one whose full solve with the given student, history included, is closest to the
   teacher on held-out noise (disjoint from training and benchmark seeds). This is where a
   multistep solver's history enters: the paths differ in where they spend their intervals, and
   the real solver picks among them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..amed.training import teacher_states
from ..contract import Denoiser
from ..errors import InvalidParameterError
from ..registry import SOLVERS
from ..schedules import build_sigmas
from .student import Student, rmse

DEFAULT_COEFFS = (0.8, 0.9, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
AFS_INSERTIONS = 6  # AFS points tried per coefficient (evenly among the candidates before the first node)


@dataclass(frozen=True)
class GITSSettings:
    candidates: int = 48
    """F: intervals of the fine candidate grid (polynomial, rho 7, over the model's range)."""
    candidate_rho: float = 7.0
    trajectories: int = 32
    substeps: int = 1
    """Teacher steps per candidate interval, minus one (the teacher runs (substeps + 1) F steps)."""
    teacher: str = "heun"
    coeffs: tuple[float, ...] = DEFAULT_COEFFS
    selection: int = 64
    """Held-out noises that choose among the coefficients' grids."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "candidate_rho": self.candidate_rho,
            "trajectories": self.trajectories,
            "substeps": self.substeps,
            "teacher": self.teacher,
            "coeffs": list(self.coeffs),
            "selection": self.selection,
        }


@dataclass
class GITSResult:
    sigmas: Tensor
    coeff: float
    path: list[int]
    dp_cost: float
    selection_rmse: dict[str, float]
    """Held-out RMSE against the teacher for each coefficient's grid."""
    network_evals: int
    wall_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "coeff": self.coeff,
            "path": self.path,
            "dp_cost": self.dp_cost,
            "selection_rmse": self.selection_rmse,
            "loss": self.selection_rmse[f"{self.coeff:g}"],
            "network_evals": self.network_evals,
            "wall_seconds": round(self.wall_seconds, 2),
        }


def candidate_grid(denoiser: Denoiser, settings: GITSSettings) -> Tensor:
    return build_sigmas(
        "polynomial",
        settings.candidates,
        sigma_min=denoiser.sigma_min,
        sigma_max=denoiser.sigma_max,
        params={"rho": settings.candidate_rho},
    )


def teacher_trajectories(denoiser: Denoiser, x: Tensor, fine: Tensor, teacher: str, substeps: int) -> list[Tensor]:
    """The teacher's states at every point of `fine` (its own grid subdivides each interval
    geometrically into substeps + 1 steps)."""
    every = substeps + 1
    log = fine.log()
    parts = [
        torch.exp(log[i] + (log[i + 1] - log[i]) * torch.arange(every, dtype=torch.float64) / every)
        for i in range(len(fine) - 1)
    ]
    teacher_sigmas = torch.cat([*parts, fine[-1:]])
    return teacher_states(denoiser, x, teacher_sigmas, teacher, {}, every)


class _FirstCallMemo:
    """A denoiser that answers a repeated call on the very same (x, sigma) from memory: every
    one-interval student run from candidate i starts with D(x_i, s_i)."""

    def __init__(self, inner: Denoiser) -> None:
        self.inner = inner
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.sigma_levels = inner.sigma_levels
        self.evals_per_call = inner.evals_per_call
        self.memo: tuple[Tensor, float, Tensor] | None = None
        self.calls = 0

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        value = float(sigma.reshape(-1)[0])
        if self.memo is not None and self.memo[1] == value and self.memo[0] is x:
            return self.memo[2]
        self.calls += 1
        out = self.inner(x, sigma)
        self.memo = (x, value, out)
        return out


def cost_matrix(student: Student, denoiser: Denoiser, states: Sequence[Tensor], fine: Tensor) -> tuple[Tensor, int]:
    """C[i, j] for i < j (inf elsewhere) and the network calls spent."""
    count = len(fine)
    cost = torch.full((count, count), math.inf, dtype=torch.float64)
    memo = _FirstCallMemo(denoiser)
    with torch.no_grad():
        for i in range(count - 1):
            start = states[i]
            for j in range(i + 1, count):
                grid = torch.stack([fine[i], fine[j]])
                out = student.run(memo, start, grid, afs=False)
                cost[i, j] = (out - states[j]).to(torch.float64).flatten(1).norm(dim=1).mean()
    return cost, memo.calls


def dynamic_program(cost: Tensor, steps: int, coeff: float) -> tuple[list[int], float]:
    """The path 0 = p_0 < p_1 < ... < p_S = F minimising C[p_0, p_1] + coeff C[p_1, p_2] + coeff^2 ...
    (the recursion V_k(i) = min_j C[i, j] + coeff V_{k-1}(j)); returns it and its value."""
    last = cost.shape[0] - 1
    if steps > last:
        raise InvalidParameterError("steps", steps, f"at most {last} (the candidate grid's intervals)")
    values = torch.full((steps + 1, last + 1), math.inf, dtype=torch.float64)
    choice = torch.full((steps + 1, last + 1), -1, dtype=torch.long)
    values[1] = cost[:, last]
    values[1, last] = math.inf
    for k in range(2, steps + 1):
        for i in range(last):
            totals = cost[i, i + 1 : last] + coeff * values[k - 1, i + 1 : last]
            if totals.numel() == 0:
                continue
            best = int(torch.argmin(totals))
            values[k, i] = totals[best]
            choice[k, i] = i + 1 + best
    path, node = [0], 0
    for k in range(steps, 1, -1):
        node = int(choice[k, node])
        path.append(node)
    path.append(last)
    return path, float(values[steps, 0])


def train_gits(
    student: Student,
    nfe: int,
    make_batch: Callable[[Sequence[int]], tuple[Denoiser, Tensor]],
    *,
    settings: GITSSettings,
    training_seeds: Sequence[int],
    selection_seeds: Sequence[int],
    trajectories: Callable[[Sequence[int], Tensor], list[Tensor]] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> GITSResult:
    """Learn the grid of `student` at `nfe` (see the module docstring).

    Args:
        make_batch: for a list of seeds, the model with that batch's conditioning bound and unit
            noise (B, ...) on its device.
        training_seeds: noises of the teacher trajectories (len = settings.trajectories).
        selection_seeds: held-out noises that pick the coefficient (len = settings.selection).
        trajectories: the teacher's states at the candidate sigmas for a list of seeds (default:
            computed here); a caller may serve them from a cache, shared by every solver and NFE.
    """
    began = time.perf_counter()
    say = on_progress or (lambda _text: None)
    steps = student.steps_for(nfe)
    denoiser, unit = make_batch(list(training_seeds))
    fine = candidate_grid(denoiser, settings)
    x = unit * fine[0].item()
    say(f"teacher: {settings.teacher} over {settings.candidates} x {settings.substeps + 1} steps")

    def walk(chosen: Sequence[int], chosen_x: Tensor, chosen_denoiser: Denoiser) -> list[Tensor]:
        if trajectories is not None:
            return trajectories(chosen, fine)
        return teacher_trajectories(chosen_denoiser, chosen_x, fine, settings.teacher, settings.substeps)

    states = walk(list(training_seeds), x, denoiser)
    teacher_evals = (
        SOLVERS.get(settings.teacher).evals_per_step
        * settings.candidates
        * (settings.substeps + 1)
        * len(training_seeds)
    )
    say("cost matrix")
    cost, calls = cost_matrix(student, denoiser, states, fine)
    network_evals = teacher_evals + calls * len(training_seeds)
    held_denoiser, held_unit = make_batch(list(selection_seeds))
    held_x = held_unit * fine[0].item()
    held_teacher = walk(list(selection_seeds), held_x, held_denoiser)[-1]
    network_evals += (
        SOLVERS.get(settings.teacher).evals_per_step
        * settings.candidates
        * (settings.substeps + 1)
        * len(selection_seeds)
    )
    scores: dict[str, float] = {}
    best: tuple[float, float, list[int], float] | None = None
    seen: dict[tuple[int, ...], float] = {}

    def score(path: list[int]) -> float:
        nonlocal network_evals
        if tuple(path) not in seen:
            with torch.no_grad():
                out = student.run(held_denoiser, held_x, fine[path])
            seen[tuple(path)] = rmse(out, held_teacher)
            network_evals += student.spec.nfe(steps, student.afs) * len(selection_seeds)
        return seen[tuple(path)]

    for coeff in settings.coeffs:
        # With AFS the first interval is free and its error is not the student's: the DP places the
        # other S - 1 intervals and the AFS point is inserted before its first node (as in the
        # official code), where the real solver does best on held-out noise.
        path, value = dynamic_program(cost, steps - 1 if student.afs and steps > 1 else steps, coeff)
        candidates = [path]
        if student.afs and steps > 1:
            room = list(range(1, path[1]))
            stride = max(1, len(room) // AFS_INSERTIONS)
            candidates = [[0, k, *path[1:]] for k in room[::stride]] or [dynamic_program(cost, steps, coeff)[0]]
        chosen = min(candidates, key=score)
        scores[f"{coeff:g}"] = score(chosen)
        say(f"coeff {coeff:g}: path {chosen}, held-out rmse {scores[f'{coeff:g}']:.5f}")
        if best is None or scores[f"{coeff:g}"] < best[0]:
            best = (scores[f"{coeff:g}"], coeff, chosen, value)
    assert best is not None
    _, coeff, path, value = best
    return GITSResult(
        sigmas=fine[path].clone(),
        coeff=coeff,
        path=path,
        dp_cost=value,
        selection_rmse=scores,
        network_evals=network_evals,
        wall_seconds=time.perf_counter() - began,
    )


__all__ = ["DEFAULT_COEFFS", "GITSResult", "GITSSettings", "cost_matrix", "dynamic_program", "train_gits"]
