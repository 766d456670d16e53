"""Per-step overhead of every solver: the time a sampling run spends outside the network.

The denoiser is free: it returns one preallocated zeros tensor, so a step's time is the solver's
own work -- its tensor arithmetic on a (64, 1, 28, 28) float32 state, its history, its
coefficients (DEIS's quadrature) and its Python. Not `x * 0`: that allocates and writes a new
200 KB tensor on every call, a cost of the denoiser that would be charged to the solvers in
proportion to their calls per step (two for heun and dpm_solver_2). Zeros are ordinary floats (no
denormal slow path) and dense CPU kernels do not skip them, so the solver's arithmetic costs what
it costs on real predictions; what is not reproduced is a fresh output buffer per call. No solver
writes into a prediction, so handing out the same tensor every call is safe. glibc's heap
thresholds are pinned for the session (allocator.py): with the defaults, page faults on freed and
re-allocated temporaries made identical runs differ by more than 100x on a 2-core VM.

Two groups, STEPS steps per run:
- `loop`: the solver function alone on a prebuilt grid (`spec.fn`): the per-step work.
- `sample`: the public `solvers.sample` (validation, schedule, noise scaling, the loop): what the
  service pays, with its fixed per-run costs spread over the steps.
`python -m bench solver-overhead` turns the JSON report into time per step (extra_info["steps"]).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

import solvers
from solvers.contract import CountingDenoiser
from solvers.stepping import Progress

SHAPE = (64, 1, 28, 28)
DTYPE = torch.float32
STEPS = 10
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
SOLVER_NAMES = [spec.name for spec in solvers.list_solvers() if not spec.needs_predictor]
BENCHMARK_SETTINGS = {"warmup": True, "warmup_iterations": 5, "min_rounds": 20}


class ZeroDenoiser:
    """D(x, sigma) = 0, returned from one preallocated tensor: a denoiser that costs a Python call."""

    sigma_min = SIGMA_MIN
    sigma_max = SIGMA_MAX
    sigma_levels: Tensor | None = None
    evals_per_call = 1

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.zeros = torch.zeros(shape, dtype=dtype)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.zeros


@pytest.fixture(scope="module")
def denoiser() -> ZeroDenoiser:
    return ZeroDenoiser(SHAPE, DTYPE)


@pytest.fixture(scope="module")
def noise() -> Tensor:
    return solvers.make_noise(list(range(SHAPE[0])), SHAPE[1:], dtype=DTYPE)


def _describe(benchmark, name: str, group: str, allocator: str) -> None:
    spec = solvers.SOLVERS.get(name)
    benchmark.group = group
    benchmark.extra_info.update(
        {
            "solver": name,
            "params": json.dumps(spec.params().model_dump(mode="json"), separators=(",", ":"), sort_keys=True),
            "group": group,
            "steps": STEPS,
            "nfe": spec.nfe(STEPS, afs=False),
            "shape": list(SHAPE),
            "dtype": str(DTYPE).removeprefix("torch."),
            "schedule": "polynomial",
            "denoiser": "preallocated zeros",
            "torch_threads": torch.get_num_threads(),
            "allocator": allocator,
        }
    )


@pytest.mark.benchmark(**BENCHMARK_SETTINGS)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_loop_overhead(benchmark, allocator, denoiser, noise, name):
    spec = solvers.SOLVERS.get(name)
    params = spec.params()
    sigmas = solvers.build_sigmas("polynomial", STEPS, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    x = noise * sigmas[0].item()

    def run() -> int:
        counter = CountingDenoiser(denoiser)
        spec.fn(counter, x, sigmas, params=params, afs=False, progress=Progress(None, STEPS))
        return counter.calls

    _describe(benchmark, name, "loop", allocator)
    assert benchmark(run) == spec.nfe(STEPS, afs=False)


@pytest.mark.benchmark(**BENCHMARK_SETTINGS)
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_sample_overhead(benchmark, allocator, denoiser, noise, name):
    def run() -> int:
        return solvers.sample(denoiser, noise, solver=name, steps=STEPS).nfe

    _describe(benchmark, name, "sample", allocator)
    assert benchmark(run) == solvers.SOLVERS.get(name).nfe(STEPS, afs=False)
