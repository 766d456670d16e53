"""The service as a Ray Serve application: `sampler.v1.SamplerService` behind Ray Serve's gRPC proxy,
one application per model, each replica running the project's own servicer and engine.

Nothing about a request is handled here: every RPC is delegated to `server.SamplerServicer` over a
`server.Service` built inside the replica (`build_service`), so validation, error codes and
google.rpc details, batching, seeds and metrics are the single server's. This module only adapts
Ray's request context to what the servicer expects and maps health to Ray's.

How a request finds its replica: the proxy routes on the `application` metadata key (the client's
`--ray` flag sends the model name; `--metadata application=NAME` does it by hand). Each
application holds one deployment, `Sampler`, whose replicas each load that one model. Batching
happens inside each replica's engine (requests that land on the same replica merge); Ray's router
spreads requests over replicas by their queue lengths (power of two choices).

Health: a replica whose model failed to load stays up but reports unhealthy (`check_health`
raises), so Ray replaces it while the other replicas and applications keep serving; its requests
get UNAVAILABLE meanwhile. `grpc.health.v1.Health/Check` works through the proxy too: with the
`application` metadata key (or a service name) it is routed to a replica of that model, which
answers as the single server does; with neither, the proxy answers for itself from Ray's own
`Healthz` (SERVING once it has routes and is not draining), so probes that cannot send metadata
(load balancers, Kubernetes) get the standard protocol.

Drain: Ray stops routing to a replica it is stopping and waits up to `graceful_shutdown_timeout_s`
for its requests in flight; `__del__` then stops the engine.

Ray is an optional dependency (`pip install "diffusion-sampler-service[ray]"`); nothing else in
the package imports this module.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.schema import ServeDeploySchema

from models.errors import ModelError

from .errors import NotReady, ServiceError
from .gen.sampler.v1 import sampler_pb2 as pb
from .gen.sampler.v1 import sampler_pb2_grpc as pb_grpc
from .interceptors import TokenInterceptor
from .json_logs import json_handler
from .server import SamplerServicer, Service, build_service, load_served
from .settings import load_settings

log = logging.getLogger("sampler_service.ray")

# What the proxy's gRPC options must list so that it serves our service (deploy/ray/serve.yaml).
SERVICER_FUNCTION = "sampler_service.ray_app.add_to_ray_proxy"
# How Ray words the error of a request whose replica died (ray.exceptions.RayActorError).
_REPLICA_DIED = ("The actor died", "The actor is dead", "actor died unexpectedly")
DEPLOYMENT_NAME = "Sampler"
# The standard health check, answered by the proxy itself when a call names no application.
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# Ray's own proxy health: OK once the proxy has routes, UNAVAILABLE while it has none or drains.
RAY_HEALTHZ = "/ray.serve.RayServeAPIService/Healthz"
BUILDER = "sampler_service.ray_app:build"  # a Serve config's import_path for our applications
# Ray settings of a head that `sampler-service ray` starts (environment variables, read by the
# processes Ray starts; a variable already set wins). Each cuts a fixed cost measured idle
# (bench/results/serve-load-ray-lean/, docs/scale-out.md#what-ray-costs-and-what-was-cut):
LEAN_ENVIRONMENT = {
    # The Serve controller's reconcile loop runs every 0.1 s by default and fetches the cluster's
    # nodes and resources from the GCS each time: 0.032 of a core in the controller and 0.016 in
    # the GCS on an idle head. Once a second: 0.012 and 0.007. Health checks
    # (health_check_period_s), autoscaling decisions (upscale_delay_s) and replica replacement
    # keep their periods; each may act up to a second later.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1",
    # Ray's log monitor (one per node) forwards new lines of the workers' log files every 0.1 s,
    # and below 1000 files it also globs the log folder for new files on each of those passes:
    # 0.006 of a core on an idle head. With 0 it looks for new files every 0.5 s (its
    # LOG_NAME_UPDATE_INTERVAL_S) and still forwards lines every 0.1 s: 0.004. A new worker's
    # file is read from its start, so no line is lost; its first lines may arrive 0.5 s later.
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    # No usage report to Ray's servers: the service makes no network calls at run time.
    "RAY_USAGE_STATS_ENABLED": "0",
}


class Aborted(Exception):
    """Raised by `RayContext.abort_with_status` and `abort`, like grpc's own abort: the status is
    already set on the context."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code


