"""The shipped rectified-flow model `mnist-flow`: loaded through the flow map (models/flow.py), it
draws the requested digits with solvers of every family, and a server lists and serves it from a
models TOML on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

import models
import solvers
from bench.mnist_quality import quantise
from models.flow import FlowSchedule
from models.mnist.architecture import FLOW_SCHEDULER_CONFIG, NULL_CLASS
from models.mnist.card import write_diffusion_card
from models.mnist.classifier import load_classifier
from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from solvers.amed import PredictorStore
from solvers.learned.grid import grid_key
from tests.test_service import RunningServer, raw_images

SHIPPED = Path(models.BUILTINS["mnist-flow"].folder)
# The bar for 40 guided samples at about ten evaluations per sample: the eps model `mnist` scores
# 97.5-100% at 36 NFE on 2,000 samples (its card); a broken map draws noise (about 10%).
MIN_ACCURACY = 0.85


@pytest.fixture(scope="module")
def flow_model() -> models.DiffusionModel:
    return models.load("mnist-flow", device="cpu")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    return load_classifier()


def test_shipped_files_and_config() -> None:
    weights = SHIPPED / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 25 * 2**20
    assert not list(SHIPPED.rglob("*.bin"))
    scheduler = json.loads((SHIPPED / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert {k: scheduler[k] for k in FLOW_SCHEDULER_CONFIG} == FLOW_SCHEDULER_CONFIG
    training = json.loads((SHIPPED / "training.json").read_text())
    assert training["model"] == "mnist-flow"
    assert training["config"]["objective"] == "flow"
    card = (SHIPPED / "README.md").read_text()
    assert card.startswith("# `mnist-flow`")
    assert "rectified flow" in card


def test_card_is_the_view_of_its_records_and_says_where_training_stopped(tmp_path: Path) -> None:
    """README.md is rendered from training.json and quality.json; a run given up before its planned
    steps says so (training.json `stopped`) in the card."""
    for name in ("training.json", "quality.json"):
        (tmp_path / name).write_bytes((SHIPPED / name).read_bytes())
    rendered = write_diffusion_card(tmp_path).read_text()
    assert rendered == (SHIPPED / "README.md").read_text()
    training = json.loads((SHIPPED / "training.json").read_text())
    if training["step"] < training["config"]["steps"]:
        assert f"stopped at step {training['step']} of the planned {training['config']['steps']:,}: " in rendered


def test_loaded_as_a_flow_model(flow_model: models.DiffusionModel) -> None:
    assert flow_model.prediction_type == "flow_prediction"
    assert isinstance(flow_model.schedule, FlowSchedule)
    assert flow_model.sigma_levels is None
    assert flow_model.sigma_min == pytest.approx(1 / 999, rel=1e-12)
    assert flow_model.sigma_max == pytest.approx(999.0, rel=1e-12)
    assert flow_model.null_class == NULL_CLASS
    assert flow_model.sample_shape == (1, 28, 28)
    assert flow_model.fingerprint != models.load("mnist", device="cpu").fingerprint


def test_the_unet_sees_t_times_1000_and_predicts_the_velocity(flow_model: models.DiffusionModel) -> None:
    """D(x, sigma) = (x - sigma v) / (1 + sigma), v = unet(x / (1 + sigma), 1000 t), t = sigma / (1 + sigma)."""
    labels = torch.tensor([3, 7])
    x = 4.0 * solvers.make_noise([0, 1], flow_model.sample_shape)
    sigma = torch.tensor([0.5, 4.0])
    with torch.inference_mode():
        denoised = flow_model.conditioned(labels)(x, sigma)
        s = sigma.view(-1, 1, 1, 1)
        v = flow_model.unet(x / (1 + s), 1000 * sigma / (1 + sigma), class_labels=labels).sample
    torch.testing.assert_close(denoised, (x - s * v) / (1 + s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("solver", "steps"), [("euler", 10), ("heun", 9), ("dpmpp_2m", 10), ("unipc", 10)])
def test_draws_the_requested_digits(
    flow_model: models.DiffusionModel, classifier: torch.nn.Module, solver: str, steps: int
) -> None:
    labels = torch.arange(40) % 10
    noise = solvers.make_noise(list(range(40)), flow_model.sample_shape)
    with torch.inference_mode():
        result = solvers.sample(flow_model.conditioned(labels, 2.0), noise, solver=solver, steps=steps)
        predicted = classifier(quantise(result.images)).argmax(dim=1)
    assert result.nfe == solvers.nfe_of(solver, steps)
    accuracy = float((predicted == labels).double().mean())
    assert accuracy >= MIN_ACCURACY, f"{solver}: only {accuracy:.0%} of 40 guided samples show the requested digit"


def test_served_from_a_models_toml(tmp_path: Path, classifier: torch.nn.Module) -> None:
    (tmp_path / "models.toml").write_text(
        '[[models]]\nname = "mnist-flow"\nsource = "mnist-flow"\ndevice = "cpu"\n\n'
        '[[models]]\nname = "mnist"\nsource = "mnist"\ndevice = "cpu"\n'
    )
    running = RunningServer(models_config=tmp_path / "models.toml", warmup=False)
    try:
        listed = {m.name: m for m in running.stub.ListModels(pb.ListModelsRequest()).models}
        assert set(listed) == {"mnist", "mnist-flow"}
        info = listed["mnist-flow"]
        assert info.prediction_type == "flow_prediction"
        assert (info.sigma_min, info.sigma_max) == pytest.approx((1 / 999, 999.0))
        assert info.null_class == NULL_CLASS
        fields: dict[str, Any] = {
            "model": "mnist-flow",
            "solver": "dpmpp_2m",
            "steps": 10,
            "seeds": list(range(10)),
            "labels": list(range(10)),
            "guidance": [2.0],
            "output_format": pb.OUTPUT_FORMAT_RAW_FLOAT32,
        }
        events = list(running.stub.Generate(pb.GenerateRequest(**fields)))
        images = raw_images(events)
        assert sorted(images) == list(range(10))
        batch = torch.from_numpy(np.stack([images[i] for i in range(10)]))
        with torch.inference_mode():
            predicted = classifier(quantise(batch)).argmax(dim=1)
        assert int((predicted == torch.arange(10)).sum()) >= 8
        # The discrete schedule needs trained levels: a continuous-time flow model has none.
        with pytest.raises(grpc.RpcError) as caught:
            list(running.stub.Generate(pb.GenerateRequest(**{**fields, "schedule": "discrete"})))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "schedule: 'discrete' is invalid" in caught.value.details()
    finally:
        running.stop()


def test_shipped_predictors_and_grids_belong_to_these_weights(flow_model: models.DiffusionModel) -> None:
    """The AMED predictors and LD3 grids under amed/ are keyed by this model's fingerprint: a
    retrained model (new weights) would leave them unreachable, and this fails first."""
    store = PredictorStore([SHIPPED / "amed"])
    amed = sorted(key.nfe for key in store.keys(flow_model.fingerprint) if key.solver == "amed")
    assert amed == [3, 5, 7, 9]
    assert not [key for key in store.keys(model_fingerprint=None) if key.model_fingerprint != flow_model.fingerprint]
    for solver, params in (("ipndm", {"max_order": 2}), ("unipc", {})):
        resolved = solvers.SOLVERS.get(solver).parse_params(params).model_dump()
        key = grid_key(
            model_fingerprint=flow_model.fingerprint,
            solver=solver,
            solver_params=resolved,
            method="ld3",
            nfe=5,
            afs=True,
            guidance=1.0,
        )
        sigmas = store.find_grid(key, "mnist-flow")
        assert len(sigmas) == 7
        assert sigmas[0] == pytest.approx(flow_model.sigma_max)
