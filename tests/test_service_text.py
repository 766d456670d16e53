"""Text-to-image through the gRPC service: tiny random Stable Diffusion and SDXL pipelines served from
a models TOML next to the built-in mnist, on a real server on 127.0.0.1 (port 0), through the
generated stubs and the `sampler-client` command line."""

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
from sampler_service.imaging import decode_png, decode_raw
from tests.test_service import RunningServer, details, rpc_error


@pytest.fixture(scope="module")
def server(tiny_pipelines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    from bench.amed import main as amed_main

    folder = tmp_path_factory.mktemp("served")
    # An AMED predictor for the tiny SD (a few trajectories: this is about serving it, not its quality).
    train = ["train", "--model", str(tiny_pipelines["sd"]), "--solver", "amed_plugin", "--nfe", "5", "--guidance", "4"]
    train += ["--prompt", "a red fox", "--trajectories", "4", "--batch-size", "4", "--device", "cpu", "--quiet"]
    assert amed_main([*train, "--out", str(folder / "amed")]) == 0
    (folder / "models.toml").write_text(
        '[[models]]\nname = "mnist"\nsource = "mnist"\ndevice = "cpu"\n\n'
        f'[[models]]\nname = "sd"\nsource = "{tiny_pipelines["sd"]}"\ndevice = "cpu"\n\n'
        f'[[models]]\nname = "sdxl"\nsource = "{tiny_pipelines["sdxl"]}"\ndevice = "cpu"\n'
        'text_encoder_device = "cpu"\n'
    )
    running = RunningServer(
        models_config=folder / "models.toml",
        batching={"max_batch_size": 16, "max_queue_delay_ms": 5.0},
        limits={"max_image_pixels": 96 * 96, "max_image_side": 128, "max_prompt_chars": 300},
        predictor_dirs=[folder / "amed"],
        warmup=True,
    )
    yield running
    running.stop()


def text_request(**fields: Any) -> pb.GenerateRequest:
    defaults: dict[str, Any] = {"model": "sd", "solver": "dpmpp_2m", "steps": 4, "prompt": ["a red fox"]}
    return pb.GenerateRequest(**{**defaults, **fields})


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def test_list_models_reports_kind_size_and_latents(server: RunningServer) -> None:
    infos = {m.name: m for m in server.stub.ListModels(pb.ListModelsRequest()).models}

    assert infos["mnist"].kind == pb.MODEL_KIND_CLASS_CONDITIONAL
    assert list(infos["mnist"].latent_shape) == [1, 28, 28]
    for name, pipeline in (("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")):
        info = infos[name]
        assert info.kind == pb.MODEL_KIND_TEXT_TO_IMAGE
        assert (info.channels, info.height, info.width) == (3, 32, 32)
        assert list(info.latent_shape) == [4, 8, 8]
        assert info.size_multiple == 4
        assert info.max_prompt_tokens == 77
        assert info.pipeline_class == pipeline
        assert info.ready
    server_info = server.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert (server_info.max_prompt_chars, server_info.max_image_side, server_info.max_image_pixels) == (300, 128, 9216)


def test_plan_reports_latents_nfe_and_dropped_tokens(server: RunningServer) -> None:
    long = " ".join(["astronaut"] * 30)  # 299 characters, about twice the context in tokens
    plan = server.stub.Plan(
        text_request(prompt=[long, "a cat"], num_samples=2, width=48, height=40, guidance=[7.5], steps=10)
    )
    assert list(plan.latent_shape) == [4, 10, 12]
    assert (plan.width, plan.height) == (48, 40)
    assert plan.steps == 10
    assert plan.nfe == 10
    assert plan.network_evals == 20
    assert plan.dropped_tokens[0] > 0
    assert plan.dropped_tokens[1] == 0
    img2img = server.stub.Plan(text_request(init_image=png(32, 32), strength=0.5, steps=10))
    assert (img2img.start_step, img2img.steps, img2img.nfe) == (5, 5, 5)
    assert len(img2img.sigmas) == 6


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_generate_images_of_the_requested_size(server: RunningServer, model: str) -> None:
    events = list(
        server.stub.Generate(
            text_request(
                model=model,
                prompt=["a red fox", "a city at night"],
                negative_prompt=["blurry"],
                guidance=[7.5, 1.0],
                seeds=[1, 2],
                width=40,
                height=48,
                output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32,
            )
        )
    )
    plan = events[0].accepted
    results = [e.result for e in events if e.WhichOneof("event") == "result"]
    assert [r.index for r in results] == [0, 1]
    for result in results:
        assert (result.image.channels, result.image.height, result.image.width) == (3, 48, 40)
        image = decode_raw(result.image)
        assert np.abs(image).max() <= 1.0
        assert image.std() > 0.01
        assert result.nfe == plan.nfe == 4
        assert result.label == -1
    assert results[0].network_evals == 8  # the request has a guided sample: both halves for all
    # A seed's image does not depend on the other samples of its request.
    alone = list(
        server.stub.Generate(
            text_request(
                model=model,
                prompt=["a red fox"],
                negative_prompt=["blurry"],
                guidance=[7.5],
                seeds=[1],
                width=40,
                height=48,
                output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32,
            )
        )
    )
    single = next(e.result for e in alone if e.WhichOneof("event") == "result")
    np.testing.assert_allclose(decode_raw(single.image), decode_raw(results[0].image), atol=1e-4)


def test_img2img_is_the_model_level_run_from_the_encoded_image(server: RunningServer) -> None:
    """The service's img2img equals the model-level computation (whose parts are cross-checked
    against diffusers' StableDiffusionImg2ImgPipeline): encode, enter the grid, sample, decode."""
    init = png(32, 32, seed=5)
    events = list(
        server.stub.Generate(
            text_request(
                init_image=init,
                strength=0.6,
                seeds=[11],
                steps=10,
                guidance=[3.0],
                schedule="discrete",
                output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32,
            )
        )
    )
    result = next(e.result for e in events if e.WhichOneof("event") == "result")
    assert result.nfe == 6  # int(10 * 0.6) steps run, from step 4

    model = server.service.served["sd"].model
    pixels = np.asarray(Image.open(io.BytesIO(init)), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    with torch.no_grad():
        latents = model.encode(torch.from_numpy(pixels)[None])
        run = solvers.sample(
            model.conditioned(["a red fox"], None, 3.0, height=32, width=32),
            solvers.make_noise([11], (4, 8, 8)),
            solver="dpmpp_2m",
            steps=10,
            schedule="discrete",
            init=latents,
            start=solvers.start_step(10, 0.6),
        )
        expected = model.decode(run.images)[0].numpy()
    assert list(result.sigmas) == run.sigmas.tolist()
    np.testing.assert_allclose(decode_raw(result.image), expected, atol=1e-5)


INVALID = [
    ({"width": 30}, "width", "multiple of 4"),
    ({"width": 256}, "width", "in 32..128"),
    ({"width": 128, "height": 128}, "width x height", "at most 9216 pixels"),
    ({"init_image": png(32, 32), "strength": 0.0}, "strength", "(0, 1]"),
    ({"init_image": png(32, 32), "strength": 1.5}, "strength", "(0, 1]"),
    ({"init_image": png(32, 32), "strength": 0.05}, "strength", "at least"),
    ({"strength": 0.5}, "strength", "send init_image too"),
    ({"init_image": b"GIF89a not a png"}, "init_image", "not a PNG"),
    ({"init_image": png(32, 32)[:40]}, "init_image", "not a decodable PNG"),
    ({"init_image": png(40, 32), "width": 32}, "init_image", "does not match"),
    ({"init_image": png(32, 32), "afs": True}, "afs", "starts from noise"),
    ({"prompt": ["a", "b"], "num_samples": 3}, "prompt", "2 texts for 3 samples"),
    ({"negative_prompt": ["a", "b"], "num_samples": 3}, "negative_prompt", "2 texts for 3 samples"),
    ({"prompt": ["a\x00b"]}, "prompt[0]", "NUL"),
    ({"prompt": ["x" * 301]}, "prompt[0]", "at most 300"),
    ({"prompt": ["a cat", "x" * 1_000_000], "num_samples": 2}, "prompt[1]", "at most 300"),
    ({"labels": [3]}, "labels", "give prompt, not labels"),
    ({"solver": "amed_plugin", "nfe": 5, "afs": True, "width": 48}, "width", "predictor's training size, 32 x 32"),
]


@pytest.mark.parametrize(("fields", "field", "text"), INVALID)
def test_invalid_text_fields_are_named(server: RunningServer, fields: dict[str, Any], field: str, text: str) -> None:
    for call in (server.stub.Plan, lambda r: list(server.stub.Generate(r))):
        error = rpc_error(lambda call=call: call(text_request(**fields)))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        (bad,) = details(error)
        violations = {v.field: v.description for v in bad.field_violations}
        assert field in violations, violations
        assert text in violations[field]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ["a cat"]}, "prompt"),
        ({"negative_prompt": ["blurry"]}, "negative_prompt"),
        ({"init_image": png(28, 28)}, "init_image"),
        ({"width": 64}, "width"),
    ],
)
def test_text_fields_to_a_class_model_are_refused(server: RunningServer, fields: dict[str, Any], field: str) -> None:
    error = rpc_error(lambda: server.stub.Plan(pb.GenerateRequest(model="mnist", solver="euler", steps=3, **fields)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    (bad,) = details(error)
    assert field in {v.field for v in bad.field_violations}
    # The class-conditional path keeps working next to the text models.
    events = list(server.stub.Generate(pb.GenerateRequest(model="mnist", solver="euler", steps=3, labels=[3])))
    assert sum(e.WhichOneof("event") == "result" for e in events) == 1


def test_client_cli_writes_pngs_with_prompt_negative_prompt_and_init_image(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sampler_service import client

    init = tmp_path / "init.png"
    init.write_bytes(png(40, 48, seed=3))
    target = ["--target", f"127.0.0.1:{server.port}"]
    common = ["generate", "--model", "sdxl", "--solver", "euler", "--steps", "6", "--seed", "7", "--quiet"]
    text = ["--prompt", "a red fox in the snow", "--negative-prompt", "blurry", "--guidance", "5"]
    out = tmp_path / "t2i"
    assert (
        client.main(
            [*target, *common, *text, "--num-samples", "2", "--width", "48", "--height", "40", "--out", str(out)]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert [row["nfe"] for row in summary] == [6, 6]
    for name in ("sample-000-seed7.png", "sample-001-seed8.png"):
        assert decode_png((out / name).read_bytes()).shape == (40, 48, 3)

    out = tmp_path / "img2img"
    img2img = ["--init-image", str(init), "--strength", "0.5", "--out", str(out)]
    assert client.main([*target, *common, *text, *img2img]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary[0]["nfe"] == 3  # int(6 * 0.5) steps run
    assert decode_png((out / "sample-000-seed7.png").read_bytes()).shape == (48, 40, 3)

    assert client.main([*target, *common, "--width", "30", "--out", str(out)]) == 2
    assert "width" in capsys.readouterr().err


def test_previews_are_decoded_images(server: RunningServer) -> None:
    events = list(server.stub.Generate(text_request(seeds=[0, 1], steps=4, preview_every=2, width=48)))
    previews = [e.progress for e in events if e.WhichOneof("event") == "progress" and e.progress.previews]
    assert [p.step for p in previews] == [2, 4]
    for image in previews[0].previews:
        assert image.channels == 3  # RGB from the VAE, not the 4 latent channels
        assert decode_png(image.data).shape == (16, 24, 3)  # 32 x 48 halved


def test_amed_on_a_text_model(server: RunningServer) -> None:
    request = text_request(solver="amed_plugin", nfe=5, afs=True, guidance=[4.0], seeds=[0, 1], prompt=["a", "b"])
    events = list(server.stub.Generate(request))
    assert events[0].accepted.predictor.available
    results = [e.result for e in events if e.WhichOneof("event") == "result"]
    assert [(r.nfe, r.network_evals) for r in results] == [(5, 10), (5, 10)]
    # another NFE has no predictor: the plan says how to train one, Generate refuses
    plan = server.stub.Plan(text_request(solver="amed_plugin", nfe=3, afs=True, guidance=[4.0]))
    assert plan.predictor.required
    assert not plan.predictor.available
    assert plan.predictor.train_command.startswith("sampler-amed train --model sd --solver amed_plugin")
    assert "--guidance 4 --afs --prompt" in plan.predictor.train_command
    error = rpc_error(lambda: list(server.stub.Generate(text_request(solver="amed_plugin", nfe=3, afs=True))))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
