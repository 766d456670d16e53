"""Convergence order of every training-free solver on the exact Gaussian-mixture model.

Setup (the foundation issue's protocol): AFS off, `logsnr` schedule on sigma in [0.02, 80], a
smooth 8-dimensional mixture, steps 32..256; the error is the RMSE of the final state against
SciPy's DOP853 solution from the same noise (rtol 1e-12). Multistep solvers get exact starting
values for their lower-order warm-up and do not lower the order on their final steps
(`lower_order_final`, on by default: one first-order step whose O(h^2) error shows at many steps),
so the slope measures the formula's own order; the end-to-end slopes (with warm-up and the lowered
final steps) are in bench/results/accuracy-gmm-order.csv.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import solvers
from models.analytic import GaussianMixtureDenoiser, reference_solution
from solvers.contract import CountingDenoiser
from solvers.stepping import Progress
from tests.conftest import TRAINING_FREE

STEPS = (32, 64, 128, 256)
VARIANTS = [(name, {}) for name in TRAINING_FREE] + [
    ("dpmpp_3m", {"third_order": "upstream"}),
    ("unipc", {"order": 1}),
    ("unipc", {"order": 3}),
    ("unipc", {"order": 2, "variant": "bh1"}),
    ("unipc", {"order": 2, "corrector": False}),
    ("ipndm", {"max_order": 1}),
    ("ipndm_v", {"max_order": 2}),
    ("ipndm_v", {"max_order": 3}),
    ("deis", {"max_order": 2}),
    ("dpm_solver_2", {"r": 0.3}),
]


@pytest.fixture(scope="module")
def setup():
    model = GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0, sigma_min=0.02, sigma_max=80.0)
    noise = solvers.make_noise(list(range(8)), (8,), dtype=torch.float64)
    grids, exact = {}, {}
    for steps in STEPS:
        sigmas = solvers.build_sigmas("logsnr", steps, sigma_min=0.02, sigma_max=80.0)
        # Exact states at sigmas[1..3] (warm-up replacements) and at the end.
        wanted = [*sigmas[1:4].tolist(), sigmas[-1].item()]
        states = reference_solution(model, noise * 80.0, 80.0, wanted)
        grids[steps], exact[steps] = sigmas, states
    return model, noise, grids, exact


def _error(model, noise, sigmas, states, name, params) -> float:
    spec = solvers.SOLVERS.get(name)
    if "lower_order_final" in spec.params.model_fields:
        params = {"lower_order_final": False, **params}
    parsed = spec.parse_params(params)
    warmup = spec.warmup_of(parsed)
    extra = {"exact_start": tuple(states[:warmup])} if warmup else {}
    x = spec.fn(
        CountingDenoiser(model),
        noise * sigmas[0].item(),
        sigmas,
        params=parsed,
        afs=False,
        progress=Progress(None, len(sigmas) - 1),
        **extra,
    )
    return (x - states[-1]).pow(2).mean().sqrt().item()


@pytest.mark.parametrize(("name", "params"), VARIANTS, ids=lambda v: str(v).replace(" ", ""))
def test_convergence_order(setup, name, params):
    model, noise, grids, exact = setup
    errors = [_error(model, noise, grids[s], exact[s], name, params) for s in STEPS]
    slopes = [math.log2(a / b) for a, b in itertools.pairwise(errors)]
    spec = solvers.SOLVERS.get(name)
    declared = spec.order_of(spec.parse_params(params))
    # Errors fall monotonically and far above the reference's own error (rtol 1e-12).
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] > 1e-10, errors
    assert abs(slopes[-1] - declared) <= 0.3, f"declared {declared}, measured slopes {slopes}, errors {errors}"


def test_upstream_third_order_is_second_order(setup):
    """The published DPM-Solver++(3M) coefficient loses an order; the corrected one keeps it."""
    model, noise, grids, exact = setup
    up = [_error(model, noise, grids[s], exact[s], "dpmpp_3m", {"third_order": "upstream"}) for s in STEPS[-2:]]
    fixed = [_error(model, noise, grids[s], exact[s], "dpmpp_3m", {}) for s in STEPS[-2:]]
    assert math.log2(up[0] / up[1]) < 2.3
    assert math.log2(fixed[0] / fixed[1]) > 2.7
    assert fixed[1] < up[1] / 10
