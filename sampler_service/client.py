"""The Python client of the sampling service, and the `sampler-client` command line.

    from sampler_service.client import SamplerClient
    with SamplerClient("127.0.0.1:50051") as client:
        for event in client.generate(model="mnist", solver="dpmpp_2m", steps=20, labels=[3], seeds=[0]):
            ...

    sampler-client generate --model mnist --solver dpmpp_2m --steps 20 --labels 0,1,2 --seed 0 --out out/
    sampler-client plan --model mnist --solver heun --nfe 10
    sampler-client list-models | list-solvers | health
    sampler-client --target HOST:9000 --ray generate --model mnist ...   # through Ray Serve's gRPC proxy

Errors come back as `ClientError` with the status code, the message and the google.rpc details
(field violations, retry delay, the command that trains a missing predictor).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from .arguments import int_list
from .gen.sampler.v1 import sampler_pb2 as pb
from .gen.sampler.v1 import sampler_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass
class ClientError(Exception):
    """A failed call: status code name, message, and the decoded google.rpc details."""

    code: str
    message: str
    details: list[Any] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.code}: {self.message}"]
        for detail in self.details:
            if isinstance(detail, error_details_pb2.BadRequest):
                lines += [f"  {v.field}: {v.description}" for v in detail.field_violations]
            elif isinstance(detail, error_details_pb2.RetryInfo):
                lines.append(f"  retry after {detail.retry_delay.ToTimedelta().total_seconds():g} s")
            elif isinstance(detail, error_details_pb2.PreconditionFailure):
                lines += [f"  {v.subject}: {v.description}" for v in detail.violations]
        return "\n".join(lines)


_DETAIL_TYPES = (
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.ErrorInfo,
    error_details_pb2.PreconditionFailure,
)


def _client_error(error: grpc.RpcError) -> ClientError:
    found: list[Any] = []
    status = rpc_status.from_call(error)
    if status is not None:
        for packed in status.details:
            for kind in _DETAIL_TYPES:
                if packed.Is(kind.DESCRIPTOR):
                    message = kind()
                    packed.Unpack(message)
                    found.append(message)
    code = error.code()
    return ClientError(code.name if code is not None else "UNKNOWN", error.details() or "", found)


def build_request(
    *,
    model: str,
    solver: str,
    steps: int | None = None,
    nfe: int | None = None,
    schedule: str = "",
    solver_params: dict[str, Any] | None = None,
    schedule_params: dict[str, Any] | None = None,
    afs: bool = False,
    num_samples: int = 0,
    seeds: Sequence[int] = (),
    base_seed: int | None = None,
    labels: Sequence[int] = (),
    guidance: Sequence[float] = (),
    output_format: str = "png",
    request_id: str = "",
    preview_every: int = 0,
) -> pb.GenerateRequest:
    """A GenerateRequest from plain values (exactly one of steps / nfe)."""
    request = pb.GenerateRequest(
        model=model,
        solver=solver,
        schedule=schedule,
        afs=afs,
        num_samples=num_samples,
        seeds=list(seeds),
        labels=list(labels),
        guidance=list(guidance),
        request_id=request_id,
        preview_every=preview_every,
        output_format=pb.OUTPUT_FORMAT_RAW_FLOAT32 if output_format == "raw" else pb.OUTPUT_FORMAT_PNG,
    )
    if steps is not None:
        request.steps = steps
    if nfe is not None:
        request.nfe = nfe
    if base_seed is not None:
        request.base_seed = base_seed
    for name, values in (("solver_params", solver_params), ("schedule_params", schedule_params)):
        if values:
            struct = struct_pb2.Struct()
            struct.update(values)
            getattr(request, name).CopyFrom(struct)
    return request


class SamplerClient:
    """A blocking client over one channel (TLS when `root_certificates` or `tls` is given)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
    ) -> None:
        """`metadata` goes with every call, e.g. (("application", "mnist"),) for Ray Serve's
        gRPC proxy, which routes on it (docs/scale-out.md)."""
        options = [("grpc.max_receive_message_length", 256 * 2**20)]
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.stub = pb_grpc.SamplerServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = ((("authorization", f"Bearer {token}"),) if token else ()) + tuple(metadata)
        self.timeout = timeout

    def __enter__(self) -> SamplerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, metadata=self.metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            raise _client_error(error) from None

    def generate(self, request: pb.GenerateRequest | None = None, **fields: Any) -> Iterator[pb.GenerateEvent]:
        """The event stream of one request (build it from keywords, see build_request)."""
        request = request if request is not None else build_request(**fields)
        try:
            for event in self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout):
                # Behind Ray Serve's proxy a failed stream sends one empty event before its status
                # (sampler_service/ray_app.py); it carries nothing.
                if event.WhichOneof("event") is not None:
                    yield event
        except grpc.RpcError as error:
            raise _client_error(error) from None

    def generate_unary(self, request: pb.GenerateRequest | None = None, **fields: Any) -> pb.GenerateResponse:
        return self._call(self.stub.GenerateUnary, request if request is not None else build_request(**fields))

    def plan(self, request: pb.GenerateRequest | None = None, **fields: Any) -> pb.PlanResponse:
        return self._call(self.stub.Plan, request if request is not None else build_request(**fields))

    def list_models(self) -> list[pb.ModelInfo]:
        return list(self._call(self.stub.ListModels, pb.ListModelsRequest()).models)

    def list_solvers(self) -> list[pb.SolverInfo]:
        return list(self._call(self.stub.ListSolvers, pb.ListSolversRequest()).solvers)

    def server_info(self) -> pb.ServerInfo:
        return self._call(self.stub.GetServerInfo, pb.GetServerInfoRequest())

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        answer = self._call(self.health_stub.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


# ---- the command line ----------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _metadata_pair(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    # gRPC metadata keys are lower case; "-bin" keys would need bytes values.
    if key.strip().lower() != key.strip() or key.strip().endswith("-bin"):
        raise argparse.ArgumentTypeError(f"metadata key {key!r}: expected lower case, not ending in -bin")
    return key.strip(), value


def _request_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--solver", required=True)
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int)
    budget.add_argument("--nfe", type=int)
    parser.add_argument("--schedule", default="")
    parser.add_argument("--solver-params", type=_json_object, default=None, help='JSON, e.g. \'{"variant": "bh2"}\'')
    parser.add_argument("--schedule-params", type=_json_object, default=None)
    parser.add_argument("--afs", action="store_true")
    parser.add_argument("--num-samples", type=int, default=0)
    parser.add_argument("--labels", type=int_list, default=[], help="comma-separated, one per sample or one for all")
    parser.add_argument("--seeds", type=int_list, default=[], help="comma-separated, one per sample")
    parser.add_argument("--seed", type=int, default=None, help="base seed: samples use seed, seed + 1, ...")
    parser.add_argument("--guidance", type=_floats, default=[], help="one for all, or one per sample")
    parser.add_argument("--request-id", default="")


