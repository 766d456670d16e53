"""Step-level batching of text-to-image models: tiny random SD, SDXL, SD3 and Flux pipelines (real
diffusers folders) served in float64 in step mode on a real server on loopback. Requests that mix
prompts, negative prompts, guidance (Flux's distilled guidance input included), solvers, steps and
img2img share forwards, each sample equal to the same request alone; another image size runs in
its own ticks."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from tests.test_service import RunningServer, raw_images
from tests.test_service_text import png

RAW = pb.OUTPUT_FORMAT_RAW_FLOAT32
# float64 networks with float32 solver states: sharing a forward changes the network's float64
# rounding only, so an image matches its lone run to float32 precision after the VAE (a row with
# another request's prompt, sigma or guidance is off by 1e-2 or more).
SHARED_TOLERANCE = 1e-5
MODELS = ("sd", "sdxl", "sd3", "flux")


@pytest.fixture(scope="module")
def text_step(
    tiny_pipelines: dict[str, Path], flow_pipelines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    folder = tmp_path_factory.mktemp("text-step")
    sources = {"sd": tiny_pipelines["sd"], "sdxl": tiny_pipelines["sdxl"], **flow_pipelines}
    entries = [
        f'[[models]]\nname = "{name}"\nsource = "{sources[name]}"\ndevice = "cpu"\ndtype = "float64"\n'
        for name in MODELS
    ]
    (folder / "models.toml").write_text("\n".join(entries))
    running = RunningServer(
        models_config=folder / "models.toml",
        batching={"mode": "step", "max_batch_size": 64, "max_queue_delay_ms": 50.0},
        limits={"max_image_pixels": 96 * 96, "max_image_side": 128},
        warmup=False,
    )
    yield running
    running.stop()


def ask(model: str, **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, output_format=RAW, **fields)


def mixed(model: str) -> list[pb.GenerateRequest]:
    """Five requests of one model: prompts, negatives, per-sample guidance (1: the conditional row
    alone, 0: the unconditional one), solvers, steps, img2img, and one at another size."""
    negative = [] if model == "flux" else ["blurry"]  # a distilled model takes no negative prompt
    return [
        ask(model, solver="euler", steps=6, prompt=["a red fox", "a cat"], seeds=[1, 2], guidance=[4.0, 1.0]),
        ask(model, solver="heun", steps=3, prompt=["a city at night"], negative_prompt=negative, seeds=[3]),
        ask(model, solver="dpmpp_2m", steps=5, prompt=["a red fox"], seeds=[4, 5, 6], guidance=[7.5, 0.0, 2.0]),
        ask(model, solver="unipc", steps=4, prompt=["a cat"], seeds=[7], init_image=png(32, 32), strength=0.75),
        ask(model, solver="ipndm", steps=4, prompt=["a cat"], seeds=[8], guidance=[3.0], width=48, height=40),
    ]


@pytest.mark.parametrize("model", MODELS)
def test_text_requests_share_forwards_and_each_matches_its_lone_run(text_step: RunningServer, model: str) -> None:
    requests = mixed(model)
    alone = [raw_images(list(text_step.stub.Generate(r, timeout=120))) for r in requests]
    batcher = text_step.service.engine.batchers[model]
    shared_before = batcher.shared_ticks
    barrier = threading.Barrier(len(requests))

    def together(r: pb.GenerateRequest) -> dict[int, np.ndarray]:
        barrier.wait()
        return raw_images(list(text_step.stub.Generate(r, timeout=120)))

    with ThreadPoolExecutor(len(requests)) as pool:
        shared = list(pool.map(together, requests))
    assert batcher.shared_ticks > shared_before, "no forward held rows of two requests"
    for request, lone, both in zip(requests, alone, shared, strict=True):
        assert lone.keys() == both.keys() == set(range(len(request.seeds)))
        for index, image in both.items():
            assert image.shape == (3, request.height or 32, request.width or 32)
            np.testing.assert_allclose(image, lone[index], atol=SHARED_TOLERANCE, rtol=0)
