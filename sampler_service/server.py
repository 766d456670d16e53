"""The gRPC server: `create_server(settings) -> (server, port)` builds and binds everything;
`Service.start()` loads and warms the models and flips health to SERVING.

Servicer methods are thin: resolve the request id, validate into a Job (jobs.py), hand it to the
engine, map events to messages. Every ServiceError becomes a status with google.rpc details in one
place (`_abort`); anything unexpected is logged with the request id and becomes INTERNAL for that
request only.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

import models
import solvers
from models.config import ModelEntry, ModelsConfig, ModelsConfigError, load_models, read_models_config
from solvers.amed import PredictorStore

from .engine import Engine, Ticket
from .errors import NotReady, ServiceError, Unauthenticated
from .gen.sampler.v1 import sampler_pb2 as pb
from .gen.sampler.v1 import sampler_pb2_grpc as pb_grpc
from .jobs import Job, ServedModel, build_job, check_request_id, reachable_shown, require_predictor
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("sampler_service")

API_VERSION = "sampler.v1"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SamplerService"].full_name
# Health and reflection answer without a token: probes and grpcurl discovery need them.
OPEN_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
DESCRIPTIONS = {name: builtin.description for name, builtin in models.BUILTINS.items()}


def max_message_bytes(settings: Settings, served: dict[str, ServedModel]) -> int:
    """Fits the largest response: every sample as raw float32, plus per-sample overhead (sigmas,
    timing) and a margin."""
    largest = max((int(torch.Size(s.model.sample_shape).numel()) for s in served.values()), default=0)
    per_sample = largest * 4 + 16 * (settings.limits.max_steps + 1) + 1024
    return max(4 * 2**20, settings.limits.max_samples_per_request * per_sample + 2**20)


@dataclass
class Service:
    """The state behind the servicer: settings, models, engine, health."""

    settings: Settings
    served: dict[str, ServedModel]
    engine: Engine
    health: health.aio.HealthServicer
    metrics: Metrics
    draining: bool = False

    async def start(self) -> None:
        """Warm every model (the largest batch shape), then report SERVING."""
        self.engine.start()
        loop = asyncio.get_running_loop()
        for name, served in self.served.items():
            if self.settings.warmup:
                await loop.run_in_executor(self.engine.executors[name], _warm, served, self.settings)
            served.ready = True
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def drain(self) -> None:
        self.draining = True
        for name in [*self.served, SERVICE_NAME, ""]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def _warm(served: ServedModel, settings: Settings) -> None:
    """One forward at the largest batch the engine will form (guided, so both halves)."""
    model = served.model
    rows = settings.batching.max_batch_size
    samples = max(1, rows // 2)
    with torch.inference_mode():
        if model.null_class is not None:
            labels = torch.zeros(samples, dtype=torch.int64)
            denoiser = model.conditioned(labels, 2.0)
        else:
            samples = rows
            denoiser = model.conditioned()
        x = torch.zeros(samples, *model.sample_shape, device=model.device)
        denoiser(x, torch.full((samples,), model.sigma_max, device=model.device))


class SamplerServicer(pb_grpc.SamplerServiceServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    def _request_id(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata() or ())
        for candidate in (request.request_id, str(metadata.get("x-request-id", ""))):
            if candidate:
                checked = check_request_id(candidate)
                if checked is None:
                    from .errors import InvalidRequest, Violation

                    raise InvalidRequest([Violation("request_id", "1..128 printable ASCII characters, no spaces")])
                return checked
        return uuid.uuid4().hex

    def _job(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> Job:
        if self.service.draining:
            raise NotReady("the server is shutting down")
        request_id = self._request_id(request, context)
        served = self.service.served
        if request.model in served and not served[request.model].ready:
            raise NotReady(f"model {request.model!r} is still loading")
        return build_job(request, served, self.service.settings.limits, request_id)

    async def Plan(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        return await _guard(context, "Plan", self.service.metrics, self._plan(request, context))

    async def _plan(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        return self._job(request, context).plan.to_proto()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        metrics = self.service.metrics
        began = time.perf_counter()
        code = grpc.StatusCode.OK
        ticket: Ticket | None = None
        try:
            job = self._job(request, context)
            require_predictor(job)
            ticket = self.service.engine.submit(job)
            yield pb.GenerateEvent(accepted=job.plan.to_proto(), request_id=job.request_id)
            async for event in ticket.events():
                if isinstance(event, pb.Progress):
                    yield pb.GenerateEvent(progress=event, request_id=job.request_id)
                else:
                    metrics.sample(event)
                    yield pb.GenerateEvent(result=event, request_id=job.request_id)
        except ServiceError as error:
            code = error.code
            await _abort(context, error)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            metrics.cancelled()
            raise
        finally:
            if ticket is not None:
                self.service.engine.release(ticket, cancelled=code != grpc.StatusCode.OK or not ticket.finished)
            seconds = time.perf_counter() - began
            metrics.request("Generate", code, seconds)
            log.info(
                "Generate %s in %.3f s",
                code.name,
                seconds,
                extra={
                    "request_id": ticket.job.request_id if ticket else None,
                    "method": "Generate",
                    "code": code.name,
                },
            )

    async def GenerateUnary(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        return await _guard(context, "GenerateUnary", self.service.metrics, self._unary(request, context))

    async def _unary(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        job = self._job(request, context)
        require_predictor(job)
        ticket = self.service.engine.submit(job, progress=False)
        results = []
        try:
            async for event in ticket.events():
                if isinstance(event, pb.SampleResult):
                    self.service.metrics.sample(event)
                    results.append(event)
        finally:
            self.service.engine.release(ticket, cancelled=not ticket.finished)
        return pb.GenerateResponse(results=results, plan=job.plan.to_proto(), request_id=job.request_id)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        infos = []
        for served in self.service.served.values():
            model = served.model
            channels, height, width = model.sample_shape
            infos.append(
                pb.ModelInfo(
                    name=served.name,
                    description=served.description,
                    ready=served.ready,
                    channels=channels,
                    height=height,
                    width=width,
                    num_labels=served.num_labels,
                    label_names=served.label_names(),
                    null_class=model.null_class if model.null_class is not None else -1,
                    sigma_min=model.sigma_min,
                    sigma_max=model.sigma_max,
                    prediction_type=model.prediction_type,
                    device=str(model.device),
                    dtype=str(model.dtype).removeprefix("torch."),
                    fingerprint=model.fingerprint,
                )
            )
        return pb.ListModelsResponse(models=infos)

    async def ListSolvers(
        self, request: pb.ListSolversRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSolversResponse:
        import json

        max_steps = self.service.settings.limits.max_steps
        infos = []
        for spec in solvers.list_solvers():
            params = spec.params()
            infos.append(
                pb.SolverInfo(
                    name=spec.name,
                    description=spec.description,
                    order=spec.order,
                    parameter_schema_json=json.dumps(spec.parameter_schema(), sort_keys=True),
                    evals_per_step=spec.evals_per_step,
                    min_steps=spec.min_steps_of(params),
                    reachable_nfe=reachable_shown(spec, False, params, max_steps),
                    reachable_nfe_afs=reachable_shown(spec, True, params, max_steps),
                    needs_predictor=spec.needs_predictor,
                    predictors=self._predictors_of(spec.name) if spec.needs_predictor else [],
                )
            )
        return pb.ListSolversResponse(solvers=infos)

    def _predictors_of(self, solver: str) -> list[pb.PredictorAvailability]:
        found = []
        for served in self.service.served.values():
            keys = [k for k in served.predictors.keys(served.model.fingerprint) if k.solver == solver]
            if keys:
                found.append(
                    pb.PredictorAvailability(
                        model=served.name, nfe=sorted({k.nfe for k in keys}), keys=[k.describe() for k in keys]
                    )
                )
        return found

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        settings = self.service.settings
        limits, batching = settings.limits, settings.batching
        return pb.ServerInfo(
            api_version=API_VERSION,
            server_version=_version(),
            max_samples_per_request=limits.max_samples_per_request,
            max_steps=limits.max_steps,
            min_guidance=limits.min_guidance,
            max_guidance=limits.max_guidance,
            max_message_bytes=max_message_bytes(settings, self.service.served),
            max_batch_size=batching.max_batch_size,
            max_queue_delay_ms=batching.max_queue_delay_ms,
            max_queued_requests=limits.max_queued_requests,
            auth_required=settings.token() is not None,
        )


def _version() -> str:
    try:
        return importlib.metadata.version("diffusion-sampler-service")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    await context.abort_with_status(rpc_status.to_status(error.to_status()))


async def _guard(context: grpc.aio.ServicerContext, method: str, metrics: Metrics, work: Awaitable[Any]) -> Any:
    """Run a unary method's work; ServiceErrors become their status, the rest INTERNAL."""
    began = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        return await work
    except ServiceError as error:
        code = error.code
        await _abort(context, error)
    except asyncio.CancelledError:
        code = grpc.StatusCode.CANCELLED
        raise
    finally:
        metrics.request(method, code, time.perf_counter() - began)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token auth: `authorization: Bearer <token>` metadata, compared in constant time."""

    def __init__(self, token: str) -> None:
        self.expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        error = self.check(details.invocation_metadata or ())
        if error is None:
            return await continuation(details)
        handler = await continuation(details)
        return _rejecting(handler, error)

    def check(self, metadata: Iterable[tuple[str, str | bytes]]) -> Unauthenticated | None:
        """None when the call's metadata carries the token (Ray Serve replicas call this too)."""
        given = dict(metadata).get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self.expected):
            return None
        return Unauthenticated("missing bearer token" if not given else "wrong bearer token")


