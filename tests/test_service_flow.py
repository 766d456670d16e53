"""SD3 and Flux through the gRPC service: tiny random StableDiffusion3Pipeline and FluxPipeline
folders (one guidance-distilled, one not) served from a models TOML on a real server on 127.0.0.1
(port 0), with an AMED predictor trained on the tiny SD3 by `sampler-amed train`."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

import solvers
from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from sampler_service.imaging import decode_raw
from tests.test_service import RunningServer, details, rpc_error

PROMPT_TRAINING = ["--prompt", "a red fox", "--prompt", "a cat on a chair"]


@pytest.fixture(scope="module")
def predictors(flow_pipelines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bench.amed import main as amed_main

    out = tmp_path_factory.mktemp("flow-amed") / "amed"
    train = ["train", "--model", str(flow_pipelines["sd3"]), "--solver", "amed_plugin", "--nfe", "5"]
    train += ["--guidance", "4", *PROMPT_TRAINING, "--trajectories", "24", "--batch-size", "4", "--device", "cpu"]
    assert amed_main([*train, "--quiet", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def server(
    flow_pipelines: dict[str, Path], predictors: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("served-flow")
    (folder / "models.toml").write_text(
        "".join(
            f'[[models]]\nname = "{name}"\nsource = "{flow_pipelines[name]}"\ndevice = "cpu"\n\n'
            for name in ("sd3", "flux", "flux-cfg")
        )
    )
    running = RunningServer(
        models_config=folder / "models.toml",
        batching={"max_batch_size": 16, "max_queue_delay_ms": 5.0},
        limits={"max_image_pixels": 96 * 96, "max_image_side": 128, "max_prompt_chars": 300},
        predictor_dirs=[predictors],
        warmup=True,
    )
    yield running
    running.stop()


def request(**fields: Any) -> pb.GenerateRequest:
    defaults: dict[str, Any] = {"model": "sd3", "solver": "dpmpp_2m", "steps": 4, "prompt": ["a red fox"]}
    return pb.GenerateRequest(**{**defaults, **fields})


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_list_models_says_what_each_flow_model_takes(server: RunningServer) -> None:
    infos = {m.name: m for m in server.stub.ListModels(pb.ListModelsRequest()).models}
    expected = {
        "sd3": ("StableDiffusion3Pipeline", False, 256),
        "flux": ("FluxPipeline", True, 512),
        "flux-cfg": ("FluxPipeline", False, 512),
    }
    for name, (pipeline, distilled, tokens) in expected.items():
        info = infos[name]
        assert (info.pipeline_class, info.guidance_distilled, info.max_prompt_tokens) == (pipeline, distilled, tokens)
        assert info.kind == pb.MODEL_KIND_TEXT_TO_IMAGE
        assert info.prediction_type == "flow_prediction"
        assert info.size_multiple == 8  # the VAE's factor 4 x the 2 x 2 patches
        assert (info.height, info.width) == (32, 32)
        assert list(info.latent_shape) == [4, 8, 8]
        assert info.sigma_max > 100 * info.sigma_min
        assert info.ready


def test_generate_matches_the_model_called_directly(server: RunningServer) -> None:
    """Prompts, a negative prompt and per-sample guidance at a non-default size: what the service
    returns is the model's own sample, decoded (Flux's dynamic shift at this size included)."""
    for name, negatives in (("flux-cfg", ["blurry"]), ("sd3", ["blurry"]), ("flux", [])):
        fields = {"prompt": ["a red fox", "a city at night"], "seeds": [1, 2], "width": 48, "height": 40}
        events = list(
            server.stub.Generate(
                request(
                    model=name,
                    solver="euler",
                    schedule="discrete",
                    negative_prompt=negatives,
                    guidance=[4.0, 1.5],
                    output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32,
                    **fields,
                )
            )
        )
        plan = events[0].accepted
        results = [e.result for e in events if e.WhichOneof("event") == "result"]
        model = server.service.served[name].model
        negative = [negatives[0]] * 2 if negatives else None
        denoiser = model.conditioned(fields["prompt"], negative, torch.tensor([4.0, 1.5]), height=40, width=48)
        with torch.no_grad():
            run = solvers.sample(
                denoiser, solvers.make_noise([1, 2], (4, 10, 12)), solver="euler", steps=4, schedule="discrete"
            )
            expected = model.decode(run.images).numpy()
        assert list(plan.sigmas) == run.sigmas.tolist()
        assert plan.network_evals == plan.nfe * (1 if name == "flux" else 2)
        for k, result in enumerate(results):
            assert (result.image.height, result.image.width) == (40, 48)
            np.testing.assert_allclose(decode_raw(result.image), expected[k], atol=1e-5)


def test_flux_grid_moves_with_the_image_size(server: RunningServer) -> None:
    """Flux's shift e^mu grows with the token count: a larger image starts at a larger sigma."""
    small = server.stub.Plan(request(model="flux", schedule="discrete", width=32, height=32))
    large = server.stub.Plan(request(model="flux", schedule="discrete", width=96, height=96))
    assert large.sigmas[0] > small.sigmas[0]
    sd3_small = server.stub.Plan(request(model="sd3", schedule="discrete", width=32, height=32))
    sd3_large = server.stub.Plan(request(model="sd3", schedule="discrete", width=96, height=96))
    assert list(sd3_small.sigmas) == list(sd3_large.sigmas)  # SD3's shift is static


