"""Where a serving process spends its time under serve-mixed's load: py-spy samples, by thread and part.

    PYTHONPATH=$PWD python -m tools.profile_serve --mode step --clients 32 --out bench/results/step-profile-cpu

Starts `sampler-service serve` (one torch thread, the given batching mode, bench serve-mixed's
settings), drives it with --clients closed-loop clients drawing serve-mixed's mixed requests,
lets the load settle for --settle seconds, records every thread with `py-spy record --idle` for
--seconds, and sorts the samples: the tick thread (step mode) or the model worker (request mode)
into the network forward, binding rows, waiting for evaluations, selecting and the rest; the
request threads into waiting, solver arithmetic and result encoding. Writes <out>/profile.csv
and .json (with the run's provenance). Needs py-spy (`pip install py-spy`, not a dependency of the
project) and permission to attach to the server process.
"""

from __future__ import annotations

import argparse
import collections
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import provenance

# (part, frames that mark it), checked in order against a sample's stack.
TICK_PARTS = (
    ("network forward", ("UNet2DModel.forward", "UNet2DConditionModel.forward")),
    ("binding rows", ("_denoiser",)),
    ("waiting for evaluations", ("_next_tick",)),
    ("selecting rows", ("_select",)),
)
REQUEST_PARTS = (
    ("waiting for its rows", ("Event.wait",)),
    ("encoding results", ("_post_results", "encode")),
    ("solver arithmetic", ("solvers/",)),
)


def _py_spy() -> str:
    """py-spy next to this interpreter (a virtualenv's bin), else on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def classify(stack: str, parts: tuple[tuple[str, tuple[str, ...]], ...]) -> str:
    for name, marks in parts:
        if any(mark in stack for mark in marks):
            return name
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["step", "request"], default="step")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--settle", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=25.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    meta = provenance.collect(vars(args))

    import grpc

    from bench.serve_load import _free_port, _wait_healthy
    from bench.serve_mixed import mixed_requests
    from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
    from sampler_service.gen.sampler.v1 import sampler_pb2_grpc as pb_grpc

    port = _free_port()
    env = {
        **os.environ,
        "SAMPLER_PORT": str(port),
        "SAMPLER_HOST": "127.0.0.1",
        "SAMPLER_DEVICE": "cpu",
        "SAMPLER_METRICS_PORT": str(_free_port()),
        "SAMPLER_BATCHING__MODE": args.mode,
        "SAMPLER_THREADS__INTRA_OP": "1",
        "SAMPLER_LIMITS__MAX_QUEUED_REQUESTS": str(2 * args.clients + 4),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "sampler_service", "serve"], env=env, stderr=subprocess.DEVNULL, text=True
    )
    stop = threading.Event()
    try:
        _wait_healthy(port, server)
        stub = pb_grpc.SamplerServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        images = [0]

        def client(k: int) -> None:
            for fields in mixed_requests(0, k, 10_000):
                if stop.is_set():
                    return
                images[0] += len(stub.GenerateUnary(pb.GenerateRequest(**fields)).results)

        with ThreadPoolExecutor(args.clients) as pool:
            for k in range(args.clients):
                pool.submit(client, k)
            time.sleep(args.settle)
            raw = Path(tempfile.mkdtemp()) / "samples.txt"
            subprocess.run(
                [
                    *(_py_spy(), "record", "-p", str(server.pid), "-d", str(int(args.seconds)), "-r", "50"),
                    *("--idle", "--threads", "--format", "raw", "-o", str(raw)),
                ],
                check=True,
                capture_output=True,
            )
            stop.set()
    finally:
        stop.set()
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, samples = line.rsplit(" ", 1)
        thread = stack.split(";", 1)[0]
        if ("ticks-" if args.mode == "step" else "model-") in thread:  # step mode's idle worker is left out
            counts["forward thread", classify(stack, TICK_PARTS)] += int(samples)
        elif "request-" in thread:
            counts["request threads", classify(stack, REQUEST_PARTS)] += int(samples)
    totals = collections.Counter[str]()
    for (thread, _), count in counts.items():
        totals[thread] += count
    rows = [
        {"thread": thread, "part": part, "samples": count, "share": count / totals[thread]}
        for (thread, part), count in sorted(counts.items(), key=lambda item: (item[0][0], -item[1]))
    ]
    meta["images_completed"] = images[0]  # in settle + seconds (step mode: requests finish together, late)
    args.out.mkdir(parents=True, exist_ok=True)
    provenance.write_csv(args.out / "profile.csv", rows, ("thread", "part", "samples", "share"))
    provenance.write_json(args.out / "profile.json", meta, rows)
    for row in rows:
        print(f"{row['thread']:>16} {row['part']:<26} {row['samples']:>7} {row['share']:.3f}")
    print(f"{images[0]} images completed while profiling")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