class RayContext:
    """The part of `grpc.aio.ServicerContext` the servicer uses, over Ray Serve's request context.

    Ray's proxy copies code, details and trailing metadata from this context onto the real call
    (with each streamed message, and at the end of a unary call), so the google.rpc details that
    `abort_with_status` packs into `grpc-status-details-bin` reach the client as from the server.
    """

    def __init__(self, ray_context: RayServegRPCContext) -> None:
        self.ray_context = ray_context

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.ray_context.invocation_metadata())

    def time_remaining(self) -> float | None:
        """Ray's context does not carry the client's deadline (the proxy enforces request_timeout_s)."""
        return None

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        """What grpc's health servicer calls for an unknown service (NOT_FOUND)."""
        self.ray_context.set_code(code)
        self.ray_context.set_details(details)
        raise Aborted(code, details)

    async def abort_with_status(self, status: grpc.Status) -> NoReturn:
        self.ray_context.set_code(status.code)
        self.ray_context.set_details(status.details)
        # Ray keeps its request_id entry and appends ours.
        self.ray_context.set_trailing_metadata(list(status.trailing_metadata or ()))
        raise Aborted(status.code, status.details)


def add_to_ray_proxy(servicer: Any, server: Any) -> None:
    """Register `sampler.v1.SamplerService` and `grpc.health.v1.Health` on Ray Serve's gRPC proxy
    (`grpc_servicer_functions`).

    The generated `add_*_to_server` functions do the registering; around them, each of the proxy's
    method handlers is wrapped so that a request whose replica died (killed, node lost) ends
    UNAVAILABLE, as the single server's clients expect of a server that went away and as retry
    policies key on, instead of the INTERNAL that Ray's proxy (2.60) answers for it; and a health
    check that names no application is answered by the proxy itself (`_proxy_answers_health`).
    Where a Ray version has no `service_handler_factory` on its proxy server, registration is plain
    (health checks then need the `application` metadata).
    """
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        log.warning("Ray's gRPC proxy has no service_handler_factory: a dead replica's requests end INTERNAL")
        pb_grpc.add_SamplerServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        return

    def wrapped(service_method: str, streaming_type: Any) -> Callable[..., Any]:
        handler = _replica_death_is_unavailable(factory(service_method=service_method, streaming_type=streaming_type))
        if service_method == HEALTH_CHECK and getattr(streaming_type, "name", "") == "UNARY_UNARY":
            return _proxy_answers_health(handler, factory(service_method=RAY_HEALTHZ, streaming_type=streaming_type))
        return handler

    server.service_handler_factory = wrapped
    try:
        pb_grpc.add_SamplerServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    finally:
        server.service_handler_factory = factory


