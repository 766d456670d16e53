"""`serve-load`: the service under concurrent load against the same model sampled in process.

    python -m bench serve-load                       # clients 1, 8, 32; dpmpp_2m, 10 steps, mnist

1. Offline: the model loaded in this process, `solvers.sample` at batch B for each client count B:
   --repeats runs before the served phase and --repeats after it, median: images per second. For
   one client, an in-process batch-1 run precedes each served request (paired: the machine's
   speed drifts by more than the goals' margins between phases).
2. Served: `sampler-service serve` in a subprocess (loopback, a free port); one asyncio client
   process runs B concurrent batch-1 clients, each sending --requests GenerateUnary requests (no
   progress events) back to back: throughput (images/s), p50 / p99 latency, and the median round
   trip of an empty RPC (GetServerInfo), the transport's share.
   Also recorded: seconds from starting the server process to health SERVING (goal: 10 s on CPU).
3. Ratios: served / offline throughput at each B (goal >= 0.9 at 32 clients), lone-request
   latency / in-process batch-1 sampling time (goal <= 1.02).

Writes bench/results/serve-load.csv and .json with the provenance of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import models
import provenance
import solvers

from .arguments import options_of, positive_int
from .errors import BenchError

NAME = "serve-load"
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    "clients",
    "requests",
    "solver",
    "steps",
    "guidance",
    "offline_images_per_s",
    "served_images_per_s",
    "throughput_ratio",
    "latency_p50_s",
    "latency_p99_s",
    "offline_batch_seconds",
    "latency_ratio",
    "mean_batch_rows",
    "server_total_p50_s",
    "server_sampling_p50_s",
    "rpc_floor_p50_s",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="throughput and latency of the gRPC service vs in-process sampling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--clients", type=positive_int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=positive_int, default=16, help="requests per client")
    parser.add_argument("--repeats", type=positive_int, default=5, help="offline runs per batch size (median)")
    parser.add_argument("--max-batch-size", type=positive_int, default=256)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.set_defaults(handler=run)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _offline_once(model: models.DiffusionModel, batch: int, args: argparse.Namespace) -> float:
    """Seconds of one in-process sampling run at this batch (noise included)."""
    labels = torch.arange(batch) % 10
    began = time.perf_counter()
    noise = solvers.make_noise(list(range(batch)), model.sample_shape, device=model.device)
    denoiser = model.conditioned(labels.to(model.device), args.guidance)
    with torch.inference_mode():
        images = solvers.sample(denoiser, noise, solver=args.solver, steps=args.steps).images
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    _ = images.cpu()
    return time.perf_counter() - began


def _offline_times(model: models.DiffusionModel, batch: int, args: argparse.Namespace) -> list[float]:
    """--repeats in-process runs at this batch, after one that warms up."""
    _offline_once(model, batch, args)
    return [_offline_once(model, batch, args) for _ in range(args.repeats)]


async def _served(
    port: int, clients: int, args: argparse.Namespace, paired: Callable[[], float] | None = None
) -> tuple[float, list[float], list[int], list[tuple[float, float]], float, list[float]]:
    """B clients' requests; with `paired` (one client), an in-process run before each request."""
    import grpc

    from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
    from sampler_service.gen.sampler.v1 import sampler_pb2_grpc as pb_grpc

    latencies: list[float] = []
    rows: list[int] = []
    server_side: list[tuple[float, float]] = []  # (total, sampling) seconds as the server timed them
    offline: list[float] = []  # the paired in-process runs
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SamplerServiceStub(channel)

        async def client(k: int) -> None:
            for r in range(args.requests):
                if paired is not None:
                    offline.append(paired())
                request = pb.GenerateRequest(
                    model=args.model,
                    solver=args.solver,
                    steps=args.steps,
                    seeds=[(k + 1) * 10_000 + r],
                    labels=[(k + r) % 10],
                    guidance=[args.guidance],
                )
                began = time.perf_counter()
                response = await stub.GenerateUnary(request)
                latencies.append(time.perf_counter() - began)
                timing = response.results[0].timing
                rows.append(timing.batch_rows)
                server_side.append((timing.total_seconds, timing.sampling_seconds))

        await client(-1)  # warm-up, not counted
        # the transport's share: a round trip that does no work (GetServerInfo), same client and channel
        floor = []
        for _ in range(50):
            began = time.perf_counter()
            await stub.GetServerInfo(pb.GetServerInfoRequest())
            floor.append(time.perf_counter() - began)
        for kept in (latencies, rows, server_side, offline):
            kept.clear()
        began = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        wall = sum(latencies) if paired is not None else time.perf_counter() - began
    return wall, latencies, rows, server_side, statistics.median(floor), offline


