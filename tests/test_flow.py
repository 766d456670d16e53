"""The rectified-flow map onto the EDM sigma ODE (models/flow.py), checked exactly.

The model is the Gaussian mixture under rectified flow, with its velocity written in flow time t
(`GaussianMixtureFlow`, derived on its own in t-space). Mapped through `FlowDenoiser` it must be
the mixture's sigma-form denoiser; solved in sigma by our solvers it must land where SciPy's
solution of dx_t/dt = v in t lands; Euler in sigma must be Euler in t step for step. Deliberate
errors in the map (t where sigma belongs, the shift inside the network's time) break the checks.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor

import solvers
from models.analytic import GaussianMixtureDenoiser, GaussianMixtureFlow, flow_reference_solution
from models.errors import UnsupportedSchedulerError
from models.flow import FlowDenoiser, FlowSchedule, shifted_t, sigma_of_t, t_of_sigma

BATCH = 6


@pytest.fixture(scope="module")
def mixture() -> GaussianMixtureDenoiser:
    return GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)


@pytest.fixture(scope="module")
def noise() -> Tensor:
    return solvers.make_noise(list(range(BATCH)), (2, 2, 2), dtype=torch.float64)


class _TWhereSigmaBelongs(FlowDenoiser):
    """The bug of reading the formula as D = (x - t v) / (1 + sigma)."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        t = t_of_sigma(sigma.to(torch.float64))
        v = self.velocity(x / (1 + s), t)
        return (x - t.reshape(-1, 1, 1, 1) * v) / (1 + s)


class _ShiftInsideTheNetworkTime(FlowDenoiser):
    """The bug of undoing the shift before the network: v evaluated at t(sigma / shift)."""

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        v = self.velocity(x / (1 + s), t_of_sigma(sigma.to(torch.float64) / self.schedule.shift))
        return (x - s * v) / (1 + s)


def test_flow_denoiser_is_the_mixture_denoiser(mixture: GaussianMixtureDenoiser, noise: Tensor) -> None:
    """D(x, sigma) = x_t - t v(x_t, t) of the t-space velocity equals the sigma-space posterior mean."""
    schedule = FlowSchedule(t_min=0.001, t_max=0.999)
    flow = FlowDenoiser(GaussianMixtureFlow(mixture), schedule)
    wrong = _TWhereSigmaBelongs(GaussianMixtureFlow(mixture), schedule)
    data = mixture.sample_data(BATCH, seed=3).reshape(noise.shape)
    wrong_by = 0.0
    for sigma_value in (0.002, 0.1, 0.7, 3.0, 40.0, 900.0):
        sigma = torch.full((BATCH,), sigma_value, dtype=torch.float64)
        x = data + sigma_value * noise
        expected = mixture(x, sigma)
        assert torch.allclose(flow(x, sigma), expected, rtol=0, atol=1e-12 * max(1.0, sigma_value))
        wrong_by = max(wrong_by, float((wrong(x, sigma) - expected).abs().max()))
    assert wrong_by > 0.1  # the check can fail


def _solve_in_sigma(denoiser: FlowDenoiser, noise: Tensor, steps: int) -> tuple[Tensor, list[tuple[float, Tensor]]]:
    """Heun in sigma on a polynomial grid; the final x and (sigma, x) after each step."""
    visited: list[tuple[float, Tensor]] = []

    def record(info: solvers.StepInfo) -> None:
        visited.append((info.sigma, info.x.clone()))

    result = solvers.sample(denoiser, noise, solver="heun", steps=steps, schedule="polynomial", callback=record)
    return result.images, visited


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigma_ode_solution_is_the_flow_ode_solution(
    mixture: GaussianMixtureDenoiser, noise: Tensor, shift: float
) -> None:
    """Heun in (x = x_t / (1 - t), sigma) vs DOP853 on dx_t/dt = v in t (rtol 1e-12): the same
    trajectory to the solver's accuracy, at every fourth grid point of 400 steps and at the end,
    and the end error falls 4x from 200 to 400 steps (second order, no floor: a wrong map would
    converge to another trajectory). The shifted range starts at t' = s t_max / (1 + (s - 1) t_max)."""
    velocity = GaussianMixtureFlow(mixture)
    schedule = FlowSchedule(t_min=0.005, t_max=0.99, shift=shift)
    t_hi, t_lo = shifted_t(schedule.t_max, shift), shifted_t(schedule.t_min, shift)
    assert math.isclose(t_of_sigma(torch.tensor(schedule.sigma_max, dtype=torch.float64)).item(), t_hi, rel_tol=1e-12)
    denoiser = FlowDenoiser(velocity, schedule)
    x_end, visited = _solve_in_sigma(denoiser, noise, steps=400)
    checkpoints = visited[3::4]
    times = [t_of_sigma(torch.tensor(sigma, dtype=torch.float64)).item() for sigma, _ in checkpoints]
    x_t_start = noise * schedule.sigma_max * (1 - t_hi)  # the same starting point on the straight path
    reference = flow_reference_solution(velocity, x_t_start, t_hi, times)
    assert math.isclose(times[-1], t_lo, rel_tol=1e-9)
    worst = 0.0
    for (_, x), t, exact in zip(checkpoints, times, reference, strict=True):
        worst = max(worst, float(((x * (1 - t) - exact).abs()).max()))
    scale = float(reference[-1].abs().max())
    assert worst < 2e-4 * scale, worst
    end_error = float((x_end * (1 - t_lo) - reference[-1]).abs().max())
    coarse_end, _ = _solve_in_sigma(denoiser, noise, steps=200)
    coarse_error = float((coarse_end * (1 - t_lo) - reference[-1]).abs().max())
    assert 3.5 < coarse_error / end_error < 4.5, (coarse_error, end_error)

    # The check can fail: the same solve with either deliberate error lands elsewhere.
    for wrong in (_TWhereSigmaBelongs(velocity, schedule), _ShiftInsideTheNetworkTime(velocity, schedule)):
        if shift == 1.0 and isinstance(wrong, _ShiftInsideTheNetworkTime):
            continue  # no shift, nothing to misplace
        wrong_end, _ = _solve_in_sigma(wrong, noise, steps=400)
        assert float((wrong_end * (1 - t_lo) - reference[-1]).abs().max()) > 1e-2 * scale


