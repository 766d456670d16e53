"""`sampler-service serve [--host --port --config --models-config --device --dtype --metrics-port]`.

Flags override SAMPLER_* environment variables, which override the TOML settings file. Logs go to
stderr, one JSON object per line. SIGTERM / SIGINT drain: health turns NOT_SERVING, new requests
are refused, in-flight ones get `grace_seconds` to finish.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from models.errors import ModelError

from .server import create_server, shutdown
from .settings import load_settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "method", "code"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


async def serve(overrides: dict[str, object], config: Path | None) -> int:
    settings = load_settings(config, **overrides)
    log = logging.getLogger("sampler_service")
    began = time.perf_counter()
    server, port, service = await create_server(settings)
    log.info(f"listening on {settings.host}:{port}; loading done in {time.perf_counter() - began:.1f} s")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await service.start()
    log.info(
        f"SERVING {', '.join(service.served)} {time.perf_counter() - began:.1f} s after start"
        + (f"; metrics on port {service.metrics.bound_port}" if service.metrics.bound_port else "")
    )
    await stop.wait()
    log.info(f"draining for up to {settings.grace_seconds} s")
    await shutdown(server, service, settings.grace_seconds)
    log.info("stopped")
    return 0


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
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    names = ("host", "port", "models_config", "device", "dtype", "metrics_port", "reflection")
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    try:
        return asyncio.run(serve(overrides, args.config))
    except (ValidationError, FileNotFoundError, ModelError) as error:
        print(f"sampler-service: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
