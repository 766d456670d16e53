"""What happens to a call before a servicer method runs: bearer-token auth and request decoding.

gRPC's aio server decodes a request before the method runs, and a request whose bytes do not parse
would raise inside grpc (UNKNOWN, an ERROR traceback per call: a log flood anyone can cause).
`DecodingInterceptor` wraps every method's deserializer so such bytes become INVALID_ARGUMENT,
reported in at most one log line per `report_seconds`.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from solvers.errors import shorten

from .errors import DOMAIN, ServiceError, Unauthenticated

log = logging.getLogger("sampler_service")

# Health and reflection answer without a token: probes and grpcurl discovery need them.
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


async def abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    """End the call with the error's status and google.rpc details."""
    await context.abort_with_status(rpc_status.to_status(error.to_status()))


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token auth: `authorization: Bearer <token>` metadata, compared in constant time.

    Without the right token every method but the open ones is UNAUTHENTICATED, unknown methods
    included (so the answer says nothing about which methods exist); with it, an unknown method is
    UNIMPLEMENTED as usual.
    """

    def __init__(self, token: str, on_rejected: Callable[[str], None] | None = None) -> None:
        self.expected = f"Bearer {token}".encode()
        self.on_rejected = on_rejected  # (method) for metrics; no log line: anyone can send these

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        error = self.check(details.invocation_metadata or ())
        if error is None:
            return await continuation(details)
        if self.on_rejected is not None:
            self.on_rejected(details.method)
        return rejecting(error)

    def check(self, metadata: Iterable[tuple[str, str | bytes]]) -> Unauthenticated | None:
        """None when the call's metadata carries the token, else the error to answer with (Ray
        Serve replicas call this themselves: Ray's proxy runs no interceptors)."""
        given = dict(metadata).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self.expected):
            return None
        return Unauthenticated("missing bearer token" if not given else "wrong bearer token")


def rejecting(error: ServiceError) -> grpc.RpcMethodHandler:
    """A handler that ends any call (unary or streaming, known or not) with `error`, reading nothing."""

    async def reject(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await abort(context, error)

    return grpc.stream_stream_rpc_method_handler(reject)


class MalformedRequest(ServiceError):
    """INVALID_ARGUMENT: the request bytes are not a message of the method's request type."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, method: str, problem: str) -> None:
        info = error_details_pb2.ErrorInfo(reason="MALFORMED_REQUEST", domain=DOMAIN)
        super().__init__(f"the request is not a valid {method} request message: {shorten(problem)}", [info])


class _Undecodable:
    """What the wrapped deserializer returns for bytes that do not parse (grpc passes it on)."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


class DecodingInterceptor(grpc.aio.ServerInterceptor):
    """Malformed request bytes on any method become INVALID_ARGUMENT (see the module docstring).

    `on_malformed(method)` is called for each such request (metrics); the log gets the first one
    and then at most one line per `report_seconds` with the count since the last line.
    """

    def __init__(self, on_malformed: Callable[[str], None] | None = None, report_seconds: float = 60.0) -> None:
        self.on_malformed = on_malformed
        self.report_seconds = report_seconds
        self.last_report = -math.inf
        self.unreported = 0

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return self._wrap(handler, details.method)

    def _report(self, method: str, problem: str) -> None:
        if self.on_malformed is not None:
            self.on_malformed(method)
        self.unreported += 1
        now = time.monotonic()
        if now - self.last_report >= self.report_seconds:
            log.warning(
                "malformed request bytes on %s (%s); %d such request(s) since the last report",
                method,
                shorten(problem),
                self.unreported,
            )
            self.last_report = now
            self.unreported = 0

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        parse = handler.request_deserializer
        name = method.rsplit("/", 1)[-1]

        def deserialize(data: bytes) -> Any:
            try:
                return parse(data)
            except Exception as error:  # DecodeError, or anything a parser raises on arbitrary bytes
                return _Undecodable(f"{type(error).__name__}: {error}")

        async def refuse(found: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            self._report(method, found.problem)
            await abort(context, MalformedRequest(name, found.problem))

        async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for item in requests:
                if isinstance(item, _Undecodable):
                    await refuse(item, context)
                yield item

        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
        if handler.unary_stream is not None:
            inner = handler.unary_stream
            if inspect.isasyncgenfunction(inner):

                async def unary_stream_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    if isinstance(request, _Undecodable):
                        await refuse(request, context)
                    async for item in inner(request, context):
                        yield item

                return grpc.unary_stream_rpc_method_handler(unary_stream_gen, deserialize, serialize)

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:  # writes itself
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await inner(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
        if handler.stream_unary is not None:
            inner = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                return await inner(checked(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
        inner = handler.stream_stream
        if inspect.isasyncgenfunction(inner):

            async def stream_stream_gen(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async for item in inner(checked(requests, context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream_gen, deserialize, serialize)

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            return await inner(checked(requests, context), context)

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


__all__ = ["OPEN_METHODS", "DecodingInterceptor", "MalformedRequest", "TokenInterceptor", "abort", "rejecting"]
