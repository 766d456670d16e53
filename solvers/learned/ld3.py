"""LD3 (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025): the S - 1 interior
sigmas of the student's grid trained against a teacher on ~100 noises with the soft, per-sample
surrogate loss.

Parameterisation: logits xi (S,), increments softmax(xi) of the way from log sigma_max to
log sigma_min, so every grid is strictly decreasing with the model's end points; xi starts from a
hand-designed grid (polynomial, rho 7, by default).

Soft loss (the paper's "soft teacher"): the student need not map x_T itself onto the teacher's
output, only some x'_T in a small ball around it:

    L(xi) = mean_n min_{||x'_n - x_n|| <= r sqrt(d) sigma_max} ||Psi_xi(x'_n) - Psi*(x_n)||^2.

With so few parameters the student cannot match every noise exactly; the ball lets each sample
give a little, so xi follows what most samples need instead of the worst. x'_n are kept per sample
and optimised with xi (Adam, projected back onto the ball after each step).

Gradients: our solvers are pure functions of python-float grids (the arithmetic that samples is
the one trained), so d/dxi is not available by autograd. With S <= 10 parameters it is taken by
central finite differences of the minibatch loss (2 S solver runs without grad), while d/dx' is
autograd through the same solver run. Each epoch's grid is scored with the hard loss (x' = x) on
held-out noise; the best epoch is kept (the starting grid is epoch 0, so a run never ends worse
than its start on held-out noise; the card says when it did not move).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..contract import Denoiser
from ..registry import SOLVERS
from ..schedules import build_sigmas
from .student import Student, Teacher, rmse, squared_error


@dataclass(frozen=True)
class LD3Settings:
    trajectories: int = 100
    batch_size: int = 25
    epochs: int = 4
    lr: float = 0.05
    """Adam step of the logits xi."""
    radius: float = 0.01
    """r: the soft ball's radius relative to the noise norm sqrt(d) sigma_max (0: the hard loss)."""
    lr_perturbation: float = 0.2
    """Adam step of x' as a fraction of the ball's radius."""
    fd_step: float = 1e-2
    """Finite-difference step in xi."""
    fd_scheme: str = "central"
    """"central" (2 S solver runs per minibatch) or "forward" (S + 1, about half the cost; bias O(fd_step))."""
    init: str = "polynomial"
    teacher: Teacher = field(default_factory=Teacher)
    selection: int = 64

    def as_dict(self) -> dict[str, Any]:
        return {
            "trajectories": self.trajectories,
            "batch_size": self.batch_size,
            "epochs": self.epochs,
            "lr": self.lr,
            "radius": self.radius,
            "lr_perturbation": self.lr_perturbation,
            "fd_step": self.fd_step,
            "fd_scheme": self.fd_scheme,
            "init": self.init,
            "teacher": self.teacher.as_dict(),
            "selection": self.selection,
        }


@dataclass
class LD3Result:
    sigmas: Tensor
    initial_sigmas: Tensor
    best_epoch: int
    train_loss: list[float]
    """Soft loss per epoch (mean over its minibatches)."""
    held_out_rmse: list[float]
    """Hard RMSE against the teacher on held-out noise, per epoch (index 0: the starting grid)."""
    network_evals: int
    wall_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "train_soft_loss_per_epoch": self.train_loss,
            "held_out_rmse_per_epoch": self.held_out_rmse,
            "loss": self.held_out_rmse[self.best_epoch],
            "initial_sigmas": self.initial_sigmas.tolist(),
            "network_evals": self.network_evals,
            "wall_seconds": round(self.wall_seconds, 2),
        }