def _request_from(args: argparse.Namespace) -> pb.GenerateRequest:
    return build_request(
        model=args.model,
        solver=args.solver,
        steps=args.steps,
        nfe=args.nfe,
        schedule=args.schedule,
        solver_params=args.solver_params,
        schedule_params=args.schedule_params,
        afs=args.afs,
        num_samples=args.num_samples,
        seeds=args.seeds,
        base_seed=args.seed,
        labels=args.labels,
        guidance=args.guidance,
        output_format=getattr(args, "format", "png"),
        request_id=args.request_id,
    )


def _generate(client: SamplerClient, args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results: list[pb.SampleResult] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        transient=False,
        disable=args.quiet,
    ) as progress:
        task = progress.add_task("sampling", total=None)
        for event in client.generate(_request_from(args)):
            kind = event.WhichOneof("event")
            if kind == "accepted":
                plan = event.accepted
                progress.update(
                    task, total=plan.steps, description=f"{plan.solver} · {plan.nfe} NFE · {plan.num_samples} samples"
                )
            elif kind == "progress":
                progress.update(task, completed=event.progress.step)
            elif kind == "result":
                results.append(event.result)
    paths = []
    for result in results:
        suffix = "png" if result.image.format == pb.OUTPUT_FORMAT_PNG else "f32"
        path = out / f"sample-{result.index:03d}-seed{result.seed}.{suffix}"
        path.write_bytes(result.image.data)
        paths.append(path)
    if results and results[0].image.format == pb.OUTPUT_FORMAT_PNG:
        _grid(results, out / "grid.png")
    summary = [
        {
            "index": r.index,
            "seed": r.seed,
            "label": r.label,
            "nfe": r.nfe,
            "network_evals": r.network_evals,
            "seconds": round(r.timing.total_seconds, 3),
            "file": str(p),
        }
        for r, p in zip(results, paths, strict=True)
    ]
    print(json.dumps(summary, indent=1))
    return 0


