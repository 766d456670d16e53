"""What both grid-learning methods share: the student (the given solver, run by its own registered
function on any grid) and the teacher (a fine solve from the same noise).

Nothing here copies an update rule: the student is `spec.fn` itself, so a grid is learned for
exactly the arithmetic that will later run on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..contract import CountingDenoiser, Denoiser
from ..registry import SOLVERS, Params, SolverSpec
from ..schedules import build_sigmas
from ..stepping import Progress


@dataclass(frozen=True)
class Student:
    """The solver a grid is learned for: its spec, parameters, AFS and (AMED) predictor."""

    spec: SolverSpec[Any]
    params: Params
    afs: bool
    predictor: Any = None

    @classmethod
    def of(cls, solver: str, solver_params: Any, afs: bool, predictor: Any = None) -> Student:
        spec = SOLVERS.get(solver)
        return cls(spec, spec.parse_params(solver_params), afs, predictor)

    def steps_for(self, nfe: int) -> int:
        return self.spec.require_steps_for_nfe(nfe, self.afs, self.params)

    def run(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor, *, afs: bool | None = None) -> Tensor:
        """The solver's state at sigmas[-1] from `x` at sigmas[0] (x already scaled to sigmas[0])."""
        extra = {"predictor": self.predictor} if self.spec.needs_predictor else {}
        out: Tensor = self.spec.fn(
            CountingDenoiser(denoiser),
            x,
            sigmas,
            params=self.params,
            afs=self.afs if afs is None else afs,
            progress=Progress(None, len(sigmas) - 1),
            **extra,
        )
        return out


@dataclass(frozen=True)
class Teacher:
    """A fine solve: `solver` with `steps` intervals of `schedule` over the model's range."""

    solver: str = "heun"
    steps: int = 64
    schedule: str = "logsnr"
    solver_params: dict[str, Any] = field(default_factory=dict)

    def sigmas(self, denoiser: Denoiser, steps: int | None = None) -> Tensor:
        return build_sigmas(
            self.schedule,
            self.steps if steps is None else steps,
            sigma_min=denoiser.sigma_min,
            sigma_max=denoiser.sigma_max,
            sigma_levels=denoiser.sigma_levels,
        )

    def final(self, denoiser: Denoiser, x: Tensor) -> Tensor:
        """The teacher's state at sigma_min from `x` at sigma_max (no AFS, no grad)."""
        spec = SOLVERS.get(self.solver)
        with torch.no_grad():
            out: Tensor = spec.fn(
                CountingDenoiser(denoiser),
                x,
                self.sigmas(denoiser),
                params=spec.parse_params(self.solver_params),
                afs=False,
                progress=Progress(None, self.steps),
            )
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "steps": self.steps,
            "schedule": self.schedule,
            "solver_params": self.solver_params,
        }


def squared_error(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample squared L2 distance, (B,)."""
    return (a - b).to(torch.float64).pow(2).flatten(1).sum(1)


def rmse(a: Tensor, b: Tensor) -> float:
    """Root of the mean squared difference per element (the sweep's rmse_ref, averaged over all)."""
    return float((a - b).to(torch.float64).pow(2).flatten(1).mean(1).sqrt().mean())


__all__ = ["Student", "Teacher", "rmse", "squared_error"]