def grid_of(xi: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """The decreasing grid (S + 1,) float64 from logits xi (S,). The logits are clamped to +-10 about
    their mean, so no interval's share of log sigma underflows to zero (a repeated sigma)."""
    centred = xi.to(torch.float64) - xi.to(torch.float64).mean()
    weights = torch.softmax(centred.clamp(-10.0, 10.0), 0)
    fractions = torch.cat([xi.new_zeros(1, dtype=torch.float64), torch.cumsum(weights, 0)])
    grid = torch.exp(math.log(sigma_max) + fractions * (math.log(sigma_min) - math.log(sigma_max)))
    grid[0], grid[-1] = sigma_max, sigma_min
    return grid


def logits_of(sigmas: Tensor) -> Tensor:
    """The logits whose grid is `sigmas` (up to the softmax's shift)."""
    steps = torch.diff(sigmas.to(torch.float64).log()).neg()
    return torch.log(steps / steps.sum())


def _project(delta: Tensor, radius: float) -> Tensor:
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
    scale = torch.clamp(radius / norms, max=1.0)
    return delta * scale.reshape(-1, *([1] * (delta.dim() - 1)))


def train_ld3(
    student: Student,
    nfe: int,
    make_batch: Callable[[Sequence[int]], tuple[Denoiser, Tensor]],
    *,
    settings: LD3Settings,
    training_seeds: Sequence[int],
    selection_seeds: Sequence[int],
    init_sigmas: Tensor | None = None,
    teacher_final: Callable[[Sequence[int]], Tensor] | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> LD3Result:
    """Learn the grid of `student` at `nfe` (see the module docstring).

    Args:
        make_batch: for a list of seeds, the model with that batch's conditioning bound and unit
            noise (B, ...) on its device; the model's network frozen, grad mode allowed.
        training_seeds / selection_seeds: the training noises and the held-out ones that pick the epoch.
        init_sigmas: the starting grid (default: settings.init over the model's range).
        teacher_final: the teacher's final states for a list of seeds (default: settings.teacher
            run here); a caller may serve them from a cache, the teacher being the same for every
            solver and NFE.
    """
    if settings.fd_scheme not in ("central", "forward"):
        raise ValueError(f"fd_scheme={settings.fd_scheme!r} is not one of: central, forward")
    began = time.perf_counter()
    say = on_progress or (lambda _text: None)
    steps = student.steps_for(nfe)
    evals_per_run = student.spec.nfe(steps, student.afs)
    seeds = list(training_seeds)
    denoiser, unit = make_batch(seeds)
    lo, hi = denoiser.sigma_min, denoiser.sigma_max
    if init_sigmas is None:
        init_sigmas = build_sigmas(settings.init, steps, sigma_min=lo, sigma_max=hi, sigma_levels=None)
    x = unit * hi
    teacher_evals = SOLVERS.get(settings.teacher.solver).nfe(settings.teacher.steps, False)  # per sample
    say(f"teacher: {settings.teacher.solver} {settings.teacher.steps} steps {settings.teacher.schedule}")

    def solve(chosen: Sequence[int]) -> Tensor:
        if teacher_final is not None:
            return teacher_final(chosen)
        return torch.cat(
            [settings.teacher.final(*_batch(make_batch, list(chosen), k, hi)) for k in _chunks(len(chosen))]
        )

    targets = solve(seeds)
    held_denoiser, held_unit = make_batch(list(selection_seeds))
    held_x = held_unit * hi
    held_targets = solve(list(selection_seeds))
    network_evals = teacher_evals * (len(seeds) + len(selection_seeds))

    def held_out(grid: Tensor) -> float:
        with torch.no_grad():
            return rmse(student.run(held_denoiser, held_x, grid), held_targets)

    xi = logits_of(init_sigmas).clone().requires_grad_(True)
    ball = settings.radius * math.sqrt(x[0].numel()) * hi
    delta = torch.zeros_like(x)
    optimizer = torch.optim.Adam([xi], lr=settings.lr)
    delta_state = {"m": torch.zeros_like(x), "v": torch.zeros_like(x), "t": 0}
    history = [held_out(grid_of(xi.detach(), lo, hi))]
    network_evals += evals_per_run * len(selection_seeds)
    kept = [xi.detach().clone()]
    epoch_losses: list[float] = []
    say(f"epoch 0: held-out rmse {history[0]:.5f}")
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(len(seeds), generator=generator).tolist()
        losses = []
        for start in range(0, len(seeds), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            batch_denoiser, _ = make_batch([seeds[r] for r in rows])
            x_b, y_b = x[rows], targets[rows]
            grid = grid_of(xi.detach(), lo, hi)
            # x' step: autograd through the very solver run
            d_b = delta[rows].clone().requires_grad_(ball > 0)
            with torch.enable_grad():
                out = student.run(batch_denoiser, x_b + d_b, grid)
                loss = squared_error(out, y_b).mean()
                if ball > 0:
                    (grad,) = torch.autograd.grad(loss, d_b)
            losses.append(float(loss.detach()))
            network_evals += evals_per_run * len(rows) * (3 if ball > 0 else 1)
            if ball > 0:
                delta[rows] = _project(
                    _adam_rows(delta, grad, rows, delta_state, settings.lr_perturbation * ball), ball
                )
            # xi step: finite differences of the same minibatch loss at the new x'
            x_soft = x_b + delta[rows]
            gradient = torch.zeros_like(xi.detach())
            central = settings.fd_scheme == "central"
            with torch.no_grad():
                if not central:  # the unshifted loss: x' has not moved when there is no ball
                    here = (
                        loss.detach() if ball == 0 else _loss(student, batch_denoiser, x_soft, y_b, xi.detach(), lo, hi)
                    )
                for k in range(xi.numel()):
                    bump = torch.zeros_like(gradient)
                    bump[k] = settings.fd_step
                    if central:
                        up = _loss(student, batch_denoiser, x_soft, y_b, xi.detach() + bump, lo, hi)
                        down = _loss(student, batch_denoiser, x_soft, y_b, xi.detach() - bump, lo, hi)
                        gradient[k] = (up - down) / (2 * settings.fd_step)
                    else:
                        gradient[k] = (
                            _loss(student, batch_denoiser, x_soft, y_b, xi.detach() + bump, lo, hi) - here
                        ) / settings.fd_step
            runs = 2 * xi.numel() if central else xi.numel() + (ball > 0)
            network_evals += runs * evals_per_run * len(rows)
            optimizer.zero_grad()
            xi.grad = gradient.to(xi.dtype)
            optimizer.step()
        epoch_losses.append(sum(losses) / len(losses))
        history.append(held_out(grid_of(xi.detach(), lo, hi)))
        network_evals += evals_per_run * len(selection_seeds)
        kept.append(xi.detach().clone())
        say(f"epoch {epoch}: soft loss {epoch_losses[-1]:.5g}, held-out rmse {history[-1]:.5f}")
    best = min(range(len(history)), key=history.__getitem__)
    return LD3Result(
        sigmas=grid_of(kept[best], lo, hi),
        initial_sigmas=init_sigmas.clone(),
        best_epoch=best,
        train_loss=epoch_losses,
        held_out_rmse=history,
        network_evals=network_evals,
        wall_seconds=time.perf_counter() - began,
    )


def _loss(student: Student, denoiser: Denoiser, x: Tensor, y: Tensor, xi: Tensor, lo: float, hi: float) -> Tensor:
    """The minibatch's mean squared error on the grid of logits xi (no grad)."""
    return squared_error(student.run(denoiser, x, grid_of(xi, lo, hi)), y).mean()


def _adam_rows(delta: Tensor, grad: Tensor, rows: list[int], state: dict[str, Any], lr: float) -> Tensor:
    """One Adam step (betas 0.9, 0.999) on the rows of x' in this minibatch, per-row moments."""
    state["t"] += 1
    m: Tensor = state["m"]
    v: Tensor = state["v"]
    m[rows] = 0.9 * m[rows] + 0.1 * grad
    v[rows] = 0.999 * v[rows] + 0.001 * grad * grad
    t = int(state["t"])
    step = (m[rows] / (1 - 0.9**t)) / ((v[rows] / (1 - 0.999**t)).sqrt() + 1e-12)
    return delta[rows] - lr * step / math.sqrt(step[0].numel())


def _chunks(count: int, size: int = 50) -> list[range]:
    return [range(s, min(s + size, count)) for s in range(0, count, size)]


def _batch(
    make_batch: Callable[[Sequence[int]], tuple[Denoiser, Tensor]], seeds: list[int], rows: range, hi: float
) -> tuple[Denoiser, Tensor]:
    denoiser, unit = make_batch([seeds[r] for r in rows])
    return denoiser, unit * hi


__all__ = ["LD3Result", "LD3Settings", "grid_of", "logits_of", "train_ld3"]
