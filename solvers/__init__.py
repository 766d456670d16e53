"""Model-agnostic ODE solvers for the probability-flow ODE in the EDM sigma parameterisation.

    x = x0 + sigma * eps,    dx/dsigma = (x - D(x, sigma)) / sigma.

Pure PyTorch (plus pydantic for parameter models); imports nothing else of this project.
Use `sample(denoiser, noise, solver=..., steps=...)`, or validate once with `plan(...)` and run the
`SamplingPlan` with `sample(denoiser, noise, plan=...)`; `list_solvers()` says what exists.
"""

# isort: off
# Registration order is the order clients see: classic, DPM family, UniPC, Adams family, AMED.
from . import euler_heun, dpm_solver, unipc, adams, amed  # noqa: F401

# isort: on
from .contract import CountingDenoiser, Denoiser, FeatureDenoiser, StepCallback, StepInfo
from .errors import (
    InvalidParameterError,
    MissingPredictorError,
    SamplingCancelled,
    SolverError,
    UnknownNameError,
    UnknownScheduleError,
    UnknownSolverError,
    UnreachableNFEError,
)
from .planning import SamplingPlan, plan
from .registry import MAX_STEPS, SOLVERS, Params, SolverSpec, describe, list_solvers
from .sampling import MAX_SEED, SampleResult, make_noise, nfe_of, run, sample, start_step
from .schedules import SCHEDULES, build_sigmas, fit_vp_betas

__all__ = [
    "MAX_SEED",
    "MAX_STEPS",
    "SCHEDULES",
    "SOLVERS",
    "CountingDenoiser",
    "Denoiser",
    "FeatureDenoiser",
    "InvalidParameterError",
    "MissingPredictorError",
    "Params",
    "SampleResult",
    "SamplingCancelled",
    "SamplingPlan",
    "SolverError",
    "SolverSpec",
    "StepCallback",
    "StepInfo",
    "UnknownNameError",
    "UnknownScheduleError",
    "UnknownSolverError",
    "UnreachableNFEError",
    "build_sigmas",
    "describe",
    "fit_vp_betas",
    "list_solvers",
    "make_noise",
    "nfe_of",
    "plan",
    "run",
    "sample",
    "start_step",
]
