"""Fault injection: a real class-conditional diffusers UNet (saved to a folder, loaded through the
models config like any other model) whose forward fails for one chosen label: it raises, returns
NaN, or raises torch.OutOfMemoryError. Requests with different labels share one batch; only the
request with the faulty label fails, with the documented status and ErrorInfo reason, everyone else
gets the images they would get alone, health stays SERVING and the metrics count the failure."""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2

from models import InvalidConditioningError
from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from sampler_service.server import load_served
from sampler_service.settings import load_settings
from tests.test_service import FLOAT32_BATCH_TOLERANCE, RunningServer, details, raw_images, rpc_error

FAULTY_LABEL = 2
NULL_CLASS = 3


class LabelFault:
    """Makes a UNet fail on every forward whose class labels include `label`: `kind` "raise"
    (RuntimeError), "oom" (torch.OutOfMemoryError), "nan" (NaN output rows for that label only) or
    "refuse" (the model layer's own InvalidConditioningError, as an adapter raises for conditioning
    it cannot take). Installed as forward hooks on the real module; records the labels of every
    forward."""

    def __init__(self, unet: torch.nn.Module, label: int, kind: str) -> None:
        self.label, self.kind = label, kind
        self.enabled = True
        self.calls: list[list[int]] = []
        self.lock = threading.Lock()
        self.handles = [
            unet.register_forward_pre_hook(self._before, with_kwargs=True),
            unet.register_forward_hook(self._after, with_kwargs=True),
        ]

    def _labels(self, kwargs: dict[str, Any]) -> torch.Tensor:
        return kwargs["class_labels"]

    def _before(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        labels = self._labels(kwargs)
        with self.lock:
            self.calls.append(labels.tolist())
        if not self.enabled or not bool((labels == self.label).any()):
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected fault for label {self.label}")
        if self.kind == "oom":
            raise torch.OutOfMemoryError(f"injected out of memory for label {self.label}")
        if self.kind == "refuse":
            raise InvalidConditioningError("labels", self.label, "a label this model can take")

    def _after(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if self.enabled and self.kind == "nan":
            output.sample[self._labels(kwargs) == self.label] = float("nan")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("faulty")
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=NULL_CLASS + 1,
    )
    unet.save_pretrained(root / "tiny" / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=100).save_pretrained(root / "tiny" / "scheduler")
    (root / "models.toml").write_text(
        f'[[models]]\nname = "tiny"\nsource = "tiny"\ndevice = "cpu"\nnull_class = {NULL_CLASS}\n'
    )
    return root / "models.toml"


@pytest.fixture(
    params=[(kind, mode) for mode in ("request", "step") for kind in ("raise", "nan", "oom", "refuse")],
    ids=lambda param: f"{param[1]}-{param[0]}",
)
def faulty(request: pytest.FixtureRequest, model_folder: Path) -> Iterator[tuple[RunningServer, LabelFault]]:
    kind, mode = request.param
    settings = load_settings(None, models_config=model_folder, device="cpu")
    served = load_served(settings)
    fault = LabelFault(served["tiny"].model.unet, FAULTY_LABEL, kind)
    running = RunningServer(
        served=served,
        models_config=model_folder,
        metrics_port=0,
        warmup=False,
        # a long fixed delay: the concurrent requests below all land in the first batch (request
        # mode); in step mode they join the running ticks and share forwards
        batching={"mode": mode, "max_batch_size": 64, "max_queue_delay_ms": 1000.0, "adaptive_delay": False},
    )
    try:
        yield running, fault
    finally:
        running.stop()


# status and ErrorInfo reason (the metric's reason label) of the failing request, by fault kind;
# a domain error of the model layer keeps its own status and names the field
EXPECTED = {
    "raise": ("INTERNAL", "MODEL_ERROR"),
    "nan": ("INTERNAL", "NON_FINITE_OUTPUT"),
    "oom": ("INTERNAL", "OUT_OF_MEMORY"),
    "refuse": ("INVALID_ARGUMENT", "INVALID_ARGUMENT"),
}
# (labels, seeds) of each request: one holds the faulty label; one has two samples.
REQUESTS = [([0], [10]), ([1], [11]), ([FAULTY_LABEL], [12]), ([0, 1], [13, 14]), ([1], [15])]


def ask(labels: list[int], seeds: list[int]) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        model="tiny",
        solver="dpmpp_2m",
        steps=3,
        labels=labels,
        seeds=seeds,
        guidance=[2.0],
        output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32,
        request_id=f"fault-{seeds[0]}",
    )


