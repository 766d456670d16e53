"""`serve-mixed`: step-level against request-level batching under mixed traffic, paired in one run.

    python -m bench serve-mixed                      # 16 and 32 clients, mnist, both modes
    python -m bench serve-mixed --model tiny-sd      # the same load on a tiny Stable Diffusion

Models: "mnist" (the built-in class-conditional UNet: its forward on a CPU is compute-bound, a
row costs nearly as much at 32 rows as at 1) and "tiny-sd" (models/tiny_pipelines.py's random-weight
StableDiffusionPipeline at 32 x 32 pixels, 4 x 8 x 8 latents, saved to a temporary folder: a forward
whose cost barely grows with rows, the regime of a large model on a GPU at small batch). A text
model's requests carry one prompt per sample, drawn from the tiny tokenizer's corpus, instead of
labels; its images are decoded by the VAE.

Two servers run side by side (`sampler-service serve` subprocesses on loopback, one per
`batching.mode`, otherwise the same settings); they take turns, so both see the same machine:

1. Lone request (dpmpp_2m, 20 steps, one sample, guidance 2): an in-process `solvers.sample` of
   the same request, then the request on each server, --lone times in turn; ratio of the medians
   (goal: <= 1.05 x in-process).
2. Mixed load: B closed-loop clients (GenerateUnary, one request after another), each drawing
   --requests requests from its own fixed-seed generator: solver in {euler, heun, dpmpp_2m,
   unipc, ipndm}, steps 4..30, guidance in {1, 2, 4}, 1-4 samples, random labels (or prompts) and seeds. The
   same requests go to both servers, --rounds times in ABBA order. Throughput (images/s, network
   rows/s), p50 / p99 latency, mean network rows per forward (the server's batch-fill metric).
   Goal: step >= 1.5 x request at 16 and 32 clients.
3. Long and short: a heun, 1000-step, 64-sample, guidance-2 request runs (streamed; cancelled
   afterwards) while a 10-step one-sample request is sent --short times; its median latency
   against the same request on the idle server (goal: <= 3 x). A short request that does not finish
   within --short-timeout seconds is recorded as timed out.

0. Forward cost (in process, no server): seconds per network row of one forward at 1..128 rows,
   what fuller forwards can buy on this device (scenario "forward": images = rows per forward).

Writes <out>/serve-mixed.csv and .json with the provenance of the run.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import models
import provenance
import solvers

from .arguments import options_of, positive_int
from .errors import BenchError
from .serve_load import _free_port, _percentile, _wait_healthy

NAME = "serve-mixed"
TEXT_MODELS: dict[str, Any] = {"tiny-sd": "sd"}  # served name -> models.tiny_pipelines kind
BENCH_MODELS = ("mnist", *TEXT_MODELS)
# One prompt per label: the corpus the tiny tokenizer is learned from (no prompt is truncated).
PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a painting of a red fox in the snow, highly detailed",
    "the city at night with neon lights and rain on the street",
    "a watercolor of mountains and a lake at sunrise",
    "a cat sitting on a chair next to the window",
)
RESULTS = Path(__file__).resolve().parent / "results" / "serve-mixed-cpu"
MODES = ("step", "request")
MIXED_SOLVERS = ("euler", "heun", "dpmpp_2m", "unipc", "ipndm")
GUIDANCE = (1.0, 2.0, 4.0)
COLUMNS = (
    "scenario",
    "mode",
    "clients",
    "requests",
    "images",
    "seconds",
    "images_per_s",
    "rows_per_s",
    "latency_p50_s",
    "latency_p99_s",
    "mean_rows_per_forward",
    "reference_s",
    "ratio",
    "timed_out",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="step-level vs request-level batching under mixed traffic (paired, one run)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mnist", choices=list(BENCH_MODELS))
    parser.add_argument("--clients", type=positive_int, nargs="+", default=[16, 32])
    parser.add_argument("--requests", type=positive_int, default=2, help="requests per client and round")
    parser.add_argument("--rounds", type=positive_int, default=2, help="ABBA rounds of the mixed load")
    parser.add_argument("--seed", type=int, default=0, help="seed of the clients' request generators")
    parser.add_argument("--lone", type=positive_int, default=8, help="lone requests per mode (and in-process runs)")
    parser.add_argument("--short", type=positive_int, default=3, help="short requests while the long one runs")
    parser.add_argument("--short-timeout", type=float, default=60.0)
    parser.add_argument("--max-batch-size", type=positive_int, default=256)
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--share-rows", type=positive_int, default=4)
    parser.add_argument("--solo-rows", type=positive_int, default=16)
    parser.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads, servers and here")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["forward", "lone", "mixed", "long"], help="scenarios to skip"
    )
    parser.set_defaults(handler=run)


def mixed_requests(seed: int, client: int, count: int, model: str = "mnist") -> list[dict[str, Any]]:
    """The fields of one client's requests (the same in both modes)."""
    draw = random.Random(seed * 1_000_003 + client)
    requests = []
    for _ in range(count):
        samples = draw.randint(1, 4)
        fields: dict[str, Any] = {
            "model": model,
            "solver": draw.choice(MIXED_SOLVERS),
            "steps": draw.randint(4, 30),
            "guidance": [draw.choice(GUIDANCE)],
        }
        conditioning = [draw.randrange(10) for _ in range(samples)]
        if model in TEXT_MODELS:
            fields["prompt"] = [PROMPTS[k % len(PROMPTS)] for k in conditioning]
        else:
            fields["labels"] = conditioning
        fields["seeds"] = [draw.randrange(2**31) for _ in range(samples)]
        requests.append(fields)
    return requests


