"""The gRPC server: `create_server(settings) -> (server, port)` builds and binds everything;
`Service.start()` loads and warms the models and flips health to SERVING.

Servicer methods are thin: resolve the request id, validate into a Job (jobs.py), hand it to the
engine, map events to messages. Every call's outcome is handled in one place (`Call`): a
ServiceError becomes its status with google.rpc details, anything unexpected is logged with the
request id and becomes INTERNAL for that request only; each call is counted by method and code and
logged once. Auth and request decoding happen before a method runs (interceptors.py).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import models
import solvers
from models.config import ModelEntry, ModelsConfig, ModelsConfigError, load_models, read_models_config
from solvers.amed import PredictorStore
from solvers.errors import shorten

from .engine import Engine, Ticket
from .errors import Internal, InvalidRequest, NotReady, ServiceError, Violation
from .gen.sampler.v1 import sampler_pb2 as pb
from .gen.sampler.v1 import sampler_pb2_grpc as pb_grpc
from .interceptors import DecodingInterceptor, TokenInterceptor, abort
from .jobs import Job, ServedModel, build_job, check_request_id, reachable_shown, require_predictor
from .metrics import Metrics
from .settings import Settings

log = logging.getLogger("sampler_service")

API_VERSION = "sampler.v1"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SamplerService"].full_name
# Full method path -> the metrics label of every method this server answers.
SERVED_METHODS = {
    f"/{service.full_name}/{method.name}": method.name
    for service in (pb.DESCRIPTOR.services_by_name["SamplerService"], health_pb2.DESCRIPTOR.services_by_name["Health"])
    for method in service.methods
}
DRAINING = "the server is shutting down: send new requests to another replica or retry later"
DESCRIPTIONS = {name: builtin.description for name, builtin in models.BUILTINS.items()}


def max_message_bytes(settings: Settings, served: dict[str, ServedModel]) -> int:
    """Fits the largest response: every sample as raw float32, plus per-sample overhead (sigmas,
    timing) and a margin."""
    limits = settings.limits
    largest = 0
    for s in served.values():
        if isinstance(s.model, models.TextToImageModel):
            largest = max(largest, 3 * limits.max_image_pixels)  # RGB at the largest size (also the init image)
        else:
            largest = max(largest, int(torch.Size(s.model.sample_shape).numel()))
    per_sample = largest * 4 + 16 * (limits.max_steps + 1) + 1024
    # gRPC's limit is a signed 32-bit length; a request larger than that must be split by the client.
    return min(2**31 - 1, max(4 * 2**20, limits.max_samples_per_request * per_sample + 2**20))


def max_request_bytes(settings: Settings, served: dict[str, ServedModel]) -> int:
    """Fits the largest valid request: prompts and negative prompts at their longest (4 bytes a
    character in UTF-8 at most) and, for text-to-image models, an init PNG of the largest size
    (incompressible pixels plus a margin). A larger request cannot be valid, so it is refused by
    gRPC before it is read; one just under it gets INVALID_ARGUMENT naming the field."""
    limits = settings.limits
    if not any(isinstance(s.model, models.TextToImageModel) for s in served.values()):
        return max_message_bytes(settings, served)
    prompts = 2 * limits.max_samples_per_request * limits.max_prompt_chars * 4
    image = int(3 * limits.max_image_pixels * 1.01) + 2**16
    return min(max_message_bytes(settings, served), prompts + image + 2**20)


class StartupError(Exception):
    """The server cannot start: `setting` names the setting to fix, `cause` says why."""

    def __init__(self, setting: str, cause: str) -> None:
        self.setting = setting
        self.cause = cause
        super().__init__(f"{setting}: {cause}")


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
        if isinstance(model, models.TextToImageModel):
            # The default size: other sizes and the text encoders' batch shapes warm on first use.
            denoiser = model.conditioned([""] * samples, None, 2.0)
            x = torch.zeros(samples, *model.sample_shape, device=model.device)
            model.decode(denoiser(x, torch.full((samples,), model.sigma_max, device=model.device))[:1])
            return
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
                    raise InvalidRequest([Violation("request_id", "1..128 printable ASCII characters, no spaces")])
                return checked
        return uuid.uuid4().hex

    def _job(self, request: pb.GenerateRequest, request_id: str) -> Job:
        if self.service.draining:
            raise NotReady(DRAINING)
        served = self.service.served
        if request.model in served and not served[request.model].ready:
            raise NotReady(f"model {shorten(request.model)!r} is still loading")
        return build_job(request, served, self.service.settings.limits, request_id)

    async def Plan(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        call = Call("Plan", context, self.service.metrics)
        async with call:
            call.request_id = self._request_id(request, context)
            return self._job(request, call.request_id).plan.to_proto()
        return pb.PlanResponse()  # not reached: Call aborts the call on an error

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        metrics = self.service.metrics
        call = Call("Generate", context, metrics)
        ticket: Ticket | None = None
        try:
            async with call:
                call.request_id = self._request_id(request, context)
                job = self._job(request, call.request_id)
                require_predictor(job)
                ticket = self.service.engine.submit(job)
                yield pb.GenerateEvent(accepted=job.plan.to_proto(), request_id=job.request_id)
                async for event in ticket.events():
                    if isinstance(event, pb.Progress):
                        yield pb.GenerateEvent(progress=event, request_id=job.request_id)
                    else:
                        metrics.sample(event)
                        yield pb.GenerateEvent(result=event, request_id=job.request_id)
        finally:
            if ticket is not None:
                self.service.engine.release(ticket, cancelled=call.code != grpc.StatusCode.OK or not ticket.finished)

    async def GenerateUnary(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        call = Call("GenerateUnary", context, self.service.metrics)
        async with call:
            call.request_id = self._request_id(request, context)
            job = self._job(request, call.request_id)
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
        return pb.GenerateResponse()  # not reached: Call aborts the call on an error

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async with Call("ListModels", context, self.service.metrics):
            return self._list_models()
        return pb.ListModelsResponse()  # not reached: Call aborts the call on an error

    def _list_models(self) -> pb.ListModelsResponse:
        infos = []
        for served in self.service.served.values():
            model = served.model
            text_model = isinstance(model, models.TextToImageModel)
            channels = 3 if text_model else model.sample_shape[0]
            height, width = model.default_size
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
                    kind=pb.MODEL_KIND_TEXT_TO_IMAGE if text_model else pb.MODEL_KIND_CLASS_CONDITIONAL,
                    latent_shape=list(model.sample_shape),
                    size_multiple=model.size_multiple if isinstance(model, models.TextToImageModel) else 0,
                    max_prompt_tokens=model.prompts.max_tokens if isinstance(model, models.TextToImageModel) else 0,
                    pipeline_class=model.pipeline_class if isinstance(model, models.TextToImageModel) else "",
                    guidance_distilled=isinstance(model, models.TextToImageModel) and model.guidance_distilled,
                )
            )
        return pb.ListModelsResponse(models=infos)

    async def ListSolvers(
        self, request: pb.ListSolversRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSolversResponse:
        async with Call("ListSolvers", context, self.service.metrics):
            return self._list_solvers()
        return pb.ListSolversResponse()  # not reached: Call aborts the call on an error

    def _list_solvers(self) -> pb.ListSolversResponse:
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
        async with Call("GetServerInfo", context, self.service.metrics):
            return self._server_info()
        return pb.ServerInfo()  # not reached: Call aborts the call on an error

    def _server_info(self) -> pb.ServerInfo:
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
            max_prompt_chars=limits.max_prompt_chars,
            min_image_side=limits.min_image_side,
            max_image_side=limits.max_image_side,
            max_image_pixels=limits.max_image_pixels,
            batching_mode=batching.mode,
        )


def _version() -> str:
    try:
        return importlib.metadata.version("diffusion-sampler-service")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Call:
    """One RPC's outcome, recorded once: `async with Call(...)` around a method's work maps a
    ServiceError to its status, anything else to INTERNAL (logged with its traceback: a bug), a
    cancellation to CANCELLED or DEADLINE_EXCEEDED; then counts the call by method and code and
    writes one log line with the request id the client sent."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, metrics: Metrics) -> None:
        self.method = method
        self.context = context
        self.metrics = metrics
        self.request_id: str | None = None
        self.code = grpc.StatusCode.OK
        self.began = time.perf_counter()

    async def __aenter__(self) -> Call:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: Any) -> bool:
        try:
            if isinstance(error, ServiceError):
                self.code = error.code
                await abort(self.context, error)
            elif isinstance(error, asyncio.CancelledError | GeneratorExit):
                remaining = self.context.time_remaining()
                expired = remaining is not None and remaining <= 0
                self.code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                self.metrics.cancelled()
            elif isinstance(error, Exception):
                self.code = grpc.StatusCode.INTERNAL
                log.error(
                    "%s failed: %s",
                    self.method,
                    shorten(f"{type(error).__name__}: {error}", 200),
                    exc_info=error,
                    extra={"request_id": self.request_id, "method": self.method, "code": self.code.name},
                )
                await abort(self.context, Internal(self.request_id))
            return False
        finally:
            seconds = time.perf_counter() - self.began
            self.metrics.request(self.method, self.code, seconds)
            log.info(
                "%s %s in %.3f s",
                self.method,
                self.code.name,
                seconds,
                extra={"request_id": self.request_id, "method": self.method, "code": self.code.name},
            )