def _rejecting(handler: grpc.RpcMethodHandler, error: ServiceError) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _abort(context, error)

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _abort(context, error)
        yield  # pragma: no cover - makes this an async generator

    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)


def load_served(settings: Settings, names: Collection[str] | None = None) -> dict[str, ServedModel]:
    """The models of the settings' models config (default: the built-in mnist); only those in
    `names` when given (a Ray Serve replica loads just its own model).

    Raises:
        ModelError: a model failed to load, or a name in `names` is not in the config.
    """
    if settings.models_config is not None:
        config = read_models_config(settings.models_config)
    else:
        config = ModelsConfig(
            models=[ModelEntry(name="mnist", source="mnist", device=settings.device, dtype=settings.dtype)]
        )
    if names is not None:
        known = [entry.name for entry in config.models]
        missing = sorted(set(names) - set(known))
        if missing:
            raise ModelsConfigError(f"model {missing[0]!r} is not in the models config: expected one of {known}")
        config = ModelsConfig(models=[entry for entry in config.models if entry.name in names])
    loaded = load_models(config)
    served = {}
    for name, model in loaded.items():
        folders = [*settings.predictor_dirs, models.loading.find_files(model.source).root / "amed"]  # yours win
        store = PredictorStore([folder for folder in folders if folder.is_dir()])
        store.preload(model.device)
        for problem in store.problems:
            log.warning("skipping an AMED predictor: %s", problem)
        description = DESCRIPTIONS.get(model.source, f"diffusers model from {model.source}")
        served[name] = ServedModel(name, model, description, predictors=store)
    return served