def test_img2img_on_flux(server: RunningServer) -> None:
    events = list(
        server.stub.Generate(
            request(model="flux", init_image=png(32, 32), strength=0.5, steps=8, guidance=[3.5], seeds=[5])
        )
    )
    result = next(e.result for e in events if e.WhichOneof("event") == "result")
    assert (result.nfe, result.network_evals) == (4, 4)


def test_amed_predictor_on_sd3(server: RunningServer, predictors: Path) -> None:
    """The predictor reads the middle transformer block's token grid; its training loss dropped."""
    (card_path,) = predictors.glob("*.json")
    card = json.loads(card_path.read_text())
    assert card["config"]["feature_shape"] == [4, 4]  # 8 x 8 latents in 2 x 2 patches
    first, final = card["training"]["first_batch_loss_per_interval"], card["training"]["final_loss_per_interval"]
    assert sum(final) < 0.7 * sum(first)
    events = list(
        server.stub.Generate(
            request(solver="amed_plugin", nfe=5, afs=True, guidance=[4.0], seeds=[0, 1], prompt=["a", "b"])
        )
    )
    assert events[0].accepted.predictor.available
    results = [e.result for e in events if e.WhichOneof("event") == "result"]
    assert [(r.nfe, r.network_evals) for r in results] == [(5, 10), (5, 10)]


INVALID = [
    ({"model": "flux", "width": 36}, "width", "a multiple of 8"),
    ({"model": "flux", "height": 44}, "height", "a multiple of 8"),
    ({"model": "sd3", "width": 20}, "width", "a multiple of 8"),
    ({"model": "flux", "negative_prompt": ["blurry"], "guidance": [3.5]}, "negative_prompt", "guidance-distilled"),
    ({"model": "flux", "prompt": ["x" * 301]}, "prompt[0]", "at most 300"),
    ({"model": "flux", "guidance": [1e9]}, "guidance[0]", "out of range"),
    ({"model": "sd3", "init_image": png(32, 32), "strength": 1.5}, "strength", "(0, 1]"),
    ({"model": "sd3", "labels": [3]}, "labels", "give prompt, not labels"),
    ({"model": "sd3", "schedule": "discrete", "steps": 999}, "steps", "at most"),
]


@pytest.mark.parametrize(("fields", "field", "text"), INVALID)
def test_invalid_fields_are_named(server: RunningServer, fields: dict[str, Any], field: str, text: str) -> None:
    for call in (server.stub.Plan, lambda r: list(server.stub.Generate(r))):
        error = rpc_error(lambda call=call: call(request(**fields)))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        (bad,) = details(error)
        violations = {v.field: v.description for v in bad.field_violations}
        assert field in violations, violations
        assert text in violations[field]
    # the server keeps serving
    events = list(server.stub.Generate(request(model="flux", steps=2)))
    assert sum(e.WhichOneof("event") == "result" for e in events) == 1
