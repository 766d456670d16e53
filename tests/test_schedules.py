"""Schedules and validators: closed forms, invariants (hypothesis) and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import solvers
from solvers import InvalidParameterError, UnknownScheduleError
from solvers.errors import UnreachableNFEError
from solvers.schedules import SCHEDULES, fit_vp_betas, vp_sigma, vp_time

CONTINUOUS = ["polynomial", "logsnr", "time_uniform"]
# Derandomized: the same examples on every run, so CI is reproducible; raise max_examples locally to explore.
FAST = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def _linear_levels(count: int = 1000) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, count, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    return ((1 - abar) / abar).sqrt()


@st.composite
def ranges(draw):
    lo = draw(st.floats(1e-4, 1.0))
    hi = draw(st.floats(lo * 1.5, 500.0))
    return lo, hi


@FAST
@given(name=st.sampled_from(CONTINUOUS), steps=st.integers(1, 1000), rng=ranges(), rho=st.floats(0.5, 20))
def test_continuous_schedules_are_valid_grids(name, steps, rng, rho):
    lo, hi = rng
    params = {} if name == "logsnr" else {"rho": rho}
    if name == "time_uniform" and math.log1p(lo**2) >= 1e-3 * (2 - 1e-3) * math.log1p(hi**2):
        with pytest.raises(InvalidParameterError, match="schedule_params.eps_s"):
            solvers.build_sigmas(name, steps, sigma_min=lo, sigma_max=hi, params=params)
        params["eps_s"] = min(0.9, 1.01 * (1 - math.sqrt(1 - math.log1p(lo**2) / math.log1p(hi**2))))
    sigmas = solvers.build_sigmas(name, steps, sigma_min=lo, sigma_max=hi, params=params)
    assert sigmas.dtype == torch.float64
    assert sigmas.shape == (steps + 1,)
    assert sigmas[0].item() == hi
    assert sigmas[-1].item() == lo
    assert bool((sigmas[1:] < sigmas[:-1]).all())


@FAST
@given(steps=st.integers(1, 200), rng=ranges(), narrow=st.floats(0.1, 0.9))
def test_range_override_stays_inside(steps, rng, narrow):
    lo, hi = rng
    inner_hi = lo + narrow * (hi - lo)
    sigmas = solvers.build_sigmas("polynomial", steps, sigma_min=lo, sigma_max=hi, params={"sigma_max": inner_hi})
    assert sigmas[0].item() == pytest.approx(inner_hi)
    with pytest.raises(InvalidParameterError, match="schedule_params.sigma_max"):
        solvers.build_sigmas("polynomial", steps, sigma_min=lo, sigma_max=hi, params={"sigma_max": hi * 2})
    with pytest.raises(InvalidParameterError, match="schedule_params.sigma_min"):
        solvers.build_sigmas("logsnr", steps, sigma_min=lo, sigma_max=hi, params={"sigma_min": lo / 2})


def test_polynomial_closed_form():
    sigmas = solvers.build_sigmas("polynomial", 4, sigma_min=0.002, sigma_max=80.0, params={"rho": 7})
    u = torch.arange(5, dtype=torch.float64) / 4
    expected = (80 ** (1 / 7) + u * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas, expected, rtol=1e-14, atol=0)


def test_logsnr_is_uniform_in_log_sigma():
    sigmas = solvers.build_sigmas("logsnr", 10, sigma_min=0.002, sigma_max=80.0)
    steps = torch.diff(sigmas.log())
    torch.testing.assert_close(steps, torch.full_like(steps, steps.mean().item()), rtol=1e-12, atol=0)


def test_vp_fit_matches_published_constants():
    beta_d, beta_min = fit_vp_betas(0.002, 80.0)
    assert beta_d == pytest.approx(17.538, abs=5e-4)
    assert beta_min == pytest.approx(-0.00477, abs=5e-5)
    t = torch.tensor([1.0, 1e-3], dtype=torch.float64)
    torch.testing.assert_close(vp_sigma(t, beta_d, beta_min), torch.tensor([80.0, 0.002], dtype=torch.float64))


@FAST
@given(lo=st.floats(1e-4, 0.05), hi=st.floats(10.0, 500.0), t=st.floats(1e-3, 1.0))
def test_vp_time_inverts_vp_sigma(lo, hi, t):
    beta_d, beta_min = fit_vp_betas(lo, hi)
    tau = torch.tensor([t], dtype=torch.float64)
    assert vp_time(vp_sigma(tau, beta_d, beta_min), beta_d, beta_min).item() == pytest.approx(t, rel=1e-9)


def test_time_uniform_is_uniform_in_vp_time():
    sigmas = solvers.build_sigmas("time_uniform", 8, sigma_min=0.002, sigma_max=80.0)
    beta_d, beta_min = fit_vp_betas(0.002, 80.0)
    t = vp_time(sigmas, beta_d, beta_min)
    torch.testing.assert_close(t, torch.linspace(1.0, 1e-3, 9, dtype=torch.float64), rtol=1e-9, atol=1e-12)


@FAST
@given(spacing=st.sampled_from(["linspace", "leading", "trailing"]), steps=st.integers(1, 400))
def test_discrete_picks_trained_levels(spacing, steps):
    levels = _linear_levels()
    sigmas = solvers.build_sigmas(
        "discrete",
        steps,
        sigma_min=levels[0].item(),
        sigma_max=levels[-1].item(),
        sigma_levels=levels,
        params={"spacing": spacing},
    )
    assert sigmas.shape == (steps + 1,)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    assert sigmas[-1].item() == levels[0].item()
    assert all(bool((levels == s).any()) for s in sigmas)


def test_discrete_linspace_indices():
    levels = _linear_levels()
    sigmas = solvers.build_sigmas(
        "discrete", 4, sigma_min=levels[0].item(), sigma_max=levels[-1].item(), sigma_levels=levels
    )
    idx = [int(torch.nonzero(levels == s)[0]) for s in sigmas]
    assert idx == [999, 749, 500, 250, 0]


def test_discrete_needs_levels_and_rejects_too_many_steps():
    with pytest.raises(InvalidParameterError, match="continuous-time schedule"):
        solvers.build_sigmas("discrete", 4, sigma_min=0.002, sigma_max=80.0)
    levels = _linear_levels(20)
    bounds = {"sigma_min": levels[0].item(), "sigma_max": levels[-1].item(), "sigma_levels": levels}
    for spacing in ("linspace", "leading", "trailing"):
        params = {"spacing": spacing}
        with pytest.raises(InvalidParameterError, match="at most") as err:
            solvers.build_sigmas("discrete", 25, params=params, **bounds)
        most = int(str(err.value).split("at most ")[1].split()[0])
        assert solvers.build_sigmas("discrete", most, params=params, **bounds).shape == (most + 1,)
        with pytest.raises(InvalidParameterError):
            solvers.build_sigmas("discrete", most + 1, params=params, **bounds)


def test_unknown_schedule_lists_choices():
    with pytest.raises(UnknownScheduleError) as err:
        solvers.build_sigmas("cosine", 4, sigma_min=0.002, sigma_max=80.0)
    for name in SCHEDULES.names():
        assert name in str(err.value)


@FAST
@given(rho=st.one_of(st.floats(max_value=0), st.floats(min_value=100.5), st.just(float("nan")), st.text(max_size=3)))
def test_bad_schedule_parameters_name_the_field(rho):
    with pytest.raises(InvalidParameterError) as err:
        solvers.build_sigmas("polynomial", 4, sigma_min=0.002, sigma_max=80.0, params={"rho": rho})
    assert err.value.field == "schedule_params.rho"
    assert "expected" in str(err.value)


@FAST
@given(order=st.one_of(st.integers(max_value=0), st.integers(min_value=4), st.text(min_size=1, max_size=3)))
def test_bad_solver_parameters_name_the_field_and_range(order):
    spec = solvers.SOLVERS.get("unipc")
    with pytest.raises(InvalidParameterError) as err:
        spec.parse_params({"order": order})
    assert err.value.field == "solver_params.order"
    if isinstance(order, int):
        assert "expected an integer in 1..3" in str(err.value)


@FAST
@given(
    name=st.sampled_from([s.name for s in solvers.list_solvers()]),
    nfe=st.integers(1, 200),
    afs=st.booleans(),
)
def test_steps_for_nfe_round_trip(name, nfe, afs):
    spec = solvers.SOLVERS.get(name)
    steps = spec.steps_for_nfe(nfe, afs)
    if steps is None:
        with pytest.raises(UnreachableNFEError):
            spec.require_steps_for_nfe(nfe, afs)
    else:
        assert spec.nfe(steps, afs) == nfe


def test_afs_with_one_step_is_rejected_clearly():
    from models.analytic import GaussianMixtureDenoiser

    model = GaussianMixtureDenoiser.smooth(dim=2)
    noise = solvers.make_noise([0], (2,), dtype=torch.float64)
    with pytest.raises(InvalidParameterError, match="no network call") as err:
        solvers.sample(model, noise, solver="euler", steps=1, afs=True)
    assert err.value.field == "afs"
    # Heun's single AFS step still makes its second evaluation.
    assert solvers.sample(model, noise, solver="heun", steps=1, afs=True).nfe == 1


def test_make_noise_is_per_seed():
    together = solvers.make_noise([7, 8, 9], (1, 4, 4))
    alone = solvers.make_noise([8], (1, 4, 4))
    assert torch.equal(together[1], alone[0])
    assert together.dtype == torch.float32
    assert math.isclose(float(solvers.make_noise(list(range(64)), (256,)).std()), 1.0, rel_tol=0.05)
    with pytest.raises(InvalidParameterError, match=r"seeds\[1\]"):
        solvers.make_noise([1, -2], (4,))
