"""`serve-startup`: seconds from starting `sampler-service serve` to health SERVING, several runs.

    python -m bench serve-startup                    # 5 runs, default settings (warm-up on)

Each run starts a fresh server process (the default mnist model, loopback, a free port) and polls
health every 50 ms. Two clocks per run: `process_to_serving_s` from just before the process is
spawned (interpreter start and every import included: what a client or an orchestrator waits) to
the first SERVING answer; `reported_s` is what the server's own SERVING log line says (from the
first import of sampler_service, so without the interpreter's own start-up). Also recorded: the
machine's 1-minute load average at the start of each run (the machine may be shared).

Writes bench/results/serve-startup.csv and .json with the provenance of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import provenance

from .arguments import options_of, positive_int
from .errors import BenchError
from .serve_load import _free_port

NAME = "serve-startup"
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("run", "device", "warmup", "process_to_serving_s", "reported_s", "load_average_1min")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="seconds from process start to health SERVING, several runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=positive_int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.set_defaults(handler=run)


def _health(port: int) -> str:
    from sampler_service.client import ClientError, SamplerClient

    try:
        with SamplerClient(f"127.0.0.1:{port}", timeout=1.0) as client:
            return client.health()
    except ClientError:
        return "UNAVAILABLE"


def once(device: str, warmup: bool) -> tuple[float, float]:
    """(process start to SERVING, the server's own figure) in seconds, for one fresh process."""
    port = _free_port()
    env = {
        **os.environ,
        "SAMPLER_PORT": str(port),
        "SAMPLER_HOST": "127.0.0.1",
        "SAMPLER_DEVICE": device,
        "SAMPLER_WARMUP": "true" if warmup else "false",
    }
    began = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "sampler_service", "serve"],
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        while _health(port) != "SERVING":
            if server.poll() is not None:
                raise BenchError(f"the server exited with status {server.returncode}")
            if time.perf_counter() - began > 300:
                raise BenchError("the server did not become SERVING within 300 s")
            time.sleep(0.05)
        seconds = time.perf_counter() - began
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=60)
    reported = next(
        (json.loads(line)["message"] for line in err.splitlines() if '"SERVING' in line),
        "",
    )
    found = re.search(r"SERVING \S+ ([0-9.]+) s after the process started", reported)
    return seconds, float(found.group(1)) if found else float("nan")


def run(args: argparse.Namespace) -> int:
    meta = provenance.collect(options_of(args))  # at the start: the code and tree this run executes
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for k in range(args.runs):
        load = os.getloadavg()[0]
        seconds, reported = once(device, args.warmup)
        rows.append(
            {
                "run": k,
                "device": device,
                "warmup": args.warmup,
                "process_to_serving_s": round(seconds, 3),
                "reported_s": reported,
                "load_average_1min": round(load, 2),
            }
        )
        print(f"run {k}: SERVING {seconds:.2f} s after the process started (the server says {reported} s)")
    median = statistics.median(row["process_to_serving_s"] for row in rows)
    print(f"median {median:.2f} s over {len(rows)} runs")
    provenance.write_csv(args.out / "serve-startup.csv", rows, COLUMNS)
    provenance.write_json(args.out / "serve-startup.json", meta, rows, median_process_to_serving_s=median)
    return 0
