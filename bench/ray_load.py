"""`serve-load-ray`: the service through Ray Serve's gRPC proxy against the single server, same run,
same machine, same CPUs.

    python -m bench serve-load-ray                          # clients 1, 8, 32; dpmpp_2m, 10 steps, mnist
    python -m bench serve-load-ray --cpus 1 --pin replicas  # the replica on the server's core, Ray's rest beside
    python -m bench serve-load-ray --replicas 1,2 --label scaling-cpu   # throughput per replica count
    python -m bench serve-load-ray --num-gpus 1 --replicas 1,2,4 --label scaling-gpu  # on a multi-GPU host

Both run as subprocesses on loopback: `sampler-service serve` with --cpus torch threads, and
`sampler-service ray` (deploy/ray/serve.yaml with fixed replicas: each of --cpus-per-replica CPUs and
torch threads and --num-gpus GPUs). For each replica count in --replicas (default --cpus /
--cpus-per-replica), a client process runs B concurrent batch-1 clients, each sending --requests
requests back to back, against one target and then the other, in ABBA order over --rounds rounds
(the shared machine's speed drifts between phases): per target and B the median over rounds of
throughput, p50 / p99 latency, mean batch rows, and the CPU time each side spent per image (every
process of its tree: for Ray the replicas' share apart, and in the JSON by role: proxy,
controller, GCS, raylet, agents, log monitor, driver), with the same-CPU ratio (single server's CPU
per image / Ray's). With one client, single and Ray requests alternate one by one (paired): the lone
request's latency ratio is the median of Ray / single per pair (goal <= 1.15). Throughput ratio Ray /
single at 8 and 32 clients (goal >= 0.9).

Same CPUs (--pin, Linux): `all` runs the single server and the whole Ray tree on the first --cpus
cores (Ray's own processes counted against its replicas); `replicas` puts the single server and the
Ray replicas on those cores and Ray's other processes on the remaining cores (as on a cluster whose
proxy and controller run beside the GPU workers); `none` lets the OS place everything.

Writes bench/results/serve-load-ray-<label>.csv and .json (label default cpus<N>) with the provenance
of the run (Ray's version and the exact Ray settings in meta).
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
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import provenance

from .arguments import options_of, positive_int, positive_int_list
from .errors import BenchError

NAME = "serve-load-ray"
RESULTS = Path(__file__).resolve().parent / "results"
SERVE_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve.yaml"
COLUMNS = (
    "replicas",
    "cpus_per_replica",
    "clients",
    "requests",
    "solver",
    "steps",
    "guidance",
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
    "single_cpu_ms_per_image",
    "ray_cpu_ms_per_image",
    "ray_replica_cpu_ms_per_image",
    "same_cpu_ratio",
    "scaling_efficiency",
)
PIN_MODES = ("none", "replicas", "all")
# How a Serve replica's process titles itself (setproctitle): `ray::ServeReplica:<app>:<deployment>`.
REPLICA_TITLE = "ServeReplica:"
# Ray's processes by what their command line contains (first match wins), for the CPU breakdown.
ROLES = (
    (REPLICA_TITLE, "replicas"),
    ("ProxyActor", "proxy"),
    ("ServeController", "controller"),
    ("gcs_server", "gcs"),
    ("raylet/raylet", "raylet"),
    ("DashboardAgent", "dashboard_agent"),
    ("RuntimeEnvAgent", "runtime_env_agent"),
    ("log_monitor", "log_monitor"),
    ("dashboard/dashboard.py", "dashboard"),
    ("autoscaler/_private/monitor.py", "monitor"),
)


def role_of(command_line: str) -> str:
    return next((role for text, role in ROLES if text in command_line), "driver")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


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
    parser.add_argument("--rounds", type=positive_int, default=4, help="rounds per client count (ABBA order)")
    parser.add_argument("--cpus", type=positive_int, default=2, help="CPUs (torch threads) of the single server")
    parser.add_argument(
        "--replicas", type=positive_int_list, default=None, help="Ray replica counts, e.g. 1,2,4 (default cpus)"
    )
    parser.add_argument("--cpus-per-replica", type=positive_int, default=1, help="num_cpus and torch threads")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (the server gets cuda if > 0)")
    parser.add_argument("--pin", choices=PIN_MODES, default="none", help="CPU affinity, see above")
    parser.add_argument("--config", type=Path, default=SERVE_CONFIG, help="the Ray Serve config (one application)")
    parser.add_argument("--delay-ms", type=float, default=None, help="the replicas' batching.max_queue_delay_ms")
    parser.add_argument(
        "--ray-env", type=_key_value, action="append", default=[], metavar="KEY=VALUE", help="env of the Ray head"
    )
    parser.add_argument("--method", choices=("unary", "stream"), default="unary", help="GenerateUnary or Generate")
    parser.add_argument("--idle-s", type=float, default=20.0, help="seconds Ray's idle CPU is measured")
    parser.add_argument("--label", default=None, help="results file suffix (default cpus<N>)")
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


def _wait_serving(log: Path, process: subprocess.Popen[str]) -> None:
    """Until `sampler-service ray` logs SERVING: every replica built and warmed, so that neither the
    idle measurement nor the first phase overlaps a replica's start-up."""
    deadline = time.perf_counter() + 600
    while time.perf_counter() < deadline:
        if process.poll() is not None:
            raise BenchError(f"sampler-service ray exited with status {process.returncode}: see {log}")
        if "SERVING" in log.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise BenchError("sampler-service ray did not log SERVING in time")


