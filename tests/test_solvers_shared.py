"""The suite every registered solver runs: a new solver gets it for free.

Shapes and dtypes, determinism, counted NFE against the registry's formula, steps_for_nfe as its
inverse, batch invariance, thread safety, cancellation counted in steps, and bad inputs.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import solvers
from solvers import (
    InvalidParameterError,
    SamplingCancelled,
    StepInfo,
    UnknownScheduleError,
    UnknownSolverError,
    UnreachableNFEError,
)
from solvers.amed import PredictorConfig, new_predictor
from solvers.stepping import Progress

# Every registered solver; the AMED ones get a table-mode predictor (the analytic model has no
# bottleneck feature) whose heads are moved off the neutral start, so it is not dpm_solver_2.
ALL = [spec.name for spec in solvers.list_solvers()]
pytestmark = pytest.mark.parametrize("name", ALL)
TABLE_PREDICTOR = new_predictor(PredictorConfig(feature_shape=None, dc=0.05, da=0.1), seed=0)
with torch.no_grad():
    for head in (TABLE_PREDICTOR.head_r, TABLE_PREDICTOR.head_c, TABLE_PREDICTOR.head_a):
        head.bias.fill_(0.7)


def _run(denoiser, noise, *, solver, **kwargs):
    """solvers.sample, with the test predictor for solvers that need one."""
    if solver in solvers.SOLVERS and solvers.SOLVERS.get(solver).needs_predictor:
        kwargs.setdefault("predictor", TABLE_PREDICTOR)
    return solvers.sample(denoiser, noise, solver=solver, **kwargs)


def _noise(batch: int, dim_shape: tuple[int, ...], dtype: torch.dtype = torch.float64, seed0: int = 0):
    return solvers.make_noise(list(range(seed0, seed0 + batch)), dim_shape, dtype=dtype)


def _min_steps(name: str) -> int:
    spec = solvers.SOLVERS.get(name)
    return spec.min_steps_of(spec.params())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(name, gmm, dtype):
    noise = _noise(3, (2, 2, 2), dtype)
    steps = max(4, _min_steps(name))
    result = _run(gmm, noise, solver=name, steps=steps)
    assert result.images.shape == noise.shape
    assert result.images.dtype == dtype
    assert result.sigmas.dtype == torch.float64
    assert result.sigmas.shape == (steps + 1,)
    assert result.steps == steps
    assert result.solver == name
    assert bool(torch.isfinite(result.images).all())
    # The noise is scaled inside: the first state is sigma_max * noise, so a model-free check is
    # that the images are not the noise itself and have data scale.
    assert result.images.abs().max() < 10


def test_deterministic(name, gmm):
    noise = _noise(4, (8,))
    a = _run(gmm, noise, solver=name, steps=6, afs=True)
    b = _run(gmm, noise, solver=name, steps=6, afs=True)
    assert torch.equal(a.images, b.images)


@pytest.mark.parametrize("afs", [False, True])
def test_counted_nfe_equals_registry(name, gmm_small, afs):
    spec = solvers.SOLVERS.get(name)
    noise = _noise(2, (4,))
    for steps in range(1, 21):
        announced = spec.nfe(steps, afs)
        if steps < _min_steps(name) or announced < 1:
            with pytest.raises(InvalidParameterError) as err:
                _run(gmm_small, noise, solver=name, steps=steps, afs=afs)
            assert err.value.field in {"steps", "afs"}
            continue
        result = _run(gmm_small, noise, solver=name, steps=steps, afs=afs)
        assert result.nfe == announced, f"steps={steps}"
        assert result.network_evals == announced * gmm_small.evals_per_call
        final = _run(gmm_small, noise, solver=name, steps=steps, afs=afs, final_denoise=True)
        assert final.nfe == announced + 1
        assert solvers.nfe_of(name, steps, afs, final_denoise=True) == announced + 1


@pytest.mark.parametrize("afs", [False, True])
def test_steps_for_nfe_inverts_nfe(name, afs):
    spec = solvers.SOLVERS.get(name)
    reachable = spec.reachable_nfe(afs, limit=60)
    assert reachable, "every solver reaches some NFE"
    for nfe in range(1, 61):
        steps = spec.steps_for_nfe(nfe, afs)
        if nfe in reachable:
            assert steps is not None
            assert spec.nfe(steps, afs) == nfe
        else:
            assert steps is None
            with pytest.raises(UnreachableNFEError) as err:
                spec.require_steps_for_nfe(nfe, afs)
            assert err.value.nearest, "the error lists the nearest reachable values"
            assert all(n in spec.reachable_nfe(afs) for n in err.value.nearest)
            assert min(abs(n - nfe) for n in err.value.nearest) <= spec.evals_per_step
            assert str(nfe) in str(err.value)


def test_batch_invariance(name, gmm):
    batch = _noise(16, (8,), seed0=100)
    together = _run(gmm, batch, solver=name, steps=7, afs=True).images
    for index in (0, 5, 15):
        alone = _run(gmm, batch[index : index + 1], solver=name, steps=7, afs=True).images
        torch.testing.assert_close(alone[0], together[index], rtol=0, atol=1e-6)


def test_thread_safe(name, gmm):
    noises = [_noise(2, (8,), seed0=10 * k) for k in range(4)]
    expected = [_run(gmm, n, solver=name, steps=5).images for n in noises]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda n: _run(gmm, n, solver=name, steps=5).images, noises * 2))
    for k, got in enumerate(results):
        assert torch.equal(got, expected[k % 4])


def test_callback_and_cancellation(name, gmm_small):
    spec = solvers.SOLVERS.get(name)
    noise = _noise(2, (4,))
    seen: list[StepInfo] = []
    result = _run(gmm_small, noise, solver=name, steps=8, callback=seen.append)
    assert [info.step for info in seen] == list(range(1, 9))
    assert all(info.total == 8 for info in seen)
    assert [info.sigma for info in seen] == pytest.approx(result.sigmas[1:].tolist())
    assert all(info.denoised.shape == noise.shape for info in seen)

    calls = 0

    class Counting:
        sigma_min, sigma_max, sigma_levels, evals_per_call = (
            gmm_small.sigma_min,
            gmm_small.sigma_max,
            None,
            1,
        )

        def __call__(self, x, sigma):
            nonlocal calls
            calls += 1
            return gmm_small(x, sigma)

    for stop_at in (1, 3):
        calls = 0
        with pytest.raises(SamplingCancelled) as err:
            _run(Counting(), noise, solver=name, steps=8, callback=lambda info, k=stop_at: info.step == k)
        assert err.value.completed_steps == stop_at
        assert err.value.total_steps == 8
        # Stops within one step: never more calls than one step beyond the cancelled one.
        assert calls <= spec.nfe(stop_at + 1, False)


def test_afs_saves_one_call_and_changes_the_start(name, gmm):
    noise = _noise(2, (8,))
    steps = max(4, _min_steps(name))
    plain = _run(gmm, noise, solver=name, steps=steps)
    afs = _run(gmm, noise, solver=name, steps=steps, afs=True)
    assert afs.nfe == plain.nfe - 1
    assert not torch.equal(plain.images, afs.images)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5, True, "4", None])
def test_rejects_bad_steps(name, gmm, steps):
    with pytest.raises(InvalidParameterError) as err:
        _run(gmm, _noise(1, (8,)), solver=name, steps=steps)
    assert err.value.field == "steps"
    assert "1..1000" in str(err.value)


def test_rejects_bad_noise(name, gmm):
    noise = _noise(2, (8,))
    noise[1, 3] = float("nan")
    with pytest.raises(InvalidParameterError, match="noise"):
        _run(gmm, noise, solver=name, steps=4)
    with pytest.raises(InvalidParameterError, match="noise"):
        _run(gmm, torch.zeros(8, dtype=torch.float64), solver=name, steps=4)
    with pytest.raises(InvalidParameterError, match="noise"):
        _run(gmm, torch.zeros(2, 8, dtype=torch.long), solver=name, steps=4)


@pytest.mark.parametrize(
    ("sigmas", "expected"),
    [
        ([80.0, 10.0, 10.0, 1.0, 0.002], "strictly decreasing"),
        ([80.0, 20.0, 30.0, 1.0, 0.002], "strictly decreasing"),
        ([120.0, 20.0, 3.0, 1.0, 0.002], "inside the model's range"),
        ([80.0, 20.0, 3.0, 1.0, 0.0001], "inside the model's range"),
        ([80.0, 20.0, 3.0, 1.0, 0.0], "last entry > 0"),
        ([80.0, 20.0, float("nan"), 1.0, 0.002], "finite"),
        ([80.0, 20.0, 1.0, 0.002], "steps + 1 = 5 values"),
    ],
)
def test_rejects_bad_custom_sigmas(name, gmm, sigmas, expected):
    if _min_steps(name) > 4:
        pytest.skip("needs more steps")
    with pytest.raises(InvalidParameterError, match=re.escape(expected)) as err:
        _run(gmm, _noise(1, (8,)), solver=name, steps=4, schedule="custom", schedule_params={"sigmas": sigmas})
    assert err.value.field.startswith("schedule_params.sigmas")


def test_custom_sigmas_are_used(name, gmm):
    sigmas = [80.0, 20.0, 3.0, 0.5, 0.002]
    if _min_steps(name) > 4:
        pytest.skip("needs more steps")
    result = _run(gmm, _noise(1, (8,)), solver=name, steps=4, schedule="custom", schedule_params={"sigmas": sigmas})
    assert result.sigmas.tolist() == sigmas


def test_rejects_unknown_names_and_parameters(name, gmm):
    noise = _noise(1, (8,))
    with pytest.raises(UnknownSolverError) as err:
        _run(gmm, noise, solver=name + "_nope", steps=4)
    assert name in str(err.value)  # lists the valid names
    with pytest.raises(UnknownScheduleError, match="polynomial"):
        _run(gmm, noise, solver=name, steps=4, schedule="cosine")
    with pytest.raises(InvalidParameterError) as err:
        _run(gmm, noise, solver=name, steps=4, solver_params={"not_a_parameter": 1})
    assert err.value.field == "solver_params.not_a_parameter"
    fields = solvers.SOLVERS.get(name).params.model_fields
    for field_name, info in fields.items():
        bad = "three" if info.annotation is not str else 3.5
        with pytest.raises(InvalidParameterError) as err:
            _run(gmm, noise, solver=name, steps=4, solver_params={field_name: bad})
        assert err.value.field == f"solver_params.{field_name}"
        assert "expected" in str(err.value)
    with pytest.raises(InvalidParameterError, match="schedule_params.rho"):
        _run(gmm, noise, solver=name, steps=4, schedule_params={"rho": -1})


def test_spec_is_complete(name):
    spec = solvers.SOLVERS.get(name)
    summary = solvers.describe(spec)
    assert summary["description"]
    assert summary["order"] >= 1
    assert summary["parameters"]["type"] == "object"
    assert summary["needs_predictor"] is name.startswith("amed")


def test_img2img_runs_the_tail_of_the_grid(name, gmm):
    """From an init at step `start`, the run is the same solver on the grid's tail, counted as such."""
    spec = solvers.SOLVERS.get(name)
    steps = max(8, 2 * _min_steps(name))
    start = steps - max(_min_steps(name), steps // 2)
    noise = _noise(2, (2, 2, 2))
    init = _noise(2, (2, 2, 2), seed0=10) * 0.5
    if spec.needs_predictor:
        with pytest.raises(InvalidParameterError, match=r"^start=.*trained on the whole grid"):
            _run(gmm, noise, solver=name, steps=steps, init=init, start=start)
        return
    result = _run(gmm, noise, solver=name, steps=steps, init=init, start=start)
    full = solvers.build_sigmas("polynomial", steps, sigma_min=gmm.sigma_min, sigma_max=gmm.sigma_max)
    assert torch.equal(result.sigmas, full[start:])
    assert result.steps == steps - start
    assert result.nfe == solvers.nfe_of(name, steps - start)
    # The solver's own loop over the tail of the grid, from init + sigma_start * noise.
    tail = spec.fn(
        gmm,
        init + noise * full[start].item(),
        full[start:],
        params=spec.params(),
        afs=False,
        progress=Progress(None, 1),
    )
    torch.testing.assert_close(result.images, tail, rtol=0, atol=0)
    with pytest.raises(InvalidParameterError, match=r"^afs=True .*init image"):
        _run(gmm, noise, solver=name, steps=steps, init=init, start=start, afs=True)
    with pytest.raises(InvalidParameterError, match=rf"^start={steps} .*0\.\.{steps - 1}"):
        _run(gmm, noise, solver=name, steps=steps, init=init, start=steps)
    with pytest.raises(InvalidParameterError, match=r"^init=\(3, 2, 2, 2\)"):
        _run(gmm, noise, solver=name, steps=steps, init=_noise(3, (2, 2, 2)), start=start)


@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50, 100])
def test_img2img_start_is_diffusers_rule(name, steps):
    """diffusers' img2img get_timesteps: int(steps * strength) steps run, entering after the rest."""
    del name  # the rule is the same for every solver
    for strength in (0.01, 0.29, 0.3, 0.5, 0.7, 0.75, 0.999, 1.0):
        run = min(int(steps * strength), steps)
        if run < 1:
            with pytest.raises(InvalidParameterError, match=r"^strength="):
                solvers.start_step(steps, strength)
        else:
            assert solvers.start_step(steps, strength) == steps - run
    for bad in (0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(InvalidParameterError, match=r"^strength=.*\(0, 1\]"):
            solvers.start_step(steps, bad)
