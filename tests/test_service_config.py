"""Settings (precedence of flags, SAMPLER_* variables and the TOML file; named errors) and the one
mapping of domain errors to gRPC status codes with google.rpc details."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from pydantic import ValidationError

import models
import solvers
from sampler_service.errors import (
    InvalidRequest,
    NotFound,
    PredictorMissing,
    QueueFull,
    Unauthenticated,
    Violation,
    from_domain,
)
from sampler_service.settings import load_settings


def test_flags_override_environment_override_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "settings.toml"
    config.write_text('port = 6000\nhost = "0.0.0.0"\n[batching]\nmax_batch_size = 32\nmax_queue_delay_ms = 9\n')
    monkeypatch.setenv("SAMPLER_PORT", "7000")
    monkeypatch.setenv("SAMPLER_BATCHING__MAX_BATCH_SIZE", "48")
    settings = load_settings(config, port=8000)
    assert settings.port == 8000  # flag
    assert settings.batching.max_batch_size == 48  # environment
    assert settings.batching.max_queue_delay_ms == 9  # file
    assert settings.host == "0.0.0.0"  # file
    assert settings.limits.max_steps == solvers.MAX_STEPS  # default


def test_invalid_settings_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAMPLER_LIMITS__MAX_STEPS", "0")
    with pytest.raises(ValidationError, match=r"limits\.max_steps"):
        load_settings()
    monkeypatch.delenv("SAMPLER_LIMITS__MAX_STEPS")
    with pytest.raises(ValidationError, match=r"device"):
        load_settings(device="gpu")
    with pytest.raises(ValidationError, match=r"tls_cert and tls_key must be given together"):
        load_settings(tls_cert=tmp_path / "cert.pem")
    with pytest.raises(ValidationError, match=r"min_guidance=5.0 is above max_guidance=1.0"):
        load_settings(limits={"min_guidance": 5.0, "max_guidance": 1.0})
    with pytest.raises(ValidationError, match=r"Extra inputs are not permitted"):
        load_settings(colour="blue")
    with pytest.raises(FileNotFoundError, match=r"absent.toml does not exist"):
        load_settings(tmp_path / "absent.toml")


def test_token_from_file_or_value(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert load_settings(auth_token_file=token_file).token() == "from-file"
    assert load_settings(auth_token="inline").token() == "inline"
    assert "inline" not in repr(load_settings(auth_token="inline"))  # a secret is not printed
    assert load_settings().token() is None
    with pytest.raises(ValidationError, match=r"not both"):
        load_settings(auth_token="a", auth_token_file=token_file)


def _unpack(error: object, kind: type) -> object:
    status = error.to_status()  # type: ignore[attr-defined]
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):
            message = kind()
            packed.Unpack(message)
            return message
    raise AssertionError(f"no {kind.__name__} detail")


def test_domain_errors_map_to_codes_and_details() -> None:
    unknown = from_domain(solvers.UnknownSolverError("rk4", ["euler", "heun"]))
    assert isinstance(unknown, NotFound)
    assert unknown.code == grpc.StatusCode.NOT_FOUND
    info = _unpack(unknown, error_details_pb2.ResourceInfo)
    assert info.resource_name == "rk4"  # type: ignore[attr-defined]
    assert "euler, heun" in info.description  # type: ignore[attr-defined]

    invalid = from_domain(solvers.InvalidParameterError("solver_params.order", 9, "an integer in 1..3"))
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    bad = _unpack(invalid, error_details_pb2.BadRequest)
    assert bad.field_violations[0].field == "solver_params.order"  # type: ignore[attr-defined]
    assert "9 is invalid: expected an integer in 1..3" in bad.field_violations[0].description  # type: ignore[attr-defined]

    missing = from_domain(solvers.MissingPredictorError("mnist/amed/nfe5", [], "sampler-amed train --nfe 5"))
    assert isinstance(missing, PredictorMissing)
    assert missing.code == grpc.StatusCode.FAILED_PRECONDITION
    failure = _unpack(missing, error_details_pb2.PreconditionFailure)
    assert "sampler-amed train --nfe 5" in failure.violations[0].description  # type: ignore[attr-defined]
    error_info = _unpack(missing, error_details_pb2.ErrorInfo)
    assert error_info.metadata["train_command"] == "sampler-amed train --nfe 5"  # type: ignore[attr-defined]

    conditioning = from_domain(models.InvalidConditioningError("labels", 12, "labels in 0..10"))
    assert conditioning.code == grpc.StatusCode.INVALID_ARGUMENT

    full = QueueFull(64, 1.5)
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry = _unpack(full, error_details_pb2.RetryInfo)
    assert retry.retry_delay.seconds == 1  # type: ignore[attr-defined]
    assert retry.retry_delay.nanos == 500_000_000  # type: ignore[attr-defined]
    assert Unauthenticated("no token").code == grpc.StatusCode.UNAUTHENTICATED
    many = InvalidRequest([Violation("steps", "too many"), Violation("labels[2]", "out of range")])
    assert str(many) == "steps: too many; labels[2]: out of range"
    with pytest.raises(TypeError, match="no status mapping for ValueError"):
        from_domain(ValueError("not ours"))
