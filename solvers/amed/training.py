"""Data-free training of an AMED predictor by distilling a finer teacher trajectory.

No data set is involved: for each batch of seeded noises,

1. the teacher (a training-free solver on the same schedule family with (M + 1) S steps, so the
   student's grid is every (M + 1)-th teacher point) integrates one full trajectory without AFS,
   under no_grad, and its states at the student's grid are kept;
2. the student walks the S intervals with `amed_interval`, the very function sampling uses. After
   each interval the loss is the squared L2 distance to the teacher's state at sigma_{i+1}, summed
   over dimensions and averaged over the batch, and Adam takes one step. Gradients reach r and a
   through the frozen network's evaluation at (x_s, a s_i), and c through the update; the feature
   is detached, the multistep history is detached between intervals. Single-step students restart
   every interval from the teacher's state; multistep students continue from their own.
   Non-finite gradients are zeroed. An alternative for multistep students, `objective=
   "trajectory"`, sums the intervals' losses and back-propagates through the state and history
   from interval to interval, with one Adam step per batch (it lets a moved intermediate point
   answer for what it does to later extrapolations; measured on mnist in docs/amed.md).

The denoiser is any `FeatureDenoiser` (or any `Denoiser` for a table-mode predictor); the caller
freezes its network (`requires_grad_(False)`) and must not hold inference mode. This module knows
nothing about where the model came from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..contract import CountingDenoiser, Denoiser, StepInfo
from ..registry import SOLVERS
from ..stepping import Progress
from .bases import MULTISTEP
from .predictor import AMEDPredictor, PredictorConfig
from .solver import History, IntervalUpdate, amed_interval

# Training noise seeds start here: far above the seeds benchmarks score with (seed_base + k, small),
# so no predictor is ever measured on the noises it was trained on.
TRAINING_SEED_BASE = 2**40
# Held-out noises that pick the best of several training seeds: disjoint from the training range
# above (2**40 + seed * 1000003 + k), from the learned grids' (2**41, 2**42) and from benchmarks'.
SELECTION_SEED_BASE = 2**43

# The official recipe's budget (amed-solver-main train.py: total_kimg 10 at batch 128, rounded up to
# whole batches): 79 Adam steps per interval.
RECIPE_TRAJECTORIES = 10_112
RECIPE_BATCH_SIZE = 128


@dataclass(frozen=True)
class TrainingSettings:
    """How to train (recorded in the predictor's sidecar)."""

    trajectories: int = RECIPE_TRAJECTORIES
    batch_size: int = RECIPE_BATCH_SIZE
    lr: float = 5e-3
    betas: tuple[float, float] = (0.9, 0.999)
    teacher: str = "heun"
    teacher_params: dict[str, Any] = field(default_factory=dict)
    teacher_substeps: int = 1
    seed: int = 0
    init: str = "random"
    """How the heads start (`new_predictor`): `random` (the official code's) or `neutral` (r = 1/2 exactly)."""
    objective: str = "interval"
    """`interval` (the paper's): one Adam step after each interval on that interval's loss.
    `trajectory` (multistep students only): the intervals' losses summed, gradients through the
    state and history from interval to interval, one Adam step per batch."""

    @property
    def first_noise_seed(self) -> int:
        """Trajectory k uses noise seed first_noise_seed + k."""
        return TRAINING_SEED_BASE + self.seed * 1_000_003

    def as_dict(self) -> dict[str, Any]:
        return {
            "trajectories": self.trajectories,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "betas": list(self.betas),
            "teacher": self.teacher,
            "teacher_params": self.teacher_params,
            "teacher_substeps": self.teacher_substeps,
            "seed": self.seed,
            "first_noise_seed": self.first_noise_seed,
            "init": self.init,
            "objective": self.objective,
        }


@dataclass
class TrainingSummary:
    """What a run did: losses per interval (first batch and mean of the last quarter of batches)."""

    intervals: int
    batches: int
    trajectories: int
    first_loss: list[float]
    final_loss: list[float]
    wall_seconds: float
    device: str
    network_evals: int  # the student's, summed over trajectories (the teacher's are not counted)

    def as_dict(self) -> dict[str, Any]:
        return {
            "intervals": self.intervals,
            "batches": self.batches,
            "trajectories": self.trajectories,
            "first_batch_loss_per_interval": self.first_loss,
            "final_loss_per_interval": self.final_loss,
            "final_loss": sum(self.final_loss) if self.final_loss else None,
            "wall_seconds": round(self.wall_seconds, 2),
            "device": self.device,
            "network_evals": self.network_evals,
        }


HEAD_INITS = ("random", "neutral")


def new_predictor(config: PredictorConfig, seed: int, *, init: str = "neutral") -> AMEDPredictor:
    """A freshly initialised predictor, deterministic per seed.

    `neutral`: the heads output r = 1/2, c = a = 1 for every input (the untrained baseline: AMED-Solver
    is then DPM-Solver-2). `random`: the heads' weights are drawn N(0, 1 / fan_in) with zero bias, as
    the official code initialises them, so r starts near 1/2 but varies with the feature and sigmas.
    Training starts there, as the official recipe does: from sigma_max with AFS the first interval's
    loss has its gradient in r change sign near r = 1/2, so an exact, input-independent start sits
    where the first steps' direction is decided by noise (issue 18).
    """
    if init not in HEAD_INITS:
        raise ValueError(f"init={init!r} is not one of: {', '.join(HEAD_INITS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = AMEDPredictor(config)
        if init == "random":
            with torch.no_grad():
                for head in (predictor.head_r, predictor.head_c, predictor.head_a):
                    if head is not None:
                        head.weight.normal_(0.0, head.in_features**-0.5)
    return predictor


def teacher_states(
    denoiser: Denoiser, x0: Tensor, teacher_sigmas: Tensor, teacher: str, teacher_params: dict[str, Any], every: int
) -> list[Tensor]:
    """The teacher's states at teacher_sigmas[0], [every], [2 every], ... (no AFS, no grad)."""
    spec = SOLVERS.get(teacher)
    steps = len(teacher_sigmas) - 1
    states = [x0]

    def keep(info: StepInfo) -> None:
        if info.step % every == 0:
            states.append(info.x)

    with torch.no_grad():
        spec.fn(
            CountingDenoiser(denoiser),
            x0,
            teacher_sigmas,
            params=spec.parse_params(teacher_params),
            afs=False,
            progress=Progress(keep, steps),
        )
    return states


def _step(optimizer: torch.optim.Optimizer, predictor: AMEDPredictor, loss: Tensor) -> None:
    """One Adam step on `loss`; non-finite gradients are zeroed."""
    optimizer.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)  # what loss.backward() calls, but typed (Tensor.backward is not)
    for parameter in predictor.parameters():
        if parameter.grad is not None and not bool(torch.isfinite(parameter.grad).all()):
            parameter.grad.zero_()
    optimizer.step()


def train_predictor(
    predictor: AMEDPredictor,
    *,
    update: IntervalUpdate,
    sigmas: Tensor,
    teacher_sigmas: Tensor,
    afs: bool,
    make_batch: Callable[[Sequence[int]], tuple[Denoiser, Tensor]],
    settings: TrainingSettings,
    on_batch: Callable[[int, list[float]], None] | None = None,
) -> TrainingSummary:
    """Train `predictor` in place (with 0 trajectories it stays as initialised: r = 1/2, c = a = 1,
    the untrained baseline).

    Args:
        make_batch: for a list of seeds, the frozen model with that batch's conditioning bound
            (its evaluations get gradients w.r.t. their inputs only) and unit noise (B, ...) on
            its device (scaled to sigma_max here).
        sigmas: the student's grid, float64 (S + 1,).
        teacher_sigmas: the teacher's grid, float64 ((M + 1) S + 1,), containing `sigmas` at
            every (M + 1)-th point.
        on_batch: called after each batch with its index and loss per interval.
    Returns:
        a TrainingSummary.
    """
    every = settings.teacher_substeps + 1
    intervals = len(sigmas) - 1
    if settings.trajectories < 0 or settings.batch_size < 1:
        raise ValueError(f"trajectories {settings.trajectories} (>= 0), batch size {settings.batch_size} (>= 1)")
    if settings.objective not in ("interval", "trajectory"):
        raise ValueError(f"objective {settings.objective!r}: choose interval or trajectory")
    whole = settings.objective == "trajectory"
    if whole and not update.multistep:
        raise ValueError(f"the trajectory objective is for multistep students ({', '.join(MULTISTEP)} bases)")
    if len(teacher_sigmas) != every * intervals + 1:
        raise ValueError(f"teacher grid of {len(teacher_sigmas)} points for {intervals} intervals x {every}")
    picked = teacher_sigmas[::every]
    if not torch.allclose(picked, sigmas.to(picked), rtol=1e-9, atol=0.0):
        raise ValueError("the student's grid is not every (M + 1)-th point of the teacher's")
    s = sigmas.tolist()
    optimizer = torch.optim.Adam(predictor.parameters(), lr=settings.lr, betas=settings.betas)
    network_evals = 0
    predictor.train()
    began = time.perf_counter()
    losses: list[list[float]] = []
    batches = math.ceil(settings.trajectories / settings.batch_size)
    device = "cpu"
    for batch_index in range(batches):
        start = settings.first_noise_seed + batch_index * settings.batch_size
        count = min(settings.batch_size, settings.trajectories - batch_index * settings.batch_size)
        denoiser, unit_noise = make_batch(list(range(start, start + count)))
        counter = CountingDenoiser(denoiser)
        x0 = unit_noise * s[0]
        device = str(x0.device)
        targets = teacher_states(denoiser, x0, teacher_sigmas, settings.teacher, settings.teacher_params, every)
        x, history = x0, History()
        batch_losses = []
        total = None
        with torch.enable_grad():
            for i in range(intervals):
                start_state = x if update.multistep else targets[i]
                result = amed_interval(
                    counter,
                    predictor,
                    start_state,
                    s[i],
                    s[i + 1],
                    update=update,
                    history=history,
                    use_afs=afs and i == 0,
                )
                loss = (result.x - targets[i + 1]).pow(2).flatten(1).sum(1).mean()
                batch_losses.append(float(loss.detach()))
                if whole:  # keep the graph: later intervals' losses reach this interval's r and c
                    total = loss if total is None else total + loss
                    x, history = result.x, result.history
                    continue
                _step(optimizer, predictor, loss)
                x, history = result.x.detach(), result.history.detached()
            if total is not None:
                _step(optimizer, predictor, total)
        losses.append(batch_losses)
        network_evals += counter.network_evals * count
        if on_batch is not None:
            on_batch(batch_index, batch_losses)
    predictor.eval()
    tail = losses[-max(1, len(losses) // 4) :]
    final = [sum(b[i] for b in tail) / len(tail) for i in range(intervals)] if tail else []
    return TrainingSummary(
        intervals=intervals,
        batches=batches,
        trajectories=settings.trajectories,
        first_loss=losses[0] if losses else [],
        final_loss=final,
        wall_seconds=time.perf_counter() - began,
        device=device,
        network_evals=network_evals,
    )


__all__ = [
    "HEAD_INITS",
    "RECIPE_BATCH_SIZE",
    "RECIPE_TRAJECTORIES",
    "SELECTION_SEED_BASE",
    "TRAINING_SEED_BASE",
    "TrainingSettings",
    "TrainingSummary",
    "new_predictor",
    "teacher_states",
    "train_predictor",
]