def _proxy_answers_health(routed: Callable[..., Any], healthz: Callable[..., Any]) -> Callable[..., Any]:
    """`Health/Check` with neither `application` metadata nor a service name: the proxy's own
    health (Ray's Healthz: OK -> SERVING, else NOT_SERVING). Otherwise routed to the application,
    whose replica answers; where no replica can (Ray answers UNAVAILABLE: the application failed
    to deploy, or its replica is being replaced), NOT_SERVING, as the single server says before
    its models are ready. An unknown application stays NOT_FOUND, as an unknown service does."""

    async def check(request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> Any:
        if request.service or any(key == "application" for key, _ in context.invocation_metadata() or ()):
            answer = await routed(request, context)
            if context.code() != grpc.StatusCode.UNAVAILABLE:
                return answer
        else:
            await healthz(request, context)
            if context.code() in (None, grpc.StatusCode.OK):
                return _health_answer(context, health_pb2.HealthCheckResponse.SERVING)
        return _health_answer(context, health_pb2.HealthCheckResponse.NOT_SERVING)

    return check


def _health_answer(context: grpc.aio.ServicerContext, status: Any) -> bytes:
    context.set_code(grpc.StatusCode.OK)
    context.set_details("")
    # The proxy's handlers send serialized bytes (Ray removes the response serializer).
    return health_pb2.HealthCheckResponse(status=status).SerializeToString()


def _replica_death_is_unavailable(handler: Callable[..., Any]) -> Callable[..., Any]:
    def relabel(context: grpc.aio.ServicerContext) -> None:
        details = context.details() or ""
        if isinstance(details, bytes):
            details = details.decode(errors="replace")
        if context.code() == grpc.StatusCode.INTERNAL and any(text in details for text in _REPLICA_DIED):
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(f"the replica serving this request stopped: {details.splitlines()[0]}")

    if inspect.isasyncgenfunction(handler):

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for message in handler(request, context):
                yield message
            relabel(context)

        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        response = await handler(request, context)
        relabel(context)
        return response

    return unary


class ReplicaOptions(BaseModel):
    """The arguments of one application (`args:` in deploy/ray/serve.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field("mnist", description="the model this application serves (a name in the models config)")
    settings: Path | None = Field(None, description="the service's TOML settings file (models_config, limits, ...)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="settings that win over the file")
    torch_threads: int = Field(1, ge=1, le=1024, description="intra-op threads per replica (match num_cpus)")


@serve.deployment(name=DEPLOYMENT_NAME, max_ongoing_requests=64, health_check_period_s=2.0)
class SamplerDeployment:
    """One replica: the project's servicer and engine for one model."""

    async def __init__(self, options: ReplicaOptions) -> None:  # type: ignore[misc]  # Ray awaits it
        _log_as_the_server_does()
        torch.set_num_threads(options.torch_threads)
        self.options = options
        self.failure: str | None = None
        settings = load_settings(options.settings, **options.overrides)
        try:
            served = load_served(settings, names=[options.model])
        except ModelError as error:
            # The replica stays up and unhealthy (check_health), so Ray replaces it; the
            # application and its other replicas keep serving.
            self.failure = f"model {options.model!r} failed to load: {error}"
            log.error(self.failure)
            served = {}
        self.service: Service = await build_service(settings, served)
        self.servicer = SamplerServicer(self.service)
        # Ray's proxy takes no interceptors: the replica checks the bearer token itself.
        token = settings.token()
        self.auth = TokenInterceptor(token) if token is not None else None
        await self.service.start()

    async def check_health(self) -> None:
        """Ray calls this every `health_check_period_s`; raising marks the replica unhealthy.
        A coroutine, so that Ray runs it on the replica's event loop: a plain method would be
        handed to a worker thread each time."""
        if self.failure is not None:
            raise RuntimeError(self.failure)

    async def _unary(
        self,
        method: Callable[[Any, Any], Awaitable[Any]],
        request: Any,
        grpc_context: RayServegRPCContext,
        empty: type[Any],
    ) -> Any:
        if self.failure is not None:
            await _refuse(grpc_context, NotReady(self.failure))
            return empty()
        refused = self._unauthenticated(grpc_context)
        if refused is not None:
            await _refuse(grpc_context, refused)
            return empty()
        try:
            return await method(request, RayContext(grpc_context))
        except Aborted:
            # The status is on the context; Ray's proxy sends it instead of this message.
            return empty()

    def _unauthenticated(self, grpc_context: RayServegRPCContext) -> ServiceError | None:
        return self.auth.check(grpc_context.invocation_metadata()) if self.auth is not None else None

    async def Plan(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> pb.PlanResponse:
        return await self._unary(self.servicer.Plan, request, grpc_context, pb.PlanResponse)

    async def GenerateUnary(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> pb.GenerateResponse:
        return await self._unary(self.servicer.GenerateUnary, request, grpc_context, pb.GenerateResponse)

    async def ListModels(
        self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext
    ) -> pb.ListModelsResponse:
        return await self._unary(self.servicer.ListModels, request, grpc_context, pb.ListModelsResponse)

    async def ListSolvers(
        self, request: pb.ListSolversRequest, grpc_context: RayServegRPCContext
    ) -> pb.ListSolversResponse:
        return await self._unary(self.servicer.ListSolvers, request, grpc_context, pb.ListSolversResponse)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, grpc_context: RayServegRPCContext) -> pb.ServerInfo:
        return await self._unary(self.servicer.GetServerInfo, request, grpc_context, pb.ServerInfo)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        """`grpc.health.v1.Health/Check` routed to this replica: the single server's answer (no
        token needed, as there); NOT_SERVING for everything while the model failed to load."""
        if self.failure is not None:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            return await self.service.health.Check(request, RayContext(grpc_context))
        except Aborted:
            return health_pb2.HealthCheckResponse()

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """Not served through Ray: a stream per watcher would hold one of the replica's
        max_ongoing_requests slots for as long as the watcher lives. Poll Check instead."""
        grpc_context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        grpc_context.set_details("Health/Watch is not served through Ray Serve's proxy: poll Health/Check")
        yield health_pb2.HealthCheckResponse()  # Ray sends a status only together with a message

    async def Generate(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        refused = NotReady(self.failure) if self.failure is not None else self._unauthenticated(grpc_context)
        if refused is not None:
            await _refuse(grpc_context, refused)
            yield pb.GenerateEvent()
            return
        try:
            async for event in self.servicer.Generate(request, RayContext(grpc_context)):
                yield event
        except Aborted:
            # Ray's proxy copies the status set on the context onto the call only when a message
            # passes (an exception raised from a stream arrives as INTERNAL in Ray 2.60: the
            # wrapper it makes of it does not deserialize). So a failed stream ends with one
            # empty event, then the same status and details as the single server; SamplerClient
            # skips the empty event.
            yield pb.GenerateEvent()

    async def __del__(self) -> None:
        """Ray has waited for the requests in flight (graceful_shutdown_timeout_s); stop the engine."""
        await self.service.drain()
        await self.service.engine.stop()


def _log_as_the_server_does() -> None:
    """The service's loggers (`sampler_service.*`: a line per request with its id, method, status
    and seconds; model loading; errors) as JSON records at INFO on the replica's stderr, which Ray
    keeps in the worker's log file and forwards to the driver. Without this Python's default
    (WARNING and up, plain text) would drop the request log, the only one once Ray's access log is
    off (deploy/ray/serve.yaml). Ray's own loggers keep Ray's format."""
    service_log = logging.getLogger("sampler_service")
    if not service_log.handlers:
        service_log.addHandler(json_handler())
        service_log.setLevel(logging.INFO)
        service_log.propagate = False  # not again through Ray's handlers on the root logger


async def _refuse(grpc_context: RayServegRPCContext, error: ServiceError) -> None:
    """Set the error's status (code, message, google.rpc details) on the context, as the server's abort does."""
    with contextlib.suppress(Aborted):
        await RayContext(grpc_context).abort_with_status(rpc_status.to_status(error.to_status()))


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder named by `import_path: sampler_service.ray_app:build` in a Serve config."""
    options = ReplicaOptions.model_validate(args)
    return SamplerDeployment.bind(options)  # type: ignore[attr-defined]  # a serve.Deployment once decorated


# ---- starting it: `sampler-service ray --config deploy/ray/serve.yaml` ------------------------


def lean_environment() -> dict[str, str]:
    """Set `LEAN_ENVIRONMENT` in this process's environment where not set already, before Ray
    starts a local head (its GCS, raylet and workers inherit it); return what is in effect.
    Joining a running cluster, set the variables where its head starts (deploy/k8s/rayservice.yaml)."""
    import os

    for key, value in LEAN_ENVIRONMENT.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in LEAN_ENVIRONMENT}


def read_config(path: Path, *, grpc_port: int | None = None, replicas: int | None = None) -> ServeDeploySchema:
    """A Serve config file, validated; relative `settings` and `overrides.models_config` paths in an
    application's args are resolved against the file's folder (as the models config does for its
    sources), so the config works from any working directory.

    Args:
        grpc_port: replaces grpc_options.port (0 is not allowed by Ray: pick a free port).
        replicas: a fixed replica count for every deployment instead of its autoscaling.

    Raises:
        FileNotFoundError, ValueError (pydantic.ValidationError): naming the file or the field.
    """
    import yaml

    path = Path(path)
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a Ray Serve config (a mapping with applications:)")
    for application in document.get("applications") or []:
        args = application.get("args") or {}
        if args.get("settings"):
            args["settings"] = str((path.parent / args["settings"]).resolve())
        overrides = args.get("overrides") or {}
        if overrides.get("models_config"):
            overrides["models_config"] = str((path.parent / overrides["models_config"]).resolve())
        if replicas is not None:
            for deployment in application.get("deployments") or []:
                deployment.pop("autoscaling_config", None)
                deployment["num_replicas"] = replicas
    if grpc_port is not None:
        document.setdefault("grpc_options", {})["port"] = grpc_port
    config = ServeDeploySchema.model_validate(document)
    for application in config.applications:
        if application.import_path == BUILDER:
            try:
                ReplicaOptions.model_validate(application.args)
            except ValidationError as error:
                raise ValueError(f"{path}: application {application.name!r}: {error}") from None
    functions = config.grpc_options.grpc_servicer_functions
    if SERVICER_FUNCTION not in functions:
        raise ValueError(f"{path}: grpc_options.grpc_servicer_functions={functions} must list {SERVICER_FUNCTION}")
    return config


def deploy(config: ServeDeploySchema, *, timeout: float = 300.0) -> None:
    """Start Serve on the connected Ray cluster with the config's proxy options and deploy its
    applications (what `serve run CONFIG` does); return once every application is RUNNING.

    Raises:
        RuntimeError: an application failed to deploy or was not running within `timeout` seconds.
    """
    import time

    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        proxy_location=config.proxy_location,
        global_logging_config=config.logging_config,
    )
    client.deploy_apps(config)
    names = [application.name for application in config.applications]
    deadline = time.monotonic() + timeout
    while True:
        statuses = serve.status().applications
        states = {name: statuses[name].status if name in statuses else "NOT_STARTED" for name in names}
        if all(state == "RUNNING" for state in states.values()):
            return
        failed = {name: statuses[name].message for name, state in states.items() if state == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"applications failed to deploy: {failed}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"applications not running after {timeout:.0f} s: {states}")
        time.sleep(0.5)


def drain(config: ServeDeploySchema) -> None:
    """Delete the config's applications, each replica first finishing its requests in flight
    (within its graceful_shutdown_timeout_s), then stop Serve. `serve.shutdown()` alone stops the
    proxies at once, cutting the streams they carry."""
    for application in config.applications:
        serve.delete(application.name, _blocking=True)
    serve.shutdown()


__all__ = [
    "DEPLOYMENT_NAME",
    "HEALTH_CHECK",
    "LEAN_ENVIRONMENT",
    "SERVICER_FUNCTION",
    "RayContext",
    "ReplicaOptions",
    "SamplerDeployment",
    "add_to_ray_proxy",
    "build",
    "deploy",
    "drain",
    "lean_environment",
    "read_config",
]
