"""The service's errors and their one mapping to gRPC status codes with google.rpc details.

Every error the service raises on purpose is a `ServiceError` with a status code, a message and
the google.rpc detail messages that let a client act on it programmatically. Errors of the solver
core and the model layer are translated here (`from_domain`), so servicer methods never choose a
status code themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

import models
import solvers
from solvers.errors import quote, shorten

DOMAIN = "sampler.v1"
MESSAGE_BUDGET = 1500  # characters of an INVALID_ARGUMENT message (the violations kept)
DESCRIPTION_LIMIT = 240  # characters of one violation's description


@dataclass(frozen=True)
class Violation:
    """One invalid request field: its path (e.g. "labels[3]") and what was wrong and what is allowed."""

    field: str
    description: str


class ServiceError(Exception):
    """An error with its gRPC status code and google.rpc details."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.details = list(details)

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status that grpc_status.rpc_status.to_status turns into a grpc.Status."""
        packed = []
        for detail in self.details:
            wrapper = any_pb2.Any()
            wrapper.Pack(detail)
            packed.append(wrapper)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)


class InvalidRequest(ServiceError):
    """INVALID_ARGUMENT with a BadRequest listing every field violation."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[Violation]) -> None:
        # Bounded whatever the request: the message travels twice in the trailers (grpc-message and
        # the details), and gRPC refuses trailers above 8 KiB on the client side.
        self.violations: list[Violation] = []
        used = 0
        for violation in violations:
            short = Violation(shorten(violation.field), shorten(violation.description, DESCRIPTION_LIMIT))
            used += len(short.field) + len(short.description) + 2
            if self.violations and used > MESSAGE_BUDGET:
                break
            self.violations.append(short)
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        if len(violations) > len(self.violations):
            message += f"; and {len(violations) - len(self.violations)} more"
        super().__init__(message, [bad])


class NotFound(ServiceError):
    """NOT_FOUND for an unknown model, solver or schedule; ResourceInfo names it and lists the valid ones."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, kind: str, name: str, available: Sequence[str]) -> None:
        self.kind = kind
        self.name = shorten(name)  # a client's string: quoted as a short prefix only
        self.available = list(available)
        info = error_details_pb2.ResourceInfo(
            resource_type=kind, resource_name=self.name, description=f"available: {', '.join(self.available)}"
        )
        super().__init__(f"unknown {kind} {quote(name)}; available: {', '.join(self.available)}", [info])


class PredictorMissing(ServiceError):
    """FAILED_PRECONDITION: the solver needs a trained predictor this server does not have."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, key: str, available: Sequence[str], train_command: str) -> None:
        self.train_command = train_command
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="PREDICTOR_MISSING", subject=key, description=f"train it with: {train_command}"
                )
            ]
        )
        info = error_details_pb2.ErrorInfo(
            reason="PREDICTOR_MISSING",
            domain=DOMAIN,
            metadata={"key": key, "train_command": train_command, "available": "; ".join(available)},
        )
        super().__init__(f"no trained predictor for {key}; train one with: {train_command}", [failure, info])


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str) -> None:
        info = error_details_pb2.ErrorInfo(reason="UNAUTHENTICATED", domain=DOMAIN)
        super().__init__(message, [info])


class QueueFull(ServiceError):
    """RESOURCE_EXHAUSTED with RetryInfo: the admission queue is full."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, admitted: int, retry_after_seconds: float) -> None:
        seconds = int(retry_after_seconds)
        delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after_seconds - seconds) * 1e9))
        info = error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain=DOMAIN, metadata={"admitted": str(admitted)})
        super().__init__(
            f"the server is at capacity ({admitted} requests admitted); retry after {retry_after_seconds:g} s",
            [error_details_pb2.RetryInfo(retry_delay=delay), info],
        )


class NotReady(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, message: str) -> None:
        super().__init__(message)


class SampleFailed(ServiceError):
    """INTERNAL for one request whose output could not be produced (e.g. non-finite values)."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)])


class Internal(ServiceError):
    """INTERNAL for a request that hit a bug; the log has the traceback under the same request id."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, request_id: str | None) -> None:
        where = f" (request id {request_id}; the server log has the details)" if request_id else ""
        super().__init__(f"internal error{where}", [error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN)])


def from_domain(error: Exception) -> ServiceError:
    """The ServiceError of an error raised by the solver core or the model layer.

    Raises:
        TypeError: `error` is not one of theirs (a bug, reported as INTERNAL by the caller).
    """
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, solvers.UnknownNameError):
        return NotFound(error.kind, str(error.name), list(error.valid))
    if isinstance(error, solvers.UnreachableNFEError):
        near = ", ".join(str(n) for n in error.nearest) or "none"
        reason = f"{error.nfe} is not reachable by solver {error.solver!r} with afs={error.afs}; nearest: {near}"
        return InvalidRequest([Violation("nfe", reason)])
    if isinstance(error, solvers.InvalidParameterError):
        return InvalidRequest([Violation(error.field, error.describe())])
    if isinstance(error, solvers.MissingPredictorError):
        return PredictorMissing(error.key, error.available, error.train_command)
    if isinstance(error, models.InvalidConditioningError):
        return InvalidRequest(
            [Violation(error.field, f"{quote(error.value)} is not allowed: expected {error.allowed}")]
        )
    raise TypeError(f"no status mapping for {type(error).__name__}") from error


__all__ = [
    "Internal",
    "InvalidRequest",
    "NotFound",
    "NotReady",
    "PredictorMissing",
    "QueueFull",
    "SampleFailed",
    "ServiceError",
    "Unauthenticated",
    "Violation",
    "from_domain",
]
