"""`serve-load-ray`: the service through Ray Serve's gRPC proxy against the single server, same run,
same machine, same total CPU.

    python -m bench serve-load-ray                   # clients 1, 8, 32; dpmpp_2m, 10 steps, mnist

Both run as subprocesses on loopback: `sampler-service serve` with --cpus torch threads, and
`sampler-service ray` (deploy/ray/serve.yaml, a local head of --cpus CPUs, --cpus replicas of one
CPU and one torch thread each). A client process runs B concurrent batch-1 clients, each sending
--requests GenerateUnary requests back to back, against one target and then the other, alternating
for --rounds rounds (the shared machine's speed drifts between phases): per target and B the median
over rounds of throughput, p50 / p99 latency. With one client, single and Ray requests alternate
one by one (paired): the lone request's latency ratio is the median of Ray / single per pair
(goal <= 1.15). Throughput ratio Ray / single at 8 and 32 clients (goal >= 0.9).

Writes bench/results/serve-load-ray-cpus<N>.csv and .json with the provenance of the run (Ray's
version in meta). On a machine shared with other work, compare at --cpus 1 too: torch with several
intra-op threads stalls when its cores are busy elsewhere (one process with 2 threads), replicas of
one thread do not, and that, not Ray, then dominates the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import provenance

from .arguments import options_of, positive_int
from .errors import BenchError

NAME = "serve-load-ray"
RESULTS = Path(__file__).resolve().parent / "results"
SERVE_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve.yaml"
COLUMNS = (
    "clients",
    "requests",
    "solver",
    "steps",
    "single_images_per_s",
    "ray_images_per_s",
    "throughput_ratio",
    "single_latency_p50_s",
    "ray_latency_p50_s",
    "single_latency_p99_s",
    "ray_latency_p99_s",
    "latency_ratio",
    "single_mean_batch_rows",
    "ray_mean_batch_rows",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="the service through Ray Serve's gRPC proxy vs the single server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--clients", type=positive_int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=positive_int, default=8, help="requests per client and round")
    parser.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds per client count")
    parser.add_argument("--cpus", type=positive_int, default=2, help="CPUs of each side (Ray: replicas of 1 CPU)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.set_defaults(handler=run)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_ready(target: str, metadata: tuple[tuple[str, str], ...], process: subprocess.Popen[str]) -> None:
    from sampler_service.client import ClientError, SamplerClient

    deadline = time.perf_counter() + 300
    with SamplerClient(target, timeout=5.0, metadata=metadata) as client:
        while time.perf_counter() < deadline:
            if process.poll() is not None:
                raise BenchError(f"{target}: its server exited with status {process.returncode}")
            try:
                if all(model.ready for model in client.list_models()):
                    return
            except ClientError:
                pass
            time.sleep(0.5)
    raise BenchError(f"{target} did not become ready in time")


async def _load(
    targets: list[tuple[str, tuple[tuple[str, str], ...]]], clients: int, args: argparse.Namespace, paired: bool
) -> list[tuple[float, list[float], list[int]]]:
    """Per target: (wall seconds, latencies, batch rows). Paired: one client, targets alternate per request."""
    import grpc

    from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
    from sampler_service.gen.sampler.v1 import sampler_pb2_grpc as pb_grpc

    channels = [grpc.aio.insecure_channel(target) for target, _ in targets]
    stubs = [pb_grpc.SamplerServiceStub(channel) for channel in channels]
    try:

        async def one(t: int, k: int, r: int, latencies: list[float], rows: list[int]) -> None:
            request = pb.GenerateRequest(
                model="mnist",
                solver=args.solver,
                steps=args.steps,
                seeds=[(k + 1) * 10_000 + r],
                labels=[(k + r) % 10],
                guidance=[args.guidance],
            )
            began = time.perf_counter()
            response = await stubs[t].GenerateUnary(request, metadata=targets[t][1])
            latencies.append(time.perf_counter() - began)
            rows.append(response.results[0].timing.batch_rows)

        for t in range(len(targets)):  # warm-up, not counted
            await one(t, -1, 0, [], [])
        kept: list[tuple[list[float], list[int]]] = [([], []) for _ in targets]
        if paired:
            for r in range(args.requests):
                for t in range(len(targets)):
                    await one(t, 0, r, *kept[t])
            return [(sum(lat), lat, rows) for lat, rows in kept]
        results = []
        for t in range(len(targets)):

            async def client(k: int, t: int = t) -> None:
                for r in range(args.requests):
                    await one(t, k, r, *kept[t])

            began = time.perf_counter()
            await asyncio.gather(*(client(k) for k in range(clients)))
            results.append((time.perf_counter() - began, *kept[t]))
        return results
    finally:
        for channel in channels:
            await channel.close()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()


def run(args: argparse.Namespace) -> int:
    meta = provenance.collect(options_of(args))
    try:
        import ray
    except ImportError:
        raise BenchError("ray is not installed: pip install 'diffusion-sampler-service[ray]'") from None
    single_port, ray_port = _free_port(), _free_port()
    threads = {"OMP_NUM_THREADS": str(args.cpus), "MKL_NUM_THREADS": str(args.cpus)}
    single = subprocess.Popen(
        [sys.executable, "-m", "sampler_service", "serve", "--port", str(single_port), "--device", "cpu"],
        env={**os.environ, **threads, "SAMPLER_LIMITS__MAX_QUEUED_REQUESTS": str(max(64, 2 * max(args.clients)))},
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sizes = ["--num-cpus", str(args.cpus), "--replicas", str(args.cpus), "--grpc-port", str(ray_port)]
    on_ray = subprocess.Popen(
        [sys.executable, "-m", "sampler_service", "ray", "--config", str(SERVE_CONFIG), *sizes],
        # Ray starts workers at nice 15 (its control plane first); on this shared machine that would
        # starve the replicas against the single server at nice 0.
        env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_worker_niceness": "0"},
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    targets = [(f"127.0.0.1:{single_port}", ()), (f"127.0.0.1:{ray_port}", (("application", "mnist"),))]
    rows: list[dict[str, Any]] = []
    try:
        for (target, metadata), process in zip(targets, (single, on_ray), strict=True):
            _wait_ready(target, metadata, process)
        for clients in args.clients:
            rounds = [asyncio.run(_load(targets, clients, args, paired=clients == 1)) for _ in range(args.rounds)]
            per_target = []
            for t in range(2):
                walls = [round_[t][0] for round_ in rounds]
                latencies = [x for round_ in rounds for x in round_[t][1]]
                batch_rows = [x for round_ in rounds for x in round_[t][2]]
                rate = statistics.median(clients * args.requests / wall for wall in walls)
                per_target.append((rate, latencies, batch_rows))
            (single_rate, single_lat, single_rows), (ray_rate, ray_lat, ray_rows) = per_target
            pairs = [r / s for r, s in zip(ray_lat, single_lat, strict=True)] if clients == 1 else []
            rows.append(
                {
                    "clients": clients,
                    "requests": clients * args.requests * args.rounds,
                    "solver": args.solver,
                    "steps": args.steps,
                    "single_images_per_s": single_rate,
                    "ray_images_per_s": ray_rate,
                    "throughput_ratio": ray_rate / single_rate,
                    "single_latency_p50_s": statistics.median(single_lat),
                    "ray_latency_p50_s": statistics.median(ray_lat),
                    "single_latency_p99_s": _percentile(single_lat, 0.99),
                    "ray_latency_p99_s": _percentile(ray_lat, 0.99),
                    "latency_ratio": statistics.median(pairs) if pairs else None,
                    "single_mean_batch_rows": statistics.fmean(single_rows),
                    "ray_mean_batch_rows": statistics.fmean(ray_rows),
                }
            )
    finally:
        _stop(single)
        _stop(on_ray)
    meta["ray_version"] = ray.__version__
    meta["setup"] = (
        f"single server: one process, {args.cpus} torch threads; Ray: local head of {args.cpus} CPUs, "
        f"{args.cpus} replicas of 1 CPU / 1 torch thread, deploy/ray/serve.yaml"
    )
    provenance.write_csv(args.out / f"{NAME}-cpus{args.cpus}.csv", rows, COLUMNS)
    provenance.write_json(args.out / f"{NAME}-cpus{args.cpus}.json", meta, rows)
    for row in rows:
        latency = f"; lone latency ratio {row['latency_ratio']:.3f}" if row["latency_ratio"] is not None else ""
        print(
            f"{row['clients']:>3} clients: Ray {row['ray_images_per_s']:.1f} img/s vs single "
            f"{row['single_images_per_s']:.1f} (ratio {row['throughput_ratio']:.2f}); p50 "
            f"{row['ray_latency_p50_s']:.3f} vs {row['single_latency_p50_s']:.3f} s; mean batch rows "
            f"{row['ray_mean_batch_rows']:.1f} vs {row['single_mean_batch_rows']:.1f}{latency}"
        )
    return 0