def conditioning(model: str, label: int, samples: int = 1) -> dict[str, Any]:
    """The label (or a prompt) of a fixed request's samples."""
    if model in TEXT_MODELS:
        return {"prompt": [PROMPTS[label % len(PROMPTS)]] * samples}
    return {"labels": [label] * samples}


def model_source(name: str, folder: Path) -> tuple[str, Path | None]:
    """(source for models.load, models config for the servers or None for the built-in default);
    a tiny pipeline is saved under `folder` first."""
    if name not in TEXT_MODELS:
        return name, None
    from models.tiny_pipelines import save_tiny_pipeline

    pipeline = save_tiny_pipeline(TEXT_MODELS[name], folder / name)
    config = folder / "models.toml"
    config.write_text(f'[[models]]\nname = "{name}"\nsource = "{pipeline}"\ndevice = "cpu"\n')
    return str(pipeline), config


class Servers:
    """One `sampler-service serve` process per mode, with its gRPC stub and metrics port."""

    def __init__(self, args: argparse.Namespace, models_config: Path | None = None) -> None:
        import grpc

        from sampler_service.gen.sampler.v1 import sampler_pb2_grpc as pb_grpc

        self.processes: dict[str, subprocess.Popen[str]] = {}
        self.stubs: dict[str, Any] = {}
        self.metrics: dict[str, int] = {}
        self.channels: list[Any] = []
        for mode in MODES:
            port, metrics = _free_port(), _free_port()
            env = {
                **os.environ,
                "SAMPLER_PORT": str(port),
                "SAMPLER_HOST": "127.0.0.1",
                "SAMPLER_DEVICE": args.device,
                "SAMPLER_METRICS_PORT": str(metrics),
                "SAMPLER_BATCHING__MODE": mode,
                "SAMPLER_BATCHING__MAX_BATCH_SIZE": str(args.max_batch_size),
                "SAMPLER_BATCHING__MAX_QUEUE_DELAY_MS": str(args.max_queue_delay_ms),
                "SAMPLER_BATCHING__SHARE_ROWS": str(args.share_rows),
                "SAMPLER_BATCHING__SOLO_ROWS": str(args.solo_rows),
                "SAMPLER_THREADS__INTRA_OP": str(args.threads),
                "SAMPLER_LIMITS__MAX_QUEUED_REQUESTS": str(max(64, 2 * max(args.clients) + 4)),
                "SAMPLER_LIMITS__MAX_STEPS": "1000",
            }
            if models_config is not None:
                env["SAMPLER_MODELS_CONFIG"] = str(models_config)
            self.processes[mode] = subprocess.Popen(
                [sys.executable, "-m", "sampler_service", "serve"],
                env=env,
                text=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            self.channels.append(channel)
            self.stubs[mode] = pb_grpc.SamplerServiceStub(channel)
            self.metrics[mode] = metrics
            self.ports = getattr(self, "ports", {}) | {mode: port}
        for mode in MODES:
            _wait_healthy(self.ports[mode], self.processes[mode])

    def forwards(self, mode: str) -> tuple[float, float]:
        """(forwards, network rows) so far, from the server's batch-fill histogram."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics[mode]}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        total = float(re.search(r"^sampler_batch_fill_ratio_sum (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
        count = float(re.search(r"^sampler_batch_fill_ratio_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
        return count, total

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
        for process in self.processes.values():
            process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _generate(stub: Any, fields: dict[str, Any], timeout: float | None = None) -> tuple[float, Any]:
    from sampler_service.gen.sampler.v1 import sampler_pb2 as pb

    began = time.perf_counter()
    response = stub.GenerateUnary(pb.GenerateRequest(**fields), timeout=timeout)
    return time.perf_counter() - began, response


def _rows_denoiser(model: models.Model, rows: int) -> solvers.Denoiser:
    """An unguided denoiser of `rows` rows as the step engine binds them (models.rows)."""
    if isinstance(model, models.TextToImageModel):
        encoded = model.sample_rows([PROMPTS[0]], None, 1.0).cond
    else:
        encoded = model.sample_rows(torch.zeros(1, dtype=torch.int64, device=model.device)).cond
    assert encoded is not None  # guidance 1: the conditional pass
    return model.rows_denoiser(encoded.take(torch.zeros(rows, dtype=torch.int64)))


def _forward_cost(model: models.Model) -> list[dict[str, Any]]:
    """In process: seconds per network row of one unguided forward at 1..128 rows (what fuller
    forwards can buy), three interleaved passes, median."""
    sizes = (1, 2, 4, 8, 16, 32, 64, 128)
    times: dict[int, list[float]] = {rows: [] for rows in sizes}
    with torch.inference_mode():
        inputs = {
            rows: (
                _rows_denoiser(model, rows),
                torch.randn(rows, *model.sample_shape, device=model.device),
                torch.full((rows,), 5.0, device=model.device),
            )
            for rows in sizes
        }
        for denoiser, x, sigma in inputs.values():
            denoiser(x, sigma)
        for _ in range(3):
            for rows, (denoiser, x, sigma) in inputs.items():
                began, count = time.perf_counter(), 0
                while time.perf_counter() - began < 0.5:
                    denoiser(x, sigma)
                    count += 1
                times[rows].append((time.perf_counter() - began) / count)
    out = []
    for rows, values in times.items():
        seconds = statistics.median(values)
        row = _row("forward", "in-process", 0, 3, rows, seconds, [seconds], float(rows), None)
        row["rows_per_s"] = rows / seconds
        out.append(row)
    return out


def _lone(args: argparse.Namespace, servers: Servers, model: models.Model) -> list[dict[str, Any]]:
    fields = {"model": args.model, "solver": "dpmpp_2m", "steps": 20, "seeds": [7], "guidance": [2.0]}
    fields |= conditioning(args.model, 3)

    def in_process() -> float:
        began = time.perf_counter()
        noise = solvers.make_noise([7], model.sample_shape, device=model.device)
        w = torch.tensor([2.0], dtype=torch.float64)
        with torch.inference_mode():
            if isinstance(model, models.TextToImageModel):  # prompts encoded (cached), latents decoded
                text = model.conditioned(fields["prompt"], None, w)
                images = model.decode(solvers.sample(text, noise, solver="dpmpp_2m", steps=20).images)
            else:
                denoiser = model.conditioned(torch.tensor([3], device=model.device), w)
                images = solvers.sample(denoiser, noise, solver="dpmpp_2m", steps=20).images
        _ = images.cpu()
        return time.perf_counter() - began

    in_process()
    for mode in MODES:
        _generate(servers.stubs[mode], fields)  # warm-up
    times: dict[str, list[float]] = {"in-process": [], **{mode: [] for mode in MODES}}
    for _ in range(args.lone):  # in turn: the machine's speed drifts
        times["in-process"].append(in_process())
        for mode in MODES:
            times[mode].append(_generate(servers.stubs[mode], fields)[0])
    reference = statistics.median(times["in-process"])
    return [
        _row("lone", mode, 1, len(values), len(values), sum(values), values, None, reference)
        for mode, values in times.items()
        if mode != "in-process"
    ]


def _mixed_once(servers: Servers, mode: str, clients: int, args: argparse.Namespace, round_: int) -> dict[str, Any]:
    plans = [mixed_requests(args.seed + round_, k, args.requests, args.model) for k in range(clients)]
    latencies: list[float] = []
    images = rows = 0
    lock = threading.Lock()
    stub = servers.stubs[mode]

    def client(k: int) -> None:
        nonlocal images, rows
        for fields in plans[k]:
            seconds, response = _generate(stub, fields)
            with lock:
                latencies.append(seconds)
                images += len(response.results)
                rows += sum(result.network_evals for result in response.results)

    forwards_before, rows_before = servers.forwards(mode)
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - began
    forwards_after, fill_after = servers.forwards(mode)
    mean_rows = (fill_after - rows_before) * args.max_batch_size / max(1.0, forwards_after - forwards_before)
    return {"wall": wall, "latencies": latencies, "images": images, "rows": rows, "mean_rows": mean_rows}


def _mixed(args: argparse.Namespace, servers: Servers) -> list[dict[str, Any]]:
    out = []
    for clients in args.clients:
        _mixed_once(servers, "step", min(clients, 4), args, -1)  # warm-up of the shapes
        _mixed_once(servers, "request", min(clients, 4), args, -1)
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                runs[mode].append(_mixed_once(servers, mode, clients, args, round_))
                last = runs[mode][-1]
                print(
                    f"  {clients} clients, round {round_}, {mode}: {last['images'] / last['wall']:.2f} images/s, "
                    f"{last['mean_rows']:.1f} rows per forward",
                    flush=True,
                )
        for mode in MODES:
            wall = sum(r["wall"] for r in runs[mode])
            latencies = [s for r in runs[mode] for s in r["latencies"]]
            images = sum(r["images"] for r in runs[mode])
            rows = sum(r["rows"] for r in runs[mode])
            mean_rows = statistics.fmean(r["mean_rows"] for r in runs[mode])
            row = _row("mixed", mode, clients, len(latencies), images, wall, latencies, mean_rows, None)
            row["rows_per_s"] = rows / wall
            out.append(row)
        step, request = out[-2], out[-1]
        step["ratio"] = step["images_per_s"] / request["images_per_s"]
    return out


def _long_and_short(args: argparse.Namespace, servers: Servers) -> list[dict[str, Any]]:
    import grpc

    from sampler_service.gen.sampler.v1 import sampler_pb2 as pb

    short = {"model": args.model, "solver": "dpmpp_2m", "steps": 10, "seeds": [11], "guidance": [2.0]}
    short |= conditioning(args.model, 5)
    long = pb.GenerateRequest(
        model=args.model,
        solver="heun",
        steps=1000,
        num_samples=64,
        base_seed=0,
        guidance=[2.0],
        **conditioning(args.model, 1, 1 if args.model not in TEXT_MODELS else 64),
    )
    out = []
    for mode in MODES:
        stub = servers.stubs[mode]
        _generate(stub, short)
        lone = [_generate(stub, short)[0] for _ in range(args.short)]
        stream = stub.Generate(long)
        events = iter(stream)
        while next(events).WhichOneof("event") != "progress":  # the long request is sampling
            pass
        latencies: list[float] = []
        timed_out = False
        for _ in range(args.short):
            try:
                latencies.append(_generate(stub, short, timeout=args.short_timeout)[0])
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                timed_out = True
                latencies.append(args.short_timeout)
                break
        stream.cancel()
        reference = statistics.median(lone)
        row = _row("long+short", mode, 2, len(latencies), len(latencies), sum(latencies), latencies, None, reference)
        row["timed_out"] = timed_out
        out.append(row)
        time.sleep(1.0)  # the cancelled request's rows leave
    return out


def _row(
    scenario: str,
    mode: str,
    clients: int,
    requests: int,
    images: int,
    seconds: float,
    latencies: list[float],
    mean_rows: float | None,
    reference: float | None,
) -> dict[str, Any]:
    p50 = statistics.median(latencies)
    return {
        "scenario": scenario,
        "mode": mode,
        "clients": clients,
        "requests": requests,
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "rows_per_s": None,
        "latency_p50_s": p50,
        "latency_p99_s": _percentile(latencies, 0.99),
        "mean_rows_per_forward": mean_rows,
        "reference_s": reference,
        "ratio": p50 / reference if reference is not None else None,
        "timed_out": False,
    }


def run(args: argparse.Namespace) -> int:
    meta = provenance.collect(options_of(args))  # at the start: the code and tree this run executes
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="serve-mixed-"))
    try:
        source, models_config = model_source(args.model, folder)
        model = models.load(source, device=args.device)
    except models.ModelError as error:
        raise BenchError(str(error)) from None
    rows: list[dict[str, Any]] = []
    if "forward" not in args.skip:
        rows += _forward_cost(model)
    if {"lone", "mixed", "long"} - set(args.skip):
        servers = Servers(args, models_config)
        try:
            if "lone" not in args.skip:
                rows += _lone(args, servers, model)
                for row in rows[-2:]:
                    print(f"lone, {row['mode']}: {row['latency_p50_s']:.4f} s, {row['ratio']:.3f} x in-process")
            if "mixed" not in args.skip:
                rows += _mixed(args, servers)
            if "long" not in args.skip:
                rows += _long_and_short(args, servers)
        finally:
            servers.close()
            shutil.rmtree(folder, ignore_errors=True)
    meta["device"]["torch_threads"] = torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    provenance.write_csv(args.out / "serve-mixed.csv", rows, COLUMNS)
    provenance.write_json(args.out / "serve-mixed.json", meta, rows)
    for row in rows:
        extra = f", ratio {row['ratio']:.3f}" if row["ratio"] is not None else ""
        fill = f", {row['mean_rows_per_forward']:.1f} rows/forward" if row["mean_rows_per_forward"] else ""
        print(
            f"{row['scenario']:>10} {row['mode']:>7} {row['clients']:>3} clients: {row['images_per_s']:.2f} images/s, "
            f"p50 {row['latency_p50_s']:.3f} s, p99 {row['latency_p99_s']:.3f} s{fill}{extra}"
            + (" (timed out)" if row["timed_out"] else "")
        )
    return 0