def _grid(results: list[pb.SampleResult], path: Path) -> None:
    import io

    from PIL import Image

    images = [Image.open(io.BytesIO(r.image.data)) for r in results]
    columns = min(10, len(images))
    rows = (len(images) + columns - 1) // columns
    width, height = images[0].size
    grid = Image.new(images[0].mode, (columns * width, rows * height))
    for k, image in enumerate(images):
        grid.paste(image, ((k % columns) * width, (k // columns) * height))
    grid.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sampler-client", description="Client of the sampling service.")
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"host:port (default {DEFAULT_TARGET})")
    parser.add_argument("--token", default=None, help="bearer token")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    parser.add_argument("--ca", type=Path, default=None, help="PEM file of the CA that signed the server certificate")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per call")
    parser.add_argument(
        "--metadata",
        type=_metadata_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="call metadata, repeatable (e.g. application=mnist for Ray Serve's gRPC proxy)",
    )
    parser.add_argument(
        "--ray",
        action="store_true",
        help="through Ray Serve's gRPC proxy: send application=<--model> (generate, plan); "
        "other commands take --metadata application=NAME",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate images; writes one file per sample and a grid")
    _request_args(generate)
    generate.add_argument("--format", choices=("png", "raw"), default="png")
    generate.add_argument("--out", type=Path, default=Path("samples"))
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    plan = commands.add_parser("plan", help="what a request would do and cost")
    _request_args(plan)
    commands.add_parser("list-models")
    commands.add_parser("list-solvers")
    commands.add_parser("server-info")
    health = commands.add_parser("health", help="exit 0 when SERVING")
    health.add_argument("--service", default="")
    args = parser.parse_args(argv)
    root = args.ca.read_bytes() if args.ca is not None else None
    metadata = list(args.metadata)
    if args.ray and getattr(args, "model", None) and not any(key == "application" for key, _ in metadata):
        metadata.append(("application", args.model))
    try:
        with SamplerClient(
            args.target,
            token=args.token,
            tls=args.tls,
            root_certificates=root,
            timeout=args.timeout,
            metadata=metadata,
        ) as client:
            if args.command == "generate":
                return _generate(client, args)
            if args.command == "plan":
                print(json_format.MessageToJson(client.plan(_request_from(args))))
            elif args.command == "list-models":
                print(json.dumps([json_format.MessageToDict(m) for m in client.list_models()], indent=1))
            elif args.command == "list-solvers":
                print(json.dumps([json_format.MessageToDict(s) for s in client.list_solvers()], indent=1))
            elif args.command == "server-info":
                print(json_format.MessageToJson(client.server_info()))
            elif args.command == "health":
                status = client.health(args.service)
                print(status)
                return 0 if status == "SERVING" else 1
    except ClientError as error:
        print(f"sampler-client: {error}", file=sys.stderr)
        return 1 if error.code == "UNAVAILABLE" else 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