def test_euler_in_sigma_is_euler_in_t(mixture: GaussianMixtureDenoiser, noise: Tensor) -> None:
    """On the same grid, Euler in sigma is the flow Euler step x_t' = x_t + (t' - t) v (what
    FlowMatchEulerDiscreteScheduler does), step for step, to rounding."""
    velocity = GaussianMixtureFlow(mixture)
    schedule = FlowSchedule(t_min=0.001, t_max=0.995, shift=3.0)
    denoiser = FlowDenoiser(velocity, schedule)
    result = solvers.sample(denoiser, noise, solver="euler", steps=12, schedule="polynomial")
    times = t_of_sigma(result.sigmas.to(torch.float64))
    x_t = noise * result.sigmas[0].item() * (1 - times[0])
    for t, t_next in itertools.pairwise(times):
        x_t = x_t + (t_next - t) * velocity(x_t, t.expand(BATCH))
    assert torch.allclose(result.images * (1 - times[-1]), x_t, rtol=1e-12, atol=1e-12)


def test_schedule_from_a_diffusers_config_and_the_shift() -> None:
    """The range is diffusers' training grid short of t = 1, in sigma, times the shift; the shift
    maps diffusers' shifted grid onto shift x the unshifted sigmas, and scales every EDM schedule."""
    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        schedule = FlowSchedule.from_config(scheduler.config)
        assert schedule.timestep_scale == 1000.0
        assert schedule.shift == shift
        assert math.isclose(schedule.sigma_min, sigma_of_t(scheduler.sigma_min), rel_tol=1e-5)  # float32 grid
        assert math.isclose(schedule.sigma_max, shift * 999.0, rel_tol=1e-12)
        # diffusers' inference grid (t = 1 excluded: sigma = inf) is shift x the unshifted sigmas.
        scheduler.set_timesteps(10)
        # (diffusers spaces its inference grid down to its already-shifted sigma_min, then shifts.)
        unshifted = torch.linspace(1.0, scheduler.sigma_min, 10, dtype=torch.float64)[1:]
        grid = scheduler.sigmas[1:-1].to(torch.float64)
        assert torch.allclose(sigma_of_t(grid), shift * sigma_of_t(unshifted), rtol=1e-5)
        # The network's timestep is diffusers': t * num_train_timesteps of the (shifted) t.
        assert torch.allclose(schedule.timestep(sigma_of_t(grid)), scheduler.timesteps[1:].to(torch.float64), rtol=1e-5)
    base = FlowSchedule(t_min=0.001, t_max=0.99)
    shifted = FlowSchedule(t_min=0.001, t_max=0.99, shift=3.0)
    for name in ("polynomial", "logsnr"):
        a = solvers.build_sigmas(name, 8, sigma_min=base.sigma_min, sigma_max=base.sigma_max)
        b = solvers.build_sigmas(name, 8, sigma_min=shifted.sigma_min, sigma_max=shifted.sigma_max)
        assert torch.allclose(b, 3.0 * a, rtol=1e-12)


def test_dynamic_shift_and_bad_configs() -> None:
    config = {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "time_shift_type": "exponential"}
    with pytest.raises(UnsupportedSchedulerError, match=r"mu=None .*use_dynamic_shifting needs"):
        FlowSchedule.from_config(config)
    assert math.isclose(FlowSchedule.from_config(config, mu=1.15).shift, math.exp(1.15))
    assert FlowSchedule.from_config({**config, "time_shift_type": "linear"}, mu=2.0).shift == 2.0
    with pytest.raises(UnsupportedSchedulerError, match=r"time_shift_type='cubic'"):
        FlowSchedule.from_config({**config, "time_shift_type": "cubic"}, mu=1.0)
    with pytest.raises(UnsupportedSchedulerError, match=r"num_train_timesteps=1 .*2\.\.100000"):
        FlowSchedule.from_config({"num_train_timesteps": 1})
    with pytest.raises(UnsupportedSchedulerError, match=r"shift=-1\.0 .*> 0"):
        FlowSchedule.from_config({"shift": -1.0})
    with pytest.raises(UnsupportedSchedulerError, match=r"0 < t_min < t_max < 1"):
        FlowSchedule.from_config({}, t_max=1.0)