def _wait_healthy(port: int, server: subprocess.Popen[str], timeout: float = 120.0) -> None:
    from sampler_service.client import ClientError, SamplerClient

    deadline = time.perf_counter() + timeout
    with SamplerClient(f"127.0.0.1:{port}", timeout=2.0) as client:
        while time.perf_counter() < deadline:
            if server.poll() is not None:
                raise BenchError(f"the server exited with status {server.returncode}")
            try:
                if client.health() == "SERVING":
                    return
            except ClientError:
                pass
            time.sleep(0.2)
    raise BenchError("the server did not become SERVING in time")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace) -> int:
    meta = provenance.collect(options_of(args))  # at the start: the code and tree this run executes
    try:
        model = models.class_conditional(models.load(args.model, device=args.device))
    except models.ModelError as error:
        raise BenchError(str(error)) from None
    # Offline runs at each batch before the served phase and again after it, the lone request's
    # paired with it: on a shared machine the speed drifts by more than the goals' margins.
    before = {batch: _offline_times(model, batch, args) for batch in sorted(set(args.clients) - {1})}
    device = str(model.device)
    port = _free_port()
    env = {
        **os.environ,
        "SAMPLER_PORT": str(port),
        "SAMPLER_HOST": "127.0.0.1",
        "SAMPLER_DEVICE": device,
        "SAMPLER_BATCHING__MAX_BATCH_SIZE": str(args.max_batch_size),
        "SAMPLER_BATCHING__MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
        "SAMPLER_LIMITS__MAX_QUEUED_REQUESTS": str(max(64, 2 * max(args.clients))),
    }
    if args.model != "mnist":
        raise BenchError("--model: the served side uses the default model config; only mnist is supported here")
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "sampler_service", "serve"],
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows: list[dict[str, Any]] = []
    try:
        _wait_healthy(port, server)
        seconds_to_serving = time.perf_counter() - started
        for clients in args.clients:
            if clients == 1:
                _offline_once(model, 1, args)  # warm-up
                paired = functools.partial(_offline_once, model, 1, args)
                wall, latencies, batch_rows, server_side, floor, runs = asyncio.run(_served(port, 1, args, paired))
            else:
                wall, latencies, batch_rows, server_side, floor, _ = asyncio.run(_served(port, clients, args))
                runs = before[clients] + [_offline_once(model, clients, args) for _ in range(args.repeats)]
            offline_seconds = statistics.median(runs)
            served_rate = clients * args.requests / wall
            offline_rate = clients / offline_seconds
            rows.append(
                {
                    "clients": clients,
                    "requests": clients * args.requests,
                    "solver": args.solver,
                    "steps": args.steps,
                    "guidance": args.guidance,
                    "offline_images_per_s": offline_rate,
                    "served_images_per_s": served_rate,
                    "throughput_ratio": served_rate / offline_rate,
                    "latency_p50_s": statistics.median(latencies),
                    "latency_p99_s": _percentile(latencies, 0.99),
                    "offline_batch_seconds": offline_seconds,
                    "latency_ratio": statistics.median(latencies) / offline_seconds if clients == 1 else None,
                    "mean_batch_rows": statistics.fmean(batch_rows),
                    "server_total_p50_s": statistics.median(total for total, _ in server_side),
                    "server_sampling_p50_s": statistics.median(sampling for _, sampling in server_side),
                    "rpc_floor_p50_s": floor,
                }
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    meta["device"]["torch_threads"] = torch.get_num_threads()
    meta["seconds_to_serving"] = round(seconds_to_serving, 2)  # process start to health SERVING, warm-up included
    args.out.mkdir(parents=True, exist_ok=True)
    provenance.write_csv(args.out / "serve-load.csv", rows, COLUMNS)
    provenance.write_json(args.out / "serve-load.json", meta, rows)
    for row in rows:
        latency = f", lone latency ratio {row['latency_ratio']:.3f}" if row["latency_ratio"] is not None else ""
        print(
            f"{row['clients']:>3} clients: served {row['served_images_per_s']:.1f} img/s vs offline "
            f"{row['offline_images_per_s']:.1f} (ratio {row['throughput_ratio']:.2f}); "
            f"p50 {row['latency_p50_s']:.3f} s, "
            f"p99 {row['latency_p99_s']:.3f} s (server: {row['server_total_p50_s']:.3f} s, of which sampling "
            f"{row['server_sampling_p50_s']:.3f} s; an empty RPC {1000 * row['rpc_floor_p50_s']:.2f} ms), "
            f"mean batch rows {row['mean_batch_rows']:.1f}{latency}"
        )
    print(f"SERVING {seconds_to_serving:.1f} s after the server process started")
    return 0