async def create_server(
    settings: Settings, served: dict[str, ServedModel] | None = None
) -> tuple[grpc.aio.Server, int, Service]:
    """Build, bind and start the server (models loaded; health NOT_SERVING until `service.start()`).

    Returns:
        the server, the bound port, and the Service (call `await service.start()` to warm up and
        report SERVING; `create_and_start` does both).
    """
    if served is None:
        served = load_served(settings)
    limit = max_message_bytes(settings, served)
    token = settings.token()
    interceptors = [TokenInterceptor(token)] if token is not None else []
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_concurrent_streams", settings.limits.max_concurrent_streams),
        ],
    )
    service = await build_service(settings, served)
    pb_grpc.add_SamplerServiceServicer_to_server(SamplerServicer(service), server)
    health_pb2_grpc.add_HealthServicer_to_server(service.health, server)
    if settings.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = grpc.ssl_server_credentials([(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())])
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    service.metrics.start()
    return server, port, service


async def build_service(settings: Settings, served: dict[str, ServedModel]) -> Service:
    """The state behind a servicer: engine, metrics, health (NOT_SERVING until `start()`). The
    gRPC server and each Ray Serve replica (ray_app.py) build theirs here."""
    health_servicer = health.aio.HealthServicer()
    for name in [*served, SERVICE_NAME, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    metrics = Metrics(settings.metrics_port, settings.metrics_host)
    engine = Engine(settings, served)
    engine.on_batch = metrics.batch
    metrics.queue_depth.set_function(lambda: engine.admitted)
    return Service(settings, served, engine, health_servicer, metrics)


async def shutdown(server: grpc.aio.Server, service: Service, grace: float) -> None:
    """Stop accepting, let in-flight requests finish within `grace` seconds, then stop."""
    await service.drain()
    await server.stop(grace)
    await service.engine.stop()
    service.metrics.stop()


__all__ = [
    "API_VERSION",
    "SERVICE_NAME",
    "SamplerServicer",
    "Service",
    "TokenInterceptor",
    "build_service",
    "create_server",
    "load_served",
    "shutdown",
]
