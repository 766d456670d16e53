"""Hardening regressions (issue 13): every bad input is a clear error with a bounded message, metrics
and logs tell the truth, malformed bytes and unknown methods are answered cleanly. A real server on
127.0.0.1 (port 0) with the shipped mnist model, called over a real channel."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
from tests.test_service import RunningServer, details, raw_images, request, rpc_error


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    running = RunningServer(batching={"max_batch_size": 64, "max_queue_delay_ms": 5.0}, warmup=False)
    yield running
    running.stop()


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    packed = struct_pb2.Struct()
    packed.update(values)
    return packed


def invalid(server: RunningServer, ask: pb.GenerateRequest) -> dict[str, str]:
    """Plan, Generate and GenerateUnary all refuse `ask` with INVALID_ARGUMENT; field -> description."""
    found: dict[str, str] = {}
    for call in (server.stub.Plan, lambda r: list(server.stub.Generate(r)), server.stub.GenerateUnary):
        error = rpc_error(lambda call=call: call(ask))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        (bad,) = details(error)
        found = {v.field: v.description for v in bad.field_violations}
    return found


# -- 1, 2: every parameter has a range; Plan refuses what sampling cannot run -----------------------


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [
        ({"schedule_params": {"rho": 0.001}}, "schedule_params.rho", "is out of range: expected 0.01..100"),
        ({"schedule": "time_uniform", "schedule_params": {"rho": 1e-9}}, "schedule_params.rho", "0.01..100"),
        ({"solver": "dpm_solver_2", "solver_params": {"r": 1e-300}}, "solver_params.r", "expected 0.01..1"),
        (
            {"solver_params": {"thresholding": True, "threshold_max": 1e39}},
            "solver_params.threshold_max",
            "1e+39 is out of range: expected 1..65504",
        ),
        ({"solver": "deis", "solver_params": {"beta_d": 1, "beta_min": -1e6}}, "solver_params.beta_min", "-1000..1000"),
        # inside both ranges, but VP time cannot resolve sigma_min = 0.002 next to beta_min = -1000
        (
            {"solver": "deis", "solver_params": {"beta_d": 1, "beta_min": -1000}},
            "solver_params.beta_min",
            "VP schedule",
        ),
        ({"solver": "deis", "solver_params": {"beta_d": 1}}, "solver_params", "together"),
        ({"solver": "unipc", "solver_params": {"order": 9}}, "solver_params.order", "expected an integer in 1..3"),
    ],
)
def test_parameters_out_of_their_range_are_invalid_arguments(
    server: RunningServer, fields: dict[str, Any], field: str, text: str
) -> None:
    ask = request(**{k: struct(v) if k.endswith("_params") else v for k, v in fields.items()})
    found = invalid(server, ask)
    assert text in found[field], found


@pytest.mark.parametrize(
    ("name", "values", "field"),
    [
        ("solver_params", {"r": math.nan}, "solver_params.r"),
        ("solver_params", {"r": math.inf}, "solver_params.r"),
        ("schedule_params", {"sigmas": [80.0, -math.inf, 1.0]}, "schedule_params.sigmas[1]"),
        ("schedule_params", {"nested": {"deeper": math.nan}}, "schedule_params.nested.deeper"),
    ],
)
def test_nan_and_infinity_in_params_are_named(server: RunningServer, name: str, values: Any, field: str) -> None:
    found = invalid(server, request(solver="dpm_solver_2", **{name: struct(values)}))
    assert "finite" in found[field]


@pytest.mark.parametrize(
    ("fields", "solver_params", "schedule_params"),
    [
        ({"solver": "euler"}, {}, {"rho": 0.01}),
        ({"solver": "euler", "schedule": "time_uniform"}, {}, {"rho": 0.01}),
        ({"solver": "euler"}, {}, {"rho": 100}),
        ({"solver": "dpm_solver_2"}, {"r": 0.01}, {}),
        ({"solver": "dpm_solver_2"}, {"r": 1}, {}),
        ({"solver": "dpmpp_2m"}, {"thresholding": True, "threshold_max": 65504, "threshold_ratio": 1}, {}),
        ({"solver": "dpmpp_3m"}, {"thresholding": True, "threshold_ratio": 0}, {}),
        ({"solver": "deis"}, {"beta_d": 1000, "beta_min": -1000}, {}),
        ({"solver": "deis"}, {"beta_d": 0.01, "beta_min": 1000}, {}),
    ],
)
def test_values_at_the_ends_of_the_ranges_sample(
    server: RunningServer, fields: dict[str, Any], solver_params: dict[str, Any], schedule_params: dict[str, Any]
) -> None:
    ask = request(
        steps=4,
        seeds=[1],
        labels=[2],
        output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32,
        solver_params=struct(solver_params),
        schedule_params=struct(schedule_params),
        **fields,
    )
    server.stub.Plan(ask)
    (image,) = raw_images(list(server.stub.Generate(ask))).values()
    assert np.isfinite(image).all()


# -- 3: bounded echoes, bounded lists ------------------------------------------------------------------


def test_a_huge_model_name_is_not_found_with_a_short_quote(server: RunningServer) -> None:
    error = rpc_error(lambda: server.stub.Plan(request(model="m" * 10_000)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert len(error.details()) < 200
    (info,) = details(error)
    assert info.resource_name == "m" * 64 + "…"
    for kind in ("solver", "schedule"):
        error = rpc_error(lambda kind=kind: server.stub.Plan(request(**{kind: "x" * 10_000})))
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()


def test_long_lists_and_strings_in_params_give_short_invalid_arguments(server: RunningServer) -> None:
    rising = [0.01 + k * 0.01 for k in range(1001)]  # the right length for 1000 steps, but not decreasing
    cases = [
        (request(steps=1000, schedule="custom", schedule_params=struct({"sigmas": rising})), "schedule_params.sigmas"),
        (request(schedule="custom", schedule_params=struct({"sigmas": [1.0] * 5000})), "schedule_params.sigmas"),
        (request(solver="unipc", solver_params=struct({"variant": "y" * 20_000})), "solver_params.variant"),
        (request(solver_params=struct({"k" * 5000: 1})), "solver_params." + "k" * 50),
    ]
    for ask, field in cases:
        error = rpc_error(lambda ask=ask: server.stub.Plan(ask))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()[:200]
        assert len(error.details()) < 1000
        (bad,) = details(error)
        assert bad.field_violations[0].field.startswith(field)


@pytest.mark.parametrize("field", ["seeds", "labels", "guidance"])
def test_list_fields_longer_than_a_request_are_named(server: RunningServer, field: str) -> None:
    values: Any = [1.0] * 100_000 if field == "guidance" else [1] * 100_000
    found = invalid(server, request(**{field: values}))
    assert found[field] == "100000 values is too many: expected at most 64"


def test_many_bad_labels_report_a_few() -> None:
    from sampler_service.errors import MESSAGE_BUDGET, InvalidRequest, Violation

    error = InvalidRequest([Violation(f"labels[{k}]", "x" * 1000) for k in range(1000)])
    assert len(error.message) < MESSAGE_BUDGET + 100
    assert error.message.endswith("more")


# -- 4: metrics and logs tell the truth ----------------------------------------------------------------


def scrape(running: RunningServer) -> str:
    import urllib.request

    port = running.service.metrics.bound_port
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_failures_are_counted_and_logged_with_their_code_and_request_id(caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_service import long_request, wait_until

    running = RunningServer(metrics_port=0, warmup=False)
    try:
        with caplog.at_level("INFO", logger="sampler_service"):
            rpc_error(lambda: running.stub.Plan(request(steps=5000)))
            rpc_error(lambda: list(running.stub.Generate(request(steps=5000, request_id="client-7"))))
            running.stub.ListModels(pb.ListModelsRequest())
            running.stub.ListSolvers(pb.ListSolversRequest())
            running.stub.GetServerInfo(pb.GetServerInfoRequest())
            error = rpc_error(lambda: running.stub.GenerateUnary(long_request(), timeout=0.5))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            expected = (
                'sampler_requests_total{code="INVALID_ARGUMENT",method="Plan"} 1.0',
                'sampler_requests_total{code="INVALID_ARGUMENT",method="Generate"} 1.0',
                'sampler_requests_total{code="OK",method="ListModels"} 1.0',
                'sampler_requests_total{code="OK",method="ListSolvers"} 1.0',
                'sampler_requests_total{code="OK",method="GetServerInfo"} 1.0',
                'sampler_requests_total{code="DEADLINE_EXCEEDED",method="GenerateUnary"} 1.0',
                "sampler_cancellations_total 1.0",
            )
            text = ""

            def counted() -> bool:  # the status reaches the client just before the handler records it
                nonlocal text
                text = scrape(running)
                return all(line in text for line in expected)

            wait_until(counted, timeout=20)
        assert 'code="OK",method="Plan"' not in text
        assert 'code="OK",method="Generate"' not in text
        lines = [(r.getMessage(), getattr(r, "request_id", None)) for r in caplog.records]
        assert any(m.startswith("Generate INVALID_ARGUMENT") and rid == "client-7" for m, rid in lines), lines
        assert any(m.startswith("Plan INVALID_ARGUMENT") for m, _ in lines), lines
        assert not [r for r in caplog.records if r.exc_info], "a user's mistake left a traceback"
    finally:
        running.stop()


# -- 5, 6: malformed bytes, unknown methods, auth ------------------------------------------------------

METHODS = [
    ("/sampler.v1.SamplerService/Plan", False),
    ("/sampler.v1.SamplerService/GenerateUnary", False),
    ("/sampler.v1.SamplerService/Generate", True),
    ("/sampler.v1.SamplerService/ListModels", False),
    ("/sampler.v1.SamplerService/ListSolvers", False),
    ("/sampler.v1.SamplerService/GetServerInfo", False),
    ("/grpc.health.v1.Health/Check", False),
    ("/grpc.health.v1.Health/Watch", True),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "both"),
]
GARBAGE = [b"\xff\xff\xff\xff\x0f", b"\x0a\x05mni", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]


def raw_call(channel: grpc.Channel, method: str, streaming: Any, data: bytes, **kwargs: Any) -> grpc.RpcError:
    """`streaming`: False (unary), True (server streaming) or "both" (bidirectional)."""
    identity = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    if streaming == "both":
        return rpc_error(lambda: list(channel.stream_stream(method, **identity)(iter([data]), timeout=10, **kwargs)))
    if streaming:
        return rpc_error(lambda: list(channel.unary_stream(method, **identity)(data, timeout=10, **kwargs)))
    return rpc_error(lambda: channel.unary_unary(method, **identity)(data, timeout=10, **kwargs))


def test_malformed_bytes_are_invalid_arguments_with_one_log_line(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO"):
        for method, streaming in METHODS:
            for data in GARBAGE:
                error = raw_call(server.channel, method, streaming, data)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
                assert "not a valid" in error.details()
    reports = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(reports) <= 1, [r.getMessage() for r in reports]
    assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
    assert server.stub.Plan(request()).nfe == 4  # the server goes on


def test_unknown_methods_with_and_without_auth(caplog: pytest.LogCaptureFixture) -> None:
    from tests.test_service import wait_until

    running = RunningServer(auth_token="s3cret-token", metrics_port=0, warmup=False)
    good = (("authorization", "Bearer s3cret-token"),)
    try:
        with caplog.at_level("INFO"):
            for streaming in (False, True):
                error = raw_call(running.channel, "/sampler.v1.SamplerService/Nope", streaming, b"")
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
                error = raw_call(running.channel, "/sampler.v1.SamplerService/Nope", streaming, b"", metadata=good)
                assert error.code() == grpc.StatusCode.UNIMPLEMENTED, error.details()
            error = raw_call(running.channel, "/sampler.v1.SamplerService/Plan", False, GARBAGE[0])
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # nothing is read before auth
            error = raw_call(running.channel, "/sampler.v1.SamplerService/Plan", False, GARBAGE[0], metadata=good)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert not [r for r in caplog.records if r.exc_info or r.levelname == "ERROR"]
        counted = (  # refused before any method ran, still counted; unknown names under one label
            'sampler_requests_total{code="UNAUTHENTICATED",method="unknown"} 2.0',
            'sampler_requests_total{code="UNAUTHENTICATED",method="Plan"} 1.0',
            'sampler_requests_total{code="INVALID_ARGUMENT",method="Plan"} 1.0',
        )
        wait_until(lambda: all(line in scrape(running) for line in counted), timeout=10)
    finally:
        running.stop()


def test_a_bug_is_internal_for_that_request_only(server: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception in a method (here: a model list that cannot be read) is INTERNAL
    with the request's id, logged with its traceback; the next call is fine."""
    served = server.service.served
    server.service.served = None  # type: ignore[assignment]
    try:
        with caplog.at_level("INFO"):
            error = rpc_error(lambda: server.stub.Plan(request(request_id="bug-1")))
    finally:
        server.service.served = served
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "bug-1" in error.details()
    (failure,) = [r for r in caplog.records if r.exc_info]
    assert getattr(failure, "request_id", None) == "bug-1"
    assert server.stub.Plan(request()).nfe == 4


