"""Step-level batching (`batching.mode = "step"`) end to end: a real server on loopback with the
shipped mnist model. Requests with different solvers, steps, schedules and guidance share forwards
and each sample is the one the same request gives alone; a request joins a running batch; a short
request finishes while a long one runs; a cancelled request's rows leave."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import struct_pb2

from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from sampler_service.jobs import build_job
from sampler_service.step_batcher import StepBatcher
from sampler_service.threads import apply_threads, available_cpus, cgroup_cpu_quota, default_intra_op
from tests.test_service import RunningServer, details, raw_images, request, wait_until

RAW = pb.OUTPUT_FORMAT_RAW_FLOAT32
STEP = {"mode": "step", "max_batch_size": 64, "max_queue_delay_ms": 20.0}
# The model in float64 with float32 solver states: sharing a forward changes its float64 rounding
# only, so a sample matches its lone run to float32 precision (a misrouted row, sigma, label or
# guidance weight would be off by orders of magnitude more).
SHARED_TOLERANCE = 1e-5

MIXED = [
    request(solver="euler", steps=6, seeds=[1, 2], labels=[3, 4], guidance=[2.0], output_format=RAW),
    request(solver="heun", steps=4, seeds=[5], labels=[7], output_format=RAW),  # guidance 1: one row a sample
    request(
        solver="dpmpp_2m", steps=8, seeds=[9, 10, 11], labels=[1, 2, 3], guidance=[1.0, 4.0, 0.0], output_format=RAW
    ),
    request(solver="unipc", steps=5, afs=True, seeds=[12], labels=[0], guidance=[2.0], output_format=RAW),
    request(solver="ipndm", steps=7, schedule="logsnr", seeds=[13], labels=[8], guidance=[4.0], output_format=RAW),
]


@pytest.fixture(scope="module")
def step64() -> Iterator[RunningServer]:
    running = RunningServer(dtype="float64", batching=STEP, warmup=False)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def step_server() -> Iterator[RunningServer]:
    running = RunningServer(batching=STEP, warmup=False)
    yield running
    running.stop()


def batcher(server: RunningServer) -> StepBatcher:
    return server.service.engine.batchers["mnist"]


def test_mixed_requests_share_forwards_and_each_matches_its_lone_run(step64: RunningServer) -> None:
    alone = [raw_images(list(step64.stub.Generate(r))) for r in MIXED]
    shared_before = batcher(step64).shared_ticks
    barrier = threading.Barrier(len(MIXED))

    def together(r: pb.GenerateRequest) -> dict[int, np.ndarray]:
        barrier.wait()
        return raw_images(list(step64.stub.Generate(r, timeout=120)))

    with ThreadPoolExecutor(len(MIXED)) as pool:
        shared = list(pool.map(together, MIXED))
    assert batcher(step64).shared_ticks > shared_before, "no forward held rows of two requests"
    for lone, mixed in zip(alone, shared, strict=True):
        assert lone.keys() == mixed.keys()
        for index, image in mixed.items():
            np.testing.assert_allclose(image, lone[index], atol=SHARED_TOLERANCE, rtol=0)


def test_a_lone_request_is_the_request_mode_result(step64: RunningServer) -> None:
    """Alone, a step-mode request runs the same forwards as request mode: the same bits."""
    by_request = RunningServer(dtype="float64", batching={**STEP, "mode": "request"}, warmup=False)
    try:
        for r in (MIXED[0], MIXED[1], MIXED[4]):  # one guidance value per request: the same passes
            expected = raw_images(list(by_request.stub.Generate(r)))
            got = raw_images(list(step64.stub.Generate(r)))
            for index, image in got.items():
                np.testing.assert_array_equal(image, expected[index])
    finally:
        by_request.stop()


def test_a_request_joins_a_running_batch(step64: RunningServer) -> None:
    long = step64.stub.Generate(request(solver="heun", steps=200, seeds=[20, 21], labels=[1, 2], guidance=[2.0]))
    try:
        events = iter(long)
        while next(events).WhichOneof("event") != "progress":  # the long request is sampling
            pass
        shared_before = batcher(step64).shared_ticks
        joined = raw_images(list(step64.stub.Generate(MIXED[3], timeout=120)))
        assert batcher(step64).shared_ticks > shared_before, "the newcomer did not share the running ticks"
        assert len(batcher(step64).active) == 1, "the long request should still be running"
    finally:
        long.cancel()
    alone = raw_images(list(step64.stub.Generate(MIXED[3])))
    np.testing.assert_allclose(joined[0], alone[0], atol=SHARED_TOLERANCE, rtol=0)


def test_a_short_request_finishes_while_a_long_one_runs_and_cancelling_frees_its_rows(
    step_server: RunningServer,
) -> None:
    engine = step_server.service.engine
    # heun, 1000 steps, 16 guided samples: about 64,000 network rows, minutes on a CPU
    long = step_server.stub.Generate(
        pb.GenerateRequest(model="mnist", solver="heun", steps=1000, num_samples=16, labels=[1], guidance=[2.0])
    )
    events = iter(long)
    while next(events).WhichOneof("event") != "progress":
        pass
    # a generous bound (the tight figure is bench serve-mixed's): in request mode this one waits for the long one
    short = list(step_server.stub.Generate(request(steps=10, seeds=[3], labels=[3], guidance=[2.0]), timeout=60))
    assert sum(e.WhichOneof("event") == "result" for e in short) == 1
    assert len(batcher(step_server).active) == 1  # the long one is still sampling
    stopped = engine.batches_stopped
    long.cancel()
    wait_until(lambda: engine.admitted == 0)
    wait_until(lambda: not batcher(step_server).active and not batcher(step_server).pending)
    wait_until(lambda: engine.batches_stopped == stopped + 1)  # its thread ended at its next evaluation
    assert sum(e.WhichOneof("event") == "result" for e in step_server.stub.Generate(request(seeds=[4]))) == 1


def test_deadline_exceeded_in_step_mode_releases_the_request(step_server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(step_server.stub.Generate(request(solver="heun", steps=300), timeout=0.3))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: step_server.service.engine.admitted == 0)
    wait_until(lambda: not batcher(step_server).active)


def test_progress_and_previews_in_step_mode(step_server: RunningServer) -> None:
    events = list(step_server.stub.Generate(request(steps=4, seeds=[1, 2], labels=[1, 2], preview_every=2)))
    assert step_server.stub.GetServerInfo(pb.GetServerInfoRequest()).batching_mode == "step"
    steps = [e.progress.step for e in events if e.WhichOneof("event") == "progress"]
    assert steps[-1] == 4
    previews = [e.progress for e in events if e.WhichOneof("event") == "progress" and e.progress.previews]
    assert [p.step for p in previews] == [2, 4]
    assert all(len(p.previews) == 2 for p in previews)
    results = [e.result for e in events if e.WhichOneof("event") == "result"]
    assert [r.index for r in results] == [0, 1]
    assert results[0].timing.batch_rows >= 1


def test_threads_settings_are_applied(tmp_path: Any) -> None:
    before = torch.get_num_threads()
    try:
        applied = apply_threads(2, None)
        assert (applied.intra_op, torch.get_num_threads()) == (2, 2)
        applied = apply_threads(None, None)  # the default never raises torch's own count
        assert applied.intra_op == min(2, default_intra_op(applied.cpus))
    finally:
        torch.set_num_threads(before)
    # the host's CPUs: the affinity mask, lowered to a cgroup quota
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 1.5
    assert available_cpus(tmp_path) == min(2, available_cpus(tmp_path / "absent"))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert [default_intra_op(n) for n in (1, 2, 3, 16, 64)] == [1, 1, 1, 8, 8]


def test_tick_rows_are_shared_by_size() -> None:
    """A large evaluation takes at most as many rows as the largest other one (at least
    share_rows) while others are active; alone, at most solo_rows (a newcomer waits one such tick)."""
    from models.rows import PassRows, SampleRows
    from sampler_service.step_batcher import Evaluation

    def evaluation(owner: object, samples: int, guidance: float, posted: float) -> Evaluation:
        labels = torch.zeros(samples, dtype=torch.int64)
        rows = SampleRows(
            PassRows(samples, labels=labels),
            PassRows(samples, labels=labels + 1),
            torch.full((samples,), guidance, dtype=torch.float64),
        )
        return Evaluation(
            owner,
            posted,
            torch.zeros(samples, 1, 2, 2),
            torch.ones(samples),
            rows,
            (2, 2),
            lambda: False,
            posted=posted,
        )

    long, short = object(), object()
    tick = StepBatcher("m", None, max_batch_size=64, share_rows=4, solo_rows=1000, gather_seconds=0.0)  # type: ignore[arg-type]
    tick.pending = [evaluation(long, 64, 2.0, 0.0)]
    tick.active = {id(long)}
    (alone,) = tick._select()
    assert (alone.start, alone.stop, alone.rows) == (0, 32, 64)  # the whole budget
    tick = StepBatcher("m", None, max_batch_size=64, share_rows=4, solo_rows=16, gather_seconds=0.0)  # type: ignore[arg-type]
    tick.pending = [evaluation(long, 64, 2.0, 0.0)]
    tick.active = {id(long)}
    (alone,) = tick._select()
    assert (alone.start, alone.stop, alone.rows) == (0, 8, 16)  # solo_rows
    tick.pending = [evaluation(long, 64, 2.0, 0.0), evaluation(short, 1, 2.0, 1.0)]
    tick.active = {id(long), id(short)}
    first, second = tick._select()
    assert (first.start, first.stop, first.rows) == (0, 2, 4)  # share_rows: the short one has 2
    assert (second.start, second.stop, second.rows) == (0, 1, 2)
    first, *_ = tick._select()
    assert (first.start, first.stop) == (2, 4)  # the rest keeps its place at the front


def test_a_solver_body_that_raises_fails_its_request_only(step64: RunningServer) -> None:
    """The body itself raises (not a forward): AMED-Plugin's predictor, a real module loaded from the
    shipped file, raises at its second interval through a fault-injection hook. That request fails
    with MODEL_ERROR; the others in the same ticks get the images they get alone."""
    engine = step64.service.engine
    solver_params = struct_pb2.Struct()
    solver_params.update({"base": "ipndm", "max_order": 2})
    amed = request(solver="amed_plugin", nfe=8, solver_params=solver_params, labels=[5], seeds=[40], request_id="amed")
    job = build_job(amed, engine.served, step64.settings.limits, "amed")
    assert job.predictor is not None
    predictor = engine.served["mnist"].predictors.find(job.predictor, "mnist", device="cpu")
    calls = []

    def fault(module: Any, args: Any) -> None:
        calls.append(threading.current_thread().name)
        if len(calls) >= 2:  # after one interval: the request has shared ticks
            raise RuntimeError("injected fault in the AMED predictor")

    others = [MIXED[0], MIXED[2], MIXED[4]]
    alone = [raw_images(list(step64.stub.Generate(r))) for r in others]
    handle = predictor.register_forward_pre_hook(fault)
    try:
        # a long request is ticking first, so the five below are admitted into running ticks
        companion = step64.stub.Generate(request(solver="euler", steps=1000, seeds=[99], labels=[1]), timeout=120)
        next(iter(companion))
        ticks_before = batcher(step64).ticks
        barrier = threading.Barrier(len(others) + 1)

        def generate(r: pb.GenerateRequest) -> dict[int, np.ndarray] | grpc.RpcError:
            barrier.wait()
            try:
                return raw_images(list(step64.stub.Generate(r, timeout=120)))
            except grpc.RpcError as error:
                return error

        with ThreadPoolExecutor(len(others) + 1) as pool:
            outcomes = list(pool.map(generate, [amed, *others]))
        companion.cancel()
    finally:
        handle.remove()
    failed, *survivors = outcomes
    assert isinstance(failed, grpc.RpcError)
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert [d.reason for d in details(failed)] == ["MODEL_ERROR"]
    assert len(calls) == 2
    assert calls[1].startswith("request-amed")  # raised in the request's own thread
    assert batcher(step64).ticks > ticks_before
    wait_until(lambda: not batcher(step64).active and not batcher(step64).pending)  # no request left behind
    for lone, shared in zip(alone, survivors, strict=True):
        assert isinstance(shared, dict)
        assert lone.keys() == shared.keys()
        for index, image in shared.items():
            np.testing.assert_allclose(image, lone[index], atol=SHARED_TOLERANCE, rtol=0)
    # the server carries on: the same request succeeds without the fault
    assert sum(e.WhichOneof("event") == "result" for e in step64.stub.Generate(amed)) == 1