class ProcessTree:
    """CPU time (user + system) of a process and all its descendants, and their CPU affinity."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)

    def processes(self) -> list[Any]:
        import psutil

        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far per process ("pid title")."""
        import psutil

        used = {}
        for process in self.processes():
            try:
                times = process.cpu_times()
                used[f"{process.pid} {' '.join(process.cmdline())[:70].strip()}"] = times.user + times.system
            except psutil.Error:
                continue
        return used

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far: `total` and per role (`role_of`); processes that exit take their
        time with them."""
        import psutil

        used: dict[str, float] = {"total": 0.0}
        for process in self.processes():
            try:
                times = process.cpu_times()
                role = role_of(" ".join(process.cmdline()))
            except psutil.Error:
                continue
            used["total"] += times.user + times.system
            used[role] = used.get(role, 0.0) + times.user + times.system
        return used

    def pin(self, replica_cpus: list[int], other_cpus: list[int]) -> dict[str, list[int]]:
        """Every thread of the replicas on `replica_cpus`, of the other processes on `other_cpus`."""
        import psutil

        placed: dict[str, list[int]] = {}
        for process in self.processes():
            try:
                title = " ".join(process.cmdline())
                cpus = replica_cpus if REPLICA_TITLE in title else other_cpus
                for thread in process.threads():
                    os.sched_setaffinity(thread.id, cpus)
            except (psutil.Error, ProcessLookupError):
                continue
            placed[f"{process.pid} {title[:60]}"] = cpus
        return placed


async def _load(
    targets: list[tuple[str, tuple[tuple[str, str], ...]]],
    clients: int,
    args: argparse.Namespace,
    paired: bool,
    cpu: list[Callable[[], dict[str, float]]],
    order: list[int],
) -> list[tuple[float, list[float], list[int], dict[str, float] | None]]:
    """Per target: (wall seconds, latencies, batch rows, CPU seconds by role during its phase).
    The phases run in `order` (rounds alternate it: ABBA). Paired: one client, targets alternate
    per request (no CPU attribution)."""
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
            if args.method == "unary":
                response = await stubs[t].GenerateUnary(request, metadata=targets[t][1])
                results = list(response.results)
            else:
                results = [
                    event.result
                    async for event in stubs[t].Generate(request, metadata=targets[t][1])
                    if event.WhichOneof("event") == "result"
                ]
            latencies.append(time.perf_counter() - began)
            if len(results) != 1:
                raise BenchError(f"{targets[t][0]}: {len(results)} results for one sample")
            rows.append(results[0].timing.batch_rows)

        for t in range(len(targets)):  # warm-up, not counted
            await one(t, -1, 0, [], [])
        kept: list[tuple[list[float], list[int]]] = [([], []) for _ in targets]
        if paired:
            for r in range(args.requests):
                for t in range(len(targets)):
                    await one(t, 0, r, *kept[t])
            return [(sum(lat), lat, rows, None) for lat, rows in kept]
        results: dict[int, tuple[float, list[float], list[int], dict[str, float] | None]] = {}
        for t in order:

            async def client(k: int, t: int = t) -> None:
                for r in range(args.requests):
                    await one(t, k, r, *kept[t])

            cpu_before = cpu[t]()
            began = time.perf_counter()
            await asyncio.gather(*(client(k) for k in range(clients)))
            wall = time.perf_counter() - began
            cpu_after = cpu[t]()
            used = {role: seconds - cpu_before.get(role, 0.0) for role, seconds in cpu_after.items()}
            results[t] = (wall, *kept[t], used)
        return [results[t] for t in range(len(targets))]
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


def _ray_config(args: argparse.Namespace, folder: Path) -> Path:
    """The Serve config with this run's replica resources and batching delay (paths made absolute)."""
    import yaml

    document = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    for application in document["applications"]:
        application_args = application.setdefault("args", {})
        overrides = application_args.setdefault("overrides", {})
        if overrides.get("models_config"):
            overrides["models_config"] = str((args.config.parent / overrides["models_config"]).resolve())
        if args.delay_ms is not None:
            overrides.setdefault("batching", {})["max_queue_delay_ms"] = args.delay_ms
        application_args["torch_threads"] = args.cpus_per_replica
        for deployment in application.get("deployments") or []:
            actor = deployment.setdefault("ray_actor_options", {})
            actor["num_cpus"] = args.cpus_per_replica
            actor["num_gpus"] = args.num_gpus
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def _taskset(cpus: list[int] | None) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []


def run(args: argparse.Namespace) -> int:
    meta = provenance.collect(options_of(args))
    try:
        import ray
    except ImportError:
        raise BenchError("ray is not installed: pip install 'diffusion-sampler-service[ray]'") from None
    replica_counts = args.replicas or [max(1, args.cpus // args.cpus_per_replica)]
    available = sorted(os.sched_getaffinity(0))
    if args.pin != "none" and args.cpus > len(available):
        raise BenchError(f"--cpus={args.cpus} is out of range for --pin: expected 1..{len(available)}")
    server_cpus = available[: args.cpus] if args.pin != "none" else None
    other_cpus = [c for c in available if server_cpus is None or c not in server_cpus] or available
    gpu = args.num_gpus > 0
    single_port = _free_port()
    threads = {"OMP_NUM_THREADS": str(args.cpus), "MKL_NUM_THREADS": str(args.cpus)}
    single = subprocess.Popen(
        [
            *_taskset(server_cpus),
            sys.executable,
            "-m",
            "sampler_service",
            "serve",
            "--port",
            str(single_port),
            "--device",
            "cuda" if gpu else "cpu",
        ],
        env={**os.environ, **threads, "SAMPLER_LIMITS__MAX_QUEUED_REQUESTS": str(max(64, 2 * max(args.clients)))},
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    single_tree = ProcessTree(single.pid)
    rows: list[dict[str, Any]] = []
    placements: dict[str, Any] = {}
    idle_cpu: dict[str, dict[str, Any]] = {}
    cpu_by_role: dict[str, dict[str, dict[str, float]]] = {}
    try:
        _wait_ready(f"127.0.0.1:{single_port}", (), single)
        with tempfile.TemporaryDirectory() as folder:
            config = _ray_config(args, Path(folder))
            for replicas in replica_counts:
                ray_port = _free_port()
                sizes = ["--num-cpus", str(replicas * args.cpus_per_replica), "--replicas", str(replicas)]
                if gpu:
                    sizes += ["--num-gpus", str(int(-(-replicas * args.num_gpus // 1)))]
                on_ray = subprocess.Popen(
                    [
                        *_taskset(server_cpus if args.pin == "all" else None),
                        sys.executable,
                        "-m",
                        "sampler_service",
                        "ray",
                        "--config",
                        str(config),
                        "--grpc-port",
                        str(ray_port),
                        *sizes,
                    ],
                    # Ray starts workers at nice 15 (its control plane first); on this shared machine
                    # that would starve the replicas against the single server at nice 0.
                    env={**os.environ, "OMP_NUM_THREADS": "1", "RAY_worker_niceness": "0", **dict(args.ray_env)},
                    text=True,
                    stdout=subprocess.DEVNULL,
                    stderr=(Path(folder) / f"ray-{replicas}.log").open("w"),
                )
                try:
                    _wait_serving(Path(folder) / f"ray-{replicas}.log", on_ray)
                    rows += _measure(
                        args,
                        replicas,
                        single_port,
                        single,
                        single_tree,
                        ray_port,
                        on_ray,
                        server_cpus,
                        other_cpus,
                        placements,
                        idle_cpu,
                        cpu_by_role,
                    )
                finally:
                    _stop(on_ray)
    finally:
        _stop(single)
    base = {row["clients"]: row["ray_images_per_s"] for row in rows if row["replicas"] == min(replica_counts)}
    for row in rows:
        one = base.get(row["clients"])
        row["scaling_efficiency"] = (
            row["ray_images_per_s"] / (one * row["replicas"] / min(replica_counts)) if one else None
        )
    meta["ray_version"] = ray.__version__
    meta["ray_env"] = dict(args.ray_env)
    meta["placement"] = placements
    meta["ray_idle_cpu_fraction"] = idle_cpu
    meta["ray_cpu_ms_per_image_by_role"] = cpu_by_role
    meta["setup"] = (
        f"single server: one process, {args.cpus} torch threads{' on cuda' if gpu else ''}; Ray: local head, "
        f"{replica_counts} replicas of {args.cpus_per_replica} CPU / torch thread and {args.num_gpus} GPU, "
        f"{args.config.name} (delay_ms {args.delay_ms or 'as shipped'}), {args.method}; pin {args.pin} "
        f"(server cores {server_cpus}, Ray's other processes {other_cpus if args.pin == 'replicas' else server_cpus})"
    )
    label = args.label or f"cpus{args.cpus}"
    provenance.write_csv(args.out / f"{NAME}-{label}.csv", rows, COLUMNS)
    provenance.write_json(args.out / f"{NAME}-{label}.json", meta, rows)
    for row in rows:
        latency = f"; lone latency ratio {row['latency_ratio']:.3f}" if row["latency_ratio"] is not None else ""
        cpu = (
            f"; CPU ms/img {row['ray_cpu_ms_per_image']:.0f} (replicas {row['ray_replica_cpu_ms_per_image']:.0f})"
            f" vs {row['single_cpu_ms_per_image']:.0f}: same-CPU ratio {row['same_cpu_ratio']:.2f}"
            if row["ray_cpu_ms_per_image"] is not None
            else ""
        )
        print(
            f"{row['replicas']} replicas, {row['clients']:>3} clients: Ray {row['ray_images_per_s']:.1f} img/s vs "
            f"single {row['single_images_per_s']:.1f} (ratio {row['throughput_ratio']:.2f}); p50 "
            f"{row['ray_latency_p50_s']:.3f} vs {row['single_latency_p50_s']:.3f} s; batch rows "
            f"{row['ray_mean_batch_rows']:.1f} vs {row['single_mean_batch_rows']:.1f}{cpu}{latency}"
        )
    return 0


def _measure(
    args: argparse.Namespace,
    replicas: int,
    single_port: int,
    single: subprocess.Popen[str],
    single_tree: ProcessTree,
    ray_port: int,
    on_ray: subprocess.Popen[str],
    server_cpus: list[int] | None,
    other_cpus: list[int],
    placements: dict[str, Any],
    idle_cpu: dict[str, dict[str, Any]],
    cpu_by_role: dict[str, dict[str, dict[str, float]]],
) -> list[dict[str, Any]]:
    targets = [(f"127.0.0.1:{single_port}", ()), (f"127.0.0.1:{ray_port}", (("application", "mnist"),))]
    _wait_ready(*targets[1], on_ray)
    ray_tree = ProcessTree(on_ray.pid)
    if args.pin == "replicas" and server_cpus is not None:
        placements[str(replicas)] = ray_tree.pin(server_cpus, other_cpus)
    # What Ray's control plane costs when no request comes (controller loop, raylet, GCS, metrics).
    before, roles_before, began = ray_tree.cpu_by_process(), ray_tree.cpu_seconds(), time.perf_counter()
    time.sleep(args.idle_s)
    after, roles_after, seconds = ray_tree.cpu_by_process(), ray_tree.cpu_seconds(), time.perf_counter() - began
    idle_cpu[str(replicas)] = {
        **{role: round((used - roles_before.get(role, 0.0)) / seconds, 4) for role, used in roles_after.items()},
        "by_process": {k: round((after[k] - before.get(k, 0.0)) / seconds, 4) for k in after},
    }
    cpu = [single_tree.cpu_seconds, ray_tree.cpu_seconds]
    rows = []
    for clients in args.clients:
        paired = clients == 1
        # ABBA: the first target leads in even rounds, the second in odd ones, so that a drift in
        # the machine's speed within a round does not favour the side that always goes first.
        rounds = [
            asyncio.run(_load(targets, clients, args, paired, cpu, [0, 1] if r % 2 == 0 else [1, 0]))
            for r in range(args.rounds)
        ]
        per_target = []
        for t in range(2):
            walls = [round_[t][0] for round_ in rounds]
            latencies = [x for round_ in rounds for x in round_[t][1]]
            batch_rows = [x for round_ in rounds for x in round_[t][2]]
            rate = statistics.median(clients * args.requests / wall for wall in walls)
            used = [u for round_ in rounds if (u := round_[t][3]) is not None]
            images = clients * args.requests * len(used)
            roles = sorted({role for u in used for role in u})
            cpu_ms = {role: 1000 * sum(u.get(role, 0.0) for u in used) / images for role in roles} if used else None
            per_target.append((rate, latencies, batch_rows, cpu_ms))
        (single_rate, single_lat, single_rows, single_cpu), (ray_rate, ray_lat, ray_rows, ray_cpu) = per_target
        pairs = [r / s for r, s in zip(ray_lat, single_lat, strict=True)] if paired else []
        if ray_cpu is not None:
            cpu_by_role.setdefault(str(replicas), {})[str(clients)] = {k: round(v, 2) for k, v in ray_cpu.items()}
        rows.append(
            {
                "replicas": replicas,
                "cpus_per_replica": args.cpus_per_replica,
                "clients": clients,
                "requests": clients * args.requests * args.rounds,
                "solver": args.solver,
                "steps": args.steps,
                "guidance": args.guidance,
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
                "single_cpu_ms_per_image": single_cpu["total"] if single_cpu else None,
                "ray_cpu_ms_per_image": ray_cpu["total"] if ray_cpu else None,
                "ray_replica_cpu_ms_per_image": ray_cpu.get("replicas", 0.0) if ray_cpu else None,
                # Images per CPU second, Ray / single: the throughput ratio with the same total CPU.
                "same_cpu_ratio": single_cpu["total"] / ray_cpu["total"] if single_cpu and ray_cpu else None,
            }
        )
    return rows