def load_served(settings: Settings, names: Collection[str] | None = None) -> dict[str, ServedModel]:
    """The models of the settings' models config (default: the built-in mnist); only those in
    `names` when given (a Ray Serve replica loads just its own model).

    Raises:
        ModelError: no model loaded, or a name in `names` is not in the config.
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
    cache = models.PromptCache(settings.prompt_cache_size)
    failures: list[ModelsConfigError] = []
    loaded = load_models(config, prompt_cache=cache, size_limits=settings.limits.size_limits(), failures=failures)
    # A model whose files are refused (pickle-only, corrupt, an unsupported pipeline) is left out and
    # named in the log; the others are served. With none left there is nothing to serve.
    for failure in failures:
        log.error("not serving a model: %s", failure)
    if not loaded:
        raise failures[0]
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
    token = _read_token(settings)
    tls = _read_tls(settings)
    if served is None:
        served = load_served(settings)
    limit = max_message_bytes(settings, served)
    metrics = Metrics(settings.metrics_port, settings.metrics_host)

    def refused(code: grpc.StatusCode) -> Callable[[str], None]:
        """Counts a call refused before its method ran; any name not served is "unknown" (bounded labels)."""

        def count(method: str) -> None:
            metrics.request(SERVED_METHODS.get(method, "unknown"), code, 0.0)

        return count

    interceptors: list[grpc.aio.ServerInterceptor] = []
    if token is not None:
        interceptors.append(TokenInterceptor(token, refused(grpc.StatusCode.UNAUTHENTICATED)))
    interceptors.append(DecodingInterceptor(refused(grpc.StatusCode.INVALID_ARGUMENT)))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", min(limit, max_request_bytes(settings, served))),
            ("grpc.max_concurrent_streams", settings.limits.max_concurrent_streams),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second server sharing it
        ],
    )
    service = await build_service(settings, served, metrics)
    pb_grpc.add_SamplerServiceServicer_to_server(SamplerServicer(service), server)
    health_pb2_grpc.add_HealthServicer_to_server(service.health, server)
    if settings.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{settings.host}:{settings.port}"
    _check_port(settings.host, settings.port)
    try:
        if tls is not None:
            port = server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc says only "Failed to bind"; the certificate was checked above
        raise StartupError(
            "port", f"cannot listen on {address}: the port is in use or the address is not local"
        ) from None
    try:
        metrics.start()
    except OSError as error:
        where = f"{settings.metrics_host}:{settings.metrics_port}"
        raise StartupError("metrics_port", f"cannot serve metrics on {where}: {error.strerror or error}") from None
    await server.start()
    return server, port, service


async def build_service(settings: Settings, served: dict[str, ServedModel], metrics: Metrics | None = None) -> Service:
    """The state behind a servicer: engine, metrics, health (NOT_SERVING until `start()`). The
    gRPC server and each Ray Serve replica (ray_app.py) build theirs here."""
    if metrics is None:
        metrics = Metrics(settings.metrics_port, settings.metrics_host)
    health_servicer = health.aio.HealthServicer()
    for name in [*served, SERVICE_NAME, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    engine = Engine(settings, served)
    engine.on_batch = metrics.batch
    engine.on_failure = metrics.failed
    metrics.queue_depth.set_function(lambda: engine.admitted)
    return Service(settings, served, engine, health_servicer, metrics)


def _check_port(host: str, port: int) -> None:
    """StartupError with the system's reason when `host:port` cannot be bound (grpc itself would
    print a plain-text line and raise a bare "Failed to bind")."""
    if port == 0:
        return
    try:
        found = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise StartupError("host", f"cannot resolve {host!r}: {error.strerror}") from None
    family, kind, protocol, _name, address = found[0]
    with socket.socket(family, kind, protocol) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is no obstacle
        try:
            probe.bind(address)
        except OSError as error:
            raise StartupError("port", f"cannot listen on {host}:{port}: {error.strerror}") from None


def _read_token(settings: Settings) -> str | None:
    try:
        return settings.token()
    except OSError as error:
        raise StartupError("auth_token_file", f"cannot read {settings.auth_token_file}: {error.strerror}") from None


def _read_tls(settings: Settings) -> tuple[bytes, bytes] | None:
    """(key, certificate chain) PEM bytes, checked to load as a pair; None without TLS."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pems = {}
    for name, path in (("tls_key", settings.tls_key), ("tls_cert", settings.tls_cert)):
        try:
            pems[name] = path.read_bytes()
        except OSError as error:
            raise StartupError(name, f"cannot read {path}: {error.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pems["tls_cert"]:
        raise StartupError("tls_cert", f"{settings.tls_cert} is not a PEM certificate (no BEGIN CERTIFICATE block)")
    if b"PRIVATE KEY-----" not in pems["tls_key"]:
        raise StartupError("tls_key", f"{settings.tls_key} is not a PEM private key (no PRIVATE KEY block)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:  # what grpc would report as "Failed to bind": a broken PEM or a key that does not match
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        raise StartupError(
            "tls_cert/tls_key", f"{settings.tls_cert} and {settings.tls_key} do not load as a pair: {reason}"
        ) from None
    return pems["tls_key"], pems["tls_cert"]


async def shutdown(server: grpc.aio.Server, service: Service, grace: float) -> None:
    """Drain, then stop. At once health turns NOT_SERVING and new work is refused with UNAVAILABLE
    and a message, while the listener stays open so clients see why; requests in flight get up to
    `grace` seconds to finish; then the server stops (whatever is left is cancelled)."""
    await service.drain()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while service.engine.admitted > 0 and loop.time() < deadline:
        await asyncio.sleep(0.02)
    await server.stop(max(0.0, deadline - loop.time()))
    await service.engine.stop()
    service.metrics.stop()


__all__ = [
    "API_VERSION",
    "SERVICE_NAME",
    "SamplerServicer",
    "Service",
    "StartupError",
    "build_service",
    "create_server",
    "load_served",
    "shutdown",
]
