"""`solvers.plan`: a run validated once into a frozen SamplingPlan, run as it is; the service builds
a request's plan once and reports and runs that plan; AMED's predictor key comes from a plan."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import solvers
from models.analytic import GaussianMixtureDenoiser
from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from sampler_service.jobs import build_job
from sampler_service.server import load_served
from sampler_service.settings import Limits, load_settings
from solvers import InvalidParameterError, UnreachableNFEError
from solvers.amed import PredictorConfig, new_card, predictor_key


def _plan(model: GaussianMixtureDenoiser, solver: str, **options: Any) -> solvers.SamplingPlan:
    return solvers.plan(solver, sigma_min=model.sigma_min, sigma_max=model.sigma_max, **options)


def test_a_plan_runs_as_the_keyword_form_does(gmm):
    noise = solvers.make_noise([0, 1, 2], (8,))
    options = {"steps": 6, "schedule": "logsnr", "solver_params": {"order": 3}, "afs": True}
    plan = _plan(gmm, "unipc", **options)
    assert plan.sigmas.dtype == torch.float64
    assert plan.sigmas.shape == (7,)
    assert plan.nfe == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 3  # type: ignore[misc]
    planned = solvers.sample(gmm, noise, plan=plan)
    keyword = solvers.sample(gmm, noise, solver="unipc", **options)
    assert torch.equal(planned.images, keyword.images)
    assert torch.equal(planned.sigmas, keyword.sigmas)
    assert planned.nfe == keyword.nfe == plan.nfe


def test_nfe_becomes_steps_or_names_the_reachable_values(gmm):
    assert _plan(gmm, "heun", nfe=10).steps == 5
    assert _plan(gmm, "heun", nfe=9, afs=True).steps == 5
    with pytest.raises(UnreachableNFEError, match="nearest reachable values are 8, 10"):
        _plan(gmm, "heun", nfe=9)
    with pytest.raises(InvalidParameterError) as both:
        _plan(gmm, "heun", nfe=10, steps=5)
    assert both.value.field == "nfe"


@pytest.mark.parametrize(
    ("solver", "options", "field"),
    [
        ("euler", {"steps": 0}, "steps"),
        ("unipc", {"steps": 1}, "steps"),
        ("euler", {"steps": 1, "afs": True}, "afs"),
        ("euler", {"steps": 4, "afs": 1}, "afs"),
        ("dpmpp_2m", {"steps": 4, "solver_params": {"order": 2}}, "solver_params.order"),
        ("euler", {"steps": 4, "schedule_params": {"rho": -1}}, "schedule_params.rho"),
        ("euler", {"steps": 4, "start": 4}, "start"),
        ("unipc", {"steps": 4, "start": 3}, "start"),
        ("deis", {"steps": 4, "solver_params": {"beta_d": 1, "beta_min": -1000}}, "solver_params.beta_min"),
    ],
)
def test_the_plan_refuses_what_sampling_refused(gmm, solver, options, field):
    """The same error (type, field, text) from plan() and from the keyword form of sample()."""
    with pytest.raises(InvalidParameterError) as planned:
        _plan(gmm, solver, **options)
    with pytest.raises(InvalidParameterError) as sampled:
        solvers.sample(gmm, solvers.make_noise([0], (8,)), solver=solver, **options)
    assert planned.value.field == sampled.value.field == field
    assert str(planned.value) == str(sampled.value)


def test_running_a_plan_checks_only_what_the_plan_cannot_know(gmm):
    plan = _plan(gmm, "euler", steps=4)
    noise = solvers.make_noise([0], (8,))
    with pytest.raises(InvalidParameterError) as clash:
        solvers.sample(gmm, noise, plan=plan, steps=4)
    assert clash.value.field == "steps"
    other = GaussianMixtureDenoiser.smooth(dim=8, sigma_max=20.0)
    with pytest.raises(InvalidParameterError) as wrong_model:
        solvers.sample(other, noise, plan=plan)
    assert wrong_model.value.field == "plan"
    with pytest.raises(InvalidParameterError, match="init"):
        solvers.sample(gmm, noise, plan=_plan(gmm, "euler", steps=4, afs=True), init=torch.zeros_like(noise))


def test_the_predictor_key_comes_from_the_plan_and_reads_back_from_its_card(gmm):
    plan = _plan(gmm, "amed_plugin", nfe=9, solver_params={"base": "dpmpp_2m"}, afs=True, schedule="logsnr")
    key = predictor_key(plan, model_fingerprint="f" * 64, guidance=2.0)
    assert (key.solver, key.base, key.base_max_order, key.nfe, key.afs) == ("amed_plugin", "dpmpp_2m", 2, 9, True)
    assert (key.sigma_max, key.sigma_min) == (plan.sigmas[0].item(), plan.sigmas[-1].item())
    card = new_card(plan, model="m", model_fingerprint="f" * 64, guidance=2.0, config=PredictorConfig(), training={})
    assert card.key() == key
    assert card.steps == plan.steps == 5
    with pytest.raises(InvalidParameterError):
        predictor_key(_plan(gmm, "euler", steps=4), model_fingerprint="f" * 64, guidance=1.0)


def test_the_service_plans_a_request_once_and_reports_that_plan():
    settings = load_settings(None, port=0, device="cpu")
    served = load_served(settings)
    request = pb.GenerateRequest(model="mnist", solver="heun", nfe=10, schedule="logsnr", num_samples=2, base_seed=3)
    job = build_job(request, served, Limits(), "r1")
    assert job.sampling is not None
    assert job.sampling.steps == job.plan.steps == 5
    assert job.plan.sigmas == tuple(job.sampling.sigmas.tolist())
    model = served["mnist"].model
    assert (job.sampling.sigma_min, job.sampling.sigma_max) == (model.sigma_min, model.sigma_max)
    amed = build_job(
        pb.GenerateRequest(model="mnist", solver="amed_plugin", nfe=7, afs=True, labels=[3]), served, Limits(), "r2"
    )
    assert amed.sampling is not None
    assert amed.predictor == predictor_key(amed.sampling, model_fingerprint=model.fingerprint, guidance=1.0)
