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
