"""`sampler-service serve [--host --port --config --models-config --device --dtype --metrics-port]`;
`sampler-service ray [--config deploy/ray/serve.yaml --address --num-cpus --num-gpus --grpc-port
--replicas]` runs the same service as Ray Serve applications (the [ray] extra; docs/scale-out.md).

Flags override SAMPLER_* environment variables, which override the TOML settings file. Everything
the server writes to stderr is a log record, one JSON object per line (Python warnings from torch
and numpy included). A start-up error is one record naming the setting and the cause, exit code 2.
SIGTERM / SIGINT drain: health turns NOT_SERVING and new requests get UNAVAILABLE while the port
stays open; requests in flight get `grace_seconds` to finish; then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from models.errors import ModelError

from . import IMPORTED_AT
from .json_logs import json_handler
from .settings import describe_error, load_settings
from .threads import apply_threads

log = logging.getLogger("sampler_service")


def setup_logging() -> None:
    """JSON records on stderr for everything: our loggers, grpc's and asyncio's, and Python
    warnings (torch, numpy), which would otherwise print plain lines."""
    logging.basicConfig(level=logging.INFO, handlers=[json_handler()], force=True)
    logging.captureWarnings(True)


async def serve(overrides: dict[str, object], config: Path | None) -> int:
    from .server import create_server, shutdown  # after main() has set GRPC_VERBOSITY

    settings = load_settings(config, **overrides)
    began = time.perf_counter()
    threads = apply_threads(settings.threads.intra_op, settings.threads.inter_op)  # before the models load
    server, port, service = await create_server(settings)
    log.info(f"listening on {settings.host}:{port}; loading done in {time.perf_counter() - began:.1f} s")
    log.info(
        f"torch threads: intra-op {threads.intra_op}, inter-op {threads.inter_op} ({threads.cpus} usable CPUs); "
        f"batching mode {settings.batching.mode}"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await service.start()
    log.info(
        f"SERVING {', '.join(service.served)} {time.perf_counter() - IMPORTED_AT:.1f} s after the process "
        f"started (imports included), {time.perf_counter() - began:.1f} s after the settings were read"
        + (f"; metrics on port {service.metrics.bound_port}" if service.metrics.bound_port else "")
    )
    await stop.wait()
    log.info(f"draining for up to {settings.grace_seconds} s")
    await shutdown(server, service, settings.grace_seconds)
    log.info("stopped")
    return 0


def serve_ray(args: argparse.Namespace) -> int:
    """Start (or join) a Ray cluster, deploy the Serve config, serve until SIGTERM / SIGINT, then
    drain: each replica finishes its requests in flight, then Serve and Ray stop."""
    try:
        import ray
        from ray import serve

        from . import ray_app
    except ImportError as error:
        log.error("cannot start: %s is missing: pip install 'diffusion-sampler-service[ray]'", error.name)
        return 2
    config = ray_app.read_config(args.config, grpc_port=args.grpc_port, replicas=args.replicas)
    began = time.perf_counter()
    if args.address is None:
        log.info(f"starting a local Ray head with {ray_app.lean_environment()}")
    ray.init(
        address=args.address,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        namespace="serve",
        include_dashboard=False,
    )
    try:
        ray_app.deploy(config)
        names = ", ".join(application.name for application in config.applications)
        log.info(
            f"SERVING {names} through Ray Serve's gRPC proxy on port {config.grpc_options.port} "
            f"{time.perf_counter() - began:.1f} s after start (send metadata application=<name>)"
        )
        received: list[int] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda number, _frame: received.append(number))
        while not received:
            time.sleep(0.2)
        log.info(f"{signal.Signals(received[0]).name}: draining (graceful_shutdown_timeout_s per deployment)")
        ray_app.drain(config)
    finally:
        serve.shutdown()
        ray.shutdown()
    log.info("stopped")
    return 0


def _quiet_progress_bars() -> None:
    """huggingface_hub, diffusers and transformers draw progress bars on stderr while a pipeline
    loads ("Loading weights: 52/52"): plain lines outside the JSON log. Off through their own APIs;
    transformers reads the hub's setting when it loads, so only a loaded one needs telling."""
    import diffusers.utils.logging
    import huggingface_hub.utils

    huggingface_hub.utils.disable_progress_bars()
    diffusers.utils.logging.disable_progress_bar()
    loaded = sys.modules.get("transformers.utils.logging")  # the text extra, when installed and loaded
    if loaded is not None:
        loaded.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sampler-service", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("serve", help="serve the configured models")
    run.add_argument("--config", type=Path, help="TOML settings file")
    run.add_argument("--host")
    run.add_argument("--port", type=int)
    run.add_argument("--models-config", type=Path)
    run.add_argument("--device")
    run.add_argument("--dtype")
    run.add_argument("--metrics-port", type=int)
    run.add_argument("--no-reflection", dest="reflection", action="store_false", default=None)
    on_ray = commands.add_parser("ray", help="serve through Ray Serve's gRPC proxy (a local head unless --address)")
    on_ray.add_argument("--config", type=Path, default=Path("deploy/ray/serve.yaml"), help="Ray Serve config")
    on_ray.add_argument("--address", default=None, help="join this cluster (e.g. auto) instead of starting a head")
    on_ray.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local head (default: all)")
    on_ray.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local head (default: all)")
    on_ray.add_argument("--grpc-port", type=int, default=None, help="replaces grpc_options.port")
    on_ray.add_argument("--replicas", type=int, default=None, help="a fixed replica count instead of autoscaling")
    args = parser.parse_args(argv)
    setup_logging()
    if args.command == "ray":
        try:
            return serve_ray(args)
        except (ValidationError, ValueError, FileNotFoundError, RuntimeError) as error:
            log.error("cannot start: %s", error)
            return 2
    # grpc's C core prints plain-text lines of its own, e.g. an INFO line for every failed TLS
    # handshake (anyone can cause those: a log flood outside the JSON log). It reads this once,
    # when grpc loads, so before the server module is imported: errors only, unless set otherwise.
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    _quiet_progress_bars()
    from .server import StartupError

    names = ("host", "port", "models_config", "device", "dtype", "metrics_port", "reflection")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        return asyncio.run(serve(overrides, args.config))
    except StartupError as error:
        log.error("cannot start: %s", error, extra={"setting": error.setting})
    except ValidationError as error:
        log.error("cannot start: %s", describe_error(error))
    except (FileNotFoundError, ModelError) as error:
        log.error("cannot start: %s", error)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