def check_failure(error: grpc.RpcError, kind: str) -> None:
    code, reason = EXPECTED[kind]
    assert error.code().name == code  # type: ignore[attr-defined]
    (detail,) = details(error)
    if code == "INVALID_ARGUMENT":
        assert [v.field for v in detail.field_violations] == ["labels"]
    else:
        assert (detail.reason, detail.domain) == (reason, "sampler.v1")


def metric(port: int, name: str, labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    return 0.0


def test_only_the_request_with_the_faulty_label_fails(
    faulty: tuple[RunningServer, LabelFault], caplog: pytest.LogCaptureFixture
) -> None:
    running, fault = faulty
    kind = fault.kind
    caplog.set_level(logging.INFO, logger="sampler_service")
    barrier = threading.Barrier(len(REQUESTS))

    def generate(labels: list[int], seeds: list[int]) -> list[pb.GenerateEvent] | grpc.RpcError:
        barrier.wait()
        try:
            return list(running.stub.Generate(ask(labels, seeds), timeout=60))
        except grpc.RpcError as error:
            return error

    step_mode = running.settings.batching.mode == "step"
    companion = None
    if step_mode:
        # Requests join the running ticks, so one that is admitted first would run its first tick
        # alone: a long request already ticking makes every tick wait for its rows, and the
        # faulty label shares forwards whatever order the five are admitted in.
        long_request = ask([1], [99])
        long_request.solver, long_request.steps, long_request.request_id = "euler", 1000, "fault-companion"
        companion = running.stub.Generate(long_request, timeout=60)
        next(companion)  # its first progress event: it is ticking
        fault.calls.clear()
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        outcomes = list(pool.map(lambda r: generate(*r), REQUESTS))
    if companion is not None:
        companion.cancel()

    if not step_mode:
        # the five requests (six samples, guided: 12 rows) ran as one batch first
        first = fault.calls[0]
        assert len(first) == 12
        assert sorted(first[:6]) == sorted(label for labels, _ in REQUESTS for label in labels)
    else:  # step mode: the faulty label shared a forward with other requests' rows
        assert any(FAULTY_LABEL in call and {0, 1} & set(call) for call in fault.calls)
    for (labels, seeds), outcome in zip(REQUESTS, outcomes, strict=True):
        if FAULTY_LABEL in labels:
            assert isinstance(outcome, grpc.RpcError)
            check_failure(outcome, kind)
        else:
            assert not isinstance(outcome, grpc.RpcError), outcome
            assert sorted(e.result.seed for e in outcome if e.WhichOneof("event") == "result") == seeds

    # the survivors' images are those they get alone, without the failing neighbour
    fault.enabled = False
    for (labels, seeds), outcome in zip(REQUESTS, outcomes, strict=True):
        if FAULTY_LABEL not in labels:
            assert isinstance(outcome, list)
            alone = raw_images(list(running.stub.Generate(ask(labels, seeds), timeout=60)))
            for index, image in raw_images(outcome).items():
                assert np.isfinite(image).all()
                np.testing.assert_allclose(image, alone[index], atol=FLOAT32_BATCH_TOLERANCE, rtol=0)

    answer = running.health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    port = running.service.metrics.bound_port
    assert port is not None
    code, reason = EXPECTED[kind]
    assert metric(port, "sampler_request_failures_total", f'reason="{reason}"') == 1
    assert metric(port, "sampler_requests_total", f'code="{code}",method="Generate"') == 1
    assert metric(port, "sampler_requests_total", 'code="OK",method="Generate"') == len(REQUESTS) - 1 + 4

    # a model error is the server's problem: logged once, with its traceback and the request id;
    # NaN and out-of-memory are expected conditions and leave no traceback
    tracebacks = [r for r in caplog.records if r.exc_info]
    if kind == "raise":
        assert len(tracebacks) == 1
        assert getattr(tracebacks[0], "request_id", None) == "fault-12"
        assert "injected fault" in tracebacks[0].getMessage()
    else:
        assert tracebacks == []


def test_a_request_whose_every_sample_fails_and_one_alone(faulty: tuple[RunningServer, LabelFault]) -> None:
    """The faulty label alone (no neighbour to split from), and in one request with good labels:
    the whole request fails (a request's samples are all-or-nothing), the server carries on."""
    running, fault = faulty
    for labels in ([FAULTY_LABEL], [0, FAULTY_LABEL, 1]):
        seeds = list(range(20, 20 + len(labels)))
        error = rpc_error(lambda labels=labels, seeds=seeds: list(running.stub.Generate(ask(labels, seeds))))
        check_failure(error, fault.kind)
    events = list(running.stub.Generate(ask([0], [30])))
    assert sum(e.WhichOneof("event") == "result" for e in events) == 1