# -- 11: the client command line -----------------------------------------------------------------------


def test_client_flags_after_the_command_defaults_shown_errors_once(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from sampler_service import client

    target = f"127.0.0.1:{server.port}"
    assert client.main(["server-info", "--target", target, "--timeout", "30"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["minGuidance"] == 0.0  # proto3 JSON drops zeros and false unless asked
    assert info["authRequired"] is False
    assert client.main(["list-models", "--target", target]) == 0
    (model,) = json.loads(capsys.readouterr().out)
    assert model["ready"] is True
    assert client.main(["plan", "--solver", "heun", "--nfe", "9", "--target", target]) == 2
    err = capsys.readouterr().err
    assert err.count("is not reachable") == 1, err
    assert client.main(["--target", target, "plan", "--solver", "euler", "--steps", "2", "--seeds", "5,5"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe"] == 2
    with pytest.raises(SystemExit):
        client.main(["--help"])
    usage = capsys.readouterr().out
    for name in ("list-models", "list-solvers", "server-info"):
        line = next(line for line in usage.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 1, f"{name} has no help text"


def test_client_output_into_a_closed_pipe_stops_without_a_traceback(server: RunningServer) -> None:
    """`sampler-client list-solvers | head -1`: the reader leaves early; the client stops quietly."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "sampler_service.client", "list-solvers", "--target", f"127.0.0.1:{server.port}"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        process.stdout.close()  # gone before the answer arrives: every write meets a broken pipe
        error = process.stderr.read().decode()
        process.wait(60)
    assert "Traceback" not in error, error
    assert "BrokenPipeError" not in error, error
