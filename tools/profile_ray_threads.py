"""Where the CPU of the service goes, by process and by thread, under closed-loop load: the single
server or the Ray application, each on one pinned core.

    PYTHONPATH=$PWD python -m tools.profile_ray_threads --target single --out bench/results/serve-load-ray-lean/threads
    PYTHONPATH=$PWD python -m tools.profile_ray_threads --target ray --out bench/results/serve-load-ray-lean/threads

Starts `sampler-service serve` or `sampler-service ray` (deploy/ray/serve.yaml, one replica) with
every process on core --cpu (taskset; this process and its clients run on the other cores), waits
until it answers, lets it settle (--settle s: the Serve controller works hard for its first minute
or so), drives it with --clients batch-1 GenerateUnary clients (mnist, dpmpp_2m, --steps) for
--warmup s and then --seconds s, and reads the CPU time of every thread of every process of its
tree from /proc before and after: milliseconds of CPU per image by process (exited threads
included) and by live thread, the thread named as Python names it where `py-spy dump` can say
(py-spy is not a dependency: `pip install py-spy`; without it, the kernel's thread names). Writes
<out>/threads-<target>.json (with the run's provenance) and prints the table. Linux only.

What it answers that `python -m bench serve-load-ray`'s breakdown by process does not: which of a
replica's threads (the engine's tick thread, Ray's event loops, the servicer's loop) and which of the
proxy's carry Ray's cost per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import provenance

TICKS = os.sysconf("SC_CLK_TCK")
SERVE_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve.yaml"


def _cpu_by_thread(root: Any) -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, tid) -> (title, CPU seconds); tid 0 is the whole process, its exited threads included."""
    import psutil

    used: dict[tuple[int, int], tuple[str, float]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            title = " ".join(process.cmdline())[:70]
            times = process.cpu_times()
            used[(process.pid, 0)] = (title, times.user + times.system)
            for tid in os.listdir(f"/proc/{process.pid}/task"):
                with open(f"/proc/{process.pid}/task/{tid}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
                used[(process.pid, int(tid))] = (title, (int(fields[11]) + int(fields[12])) / TICKS)
        except (psutil.Error, OSError):
            continue
    return used


def _python_thread_names(pids: list[int]) -> dict[int, str]:
    """tid -> Python thread name, from `py-spy dump` (empty without py-spy or permission)."""
    beside = Path(sys.executable).parent / "py-spy"
    py_spy = str(beside) if beside.exists() else shutil.which("py-spy")
    names: dict[int, str] = {}
    if py_spy is None:
        return names
    for pid in pids:
        dump = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True)
        for match in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]*)"', dump.stdout, re.MULTILINE):
            names[int(match.group(1))] = match.group(2)
    return names


Metadata = tuple[tuple[str, str], ...]


async def _load(target: str, metadata: Metadata, clients: int, seconds: float, steps: int) -> list[int]:
    """Closed-loop batch-1 clients for `seconds`; the batch rows of every answered request."""
    import grpc

    from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
    from sampler_service.gen.sampler.v1 import sampler_pb2_grpc as pb_grpc

    rows: list[int] = []
    until = time.perf_counter() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SamplerServiceStub(channel)

        async def client(k: int) -> None:
            r = 0
            while time.perf_counter() < until:
                request = pb.GenerateRequest(
                    model="mnist", solver="dpmpp_2m", steps=steps, seeds=[k * 10_000 + r], labels=[(k + r) % 10]
                )
                response = await stub.GenerateUnary(request, metadata=metadata)
                rows.append(response.results[0].timing.batch_rows)
                r += 1

        await asyncio.gather(*(client(k) for k in range(clients)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=["single", "ray"], required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--settle", type=float, default=60.0, help="seconds between ready and load")
    parser.add_argument("--warmup", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--cpu", type=int, default=0, help="the core the target's processes run on")
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE", help="env of the Ray head")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    meta = provenance.collect(vars(args))

    import grpc
    import psutil

    from bench.serve_load import _free_port

    others = sorted(os.sched_getaffinity(0) - {args.cpu}) or [args.cpu]
    os.sched_setaffinity(0, others)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_worker_niceness": "0"}
    env.update(item.split("=", 1) for item in args.ray_env)
    if args.target == "ray":
        command = ["sampler_service", "ray", "--config", str(SERVE_CONFIG), "--grpc-port", str(port)]
        command += ["--num-cpus", "1", "--replicas", "1"]
        metadata: Metadata = (("application", "mnist"),)
    else:
        command = ["sampler_service", "serve", "--port", str(port), "--device", "cpu"]
        env["SAMPLER_LIMITS__MAX_QUEUED_REQUESTS"] = str(max(64, 2 * args.clients))
        metadata = ()
    target = f"127.0.0.1:{port}"
    process = subprocess.Popen(
        ["taskset", "-c", str(args.cpu), sys.executable, "-m", *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while True:
            try:
                asyncio.run(_load(target, metadata, 1, 0.0, args.steps))
                break
            except grpc.RpcError:
                if process.poll() is not None:
                    raise SystemExit(f"{args.target} exited with {process.returncode}") from None
                time.sleep(1.0)
        time.sleep(args.settle)
        asyncio.run(_load(target, metadata, args.clients, args.warmup, args.steps))
        root = psutil.Process(process.pid)
        names = _python_thread_names([p.pid for p in [root, *root.children(recursive=True)]])
        before, began = _cpu_by_thread(root), time.perf_counter()
        rows = asyncio.run(_load(target, metadata, args.clients, args.seconds, args.steps))
        seconds, after = time.perf_counter() - began, _cpu_by_thread(root)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
    images = len(rows)
    per_image = {
        key: (title, 1000 * (used - before.get(key, (title, 0.0))[1]) / images) for key, (title, used) in after.items()
    }
    processes = sorted(((ms, pid, title) for (pid, tid), (title, ms) in per_image.items() if tid == 0), reverse=True)
    threads = sorted(
        ((ms, pid, tid, names.get(tid, ""), title) for (pid, tid), (title, ms) in per_image.items() if tid != 0),
        reverse=True,
    )
    result = {
        "target": args.target,
        "images": images,
        "images_per_s": images / seconds,
        "mean_batch_rows": sum(rows) / images,
        "cpu_ms_per_image": sum(ms for ms, _, _ in processes),
        "by_process": [{"pid": pid, "process": title, "ms": round(ms, 3)} for ms, pid, title in processes],
        "by_thread": [
            {"pid": pid, "tid": tid, "thread": name, "process": title, "ms": round(ms, 3)}
            for ms, pid, tid, name, title in threads
            if ms >= 0.01
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"threads-{args.target}.json").write_text(json.dumps({"meta": meta, **result}, indent=1) + "\n")
    print(
        f"{args.target}: {images} images, {result['images_per_s']:.1f} img/s, {result['mean_batch_rows']:.1f} rows "
        f"per batch, {result['cpu_ms_per_image']:.2f} ms of CPU per image"
    )
    for ms, pid, title in processes:
        if ms >= 0.05:
            print(f"  {ms:6.2f}  {pid} {title}")
    for ms, pid, tid, name, title in threads:
        if ms >= 0.05:
            print(f"  {ms:6.2f}    thread {name or '?'} ({tid}) of {pid} {title[:40]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
