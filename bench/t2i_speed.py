"""`t2i-speed`: what a text-to-image request costs, part by part, on tiny random SD / SDXL pipelines.

    python -m bench t2i-speed                       # both tiny pipelines, on this host's CPU
    python -m bench t2i-speed --model /path/to/sd15 --height 512 --width 512 --device cuda
    python -m bench t2i-speed --full-size sd15 --full-size sdxl --device cuda --dtype float16 \
        --batch 8 --compare-diffusers --name t2i-speed-gpu-b8   # random weights, real architectures

For each model the same request (--batch prompts, guidance --guidance, so both halves run) is
measured in --rounds paired rounds; each round times, back to back:
- NFE denoiser forwards at this batch and size, back to back (the loop's unavoidable work; timed
  as one block, so that a slow call under load weighs in both measurements alike);
- the whole sampling run (`solvers.sample`, --solver, --steps) on the same denoiser;
- text encoding of the batch's prompts with an empty prompt cache (what a new prompt costs);
- VAE decoding of the batch's latents.
The goal is sampling time / (NFE x one forward) <= 1.05: the solver adds no more than 5% to the
network. Text encoding and decoding are reported on their own (per request, not per step). Medians
over rounds; the ratio is the median of the per-round ratios.

With --compare-diffusers each round also runs diffusers' own pipeline on the same folder, with the
matching scheduler (EulerDiscreteScheduler for euler, DPMSolverMultistepScheduler for dpmpp_2m),
the same steps, guidance and latents and precomputed prompt embeddings (`output_type="latent"`), and
ours (binding the cached prompts, then sampling) back to back: ours / diffusers' loop, the median of
the paired rounds (goal <= 1.0 on a GPU).

Tiny pipelines are built in a temporary folder (models/tiny_pipelines.py) and loaded through
`models.load`, as the service loads a real folder. Writes bench/results/t2i-speed.csv and .json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import models
import provenance
import solvers
from models.full_size_pipelines import FULL_SIZE_KINDS, save_full_size_pipeline
from models.tiny_pipelines import TINY_KINDS, save_tiny_pipeline

from .arguments import options_of, positive_int
from .errors import BenchError

NAME = "t2i-speed"
RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = ("a photograph of an astronaut riding a horse", "a watercolor of mountains at sunrise", "a red fox")
COLUMNS = (
    "model",
    "pipeline",
    "batch",
    "height",
    "width",
    "latent_shape",
    "solver",
    "steps",
    "nfe",
    "guidance",
    "forward_ms",
    "sampling_ms",
    "sampling_over_nfe_forwards",
    "goal",
    "text_encoding_ms",
    "vae_decoding_ms",
    "ours_loop_ms",
    "diffusers_loop_ms",
    "ours_over_diffusers_loop",
    "rounds",
    "device",
    "dtype",
    "torch_threads",
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="text-to-image cost: sampling vs NFE forwards, text encoding, VAE decoding",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", action="append", default=[], help="a pipeline source (repeat); default: the tiny sd and sdxl"
    )
    parser.add_argument(
        "--full-size",
        action="append",
        default=[],
        choices=FULL_SIZE_KINDS,
        help="a random-weight pipeline with the real SD 1.5 / SDXL architecture (repeat; built in a temporary folder)",
    )
    parser.add_argument("--name", default=NAME, help="results file stem (default t2i-speed)")
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--height", type=int, default=0, help="pixels; 0 = the model's default")
    parser.add_argument("--width", type=int, default=0, help="pixels; 0 = the model's default")
    parser.add_argument("--solver", default="dpmpp_2m")
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--rounds", type=positive_int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--compare-diffusers", action="store_true", help="also time diffusers' pipeline loop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.set_defaults(handler=run)


def _timed(action: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    began = time.perf_counter()
    action()
    _sync(device)
    return time.perf_counter() - began


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: models.TextToImageModel, args: argparse.Namespace) -> dict[str, Any]:
    height = args.height or model.default_size[0]
    width = args.width or model.default_size[1]
    shape = model.latent_shape(height, width)
    prompts = [PROMPTS[k % len(PROMPTS)] for k in range(args.batch)]
    seeds = list(range(args.batch))
    denoiser = model.conditioned(prompts, None, args.guidance, height=height, width=width)
    noise = solvers.make_noise(seeds, shape, device=model.device)
    nfe = solvers.nfe_of(args.solver, args.steps)
    sigma = torch.full((args.batch,), model.sigma_max / 3, device=model.device)
    x = noise * model.sigma_max / 3
    fresh = models.PromptCache(0)
    encoder = model.prompts
    forwards, runs, ratios, encodes, decodes = [], [], [], [], []
    latents = None
    with torch.inference_mode():
        for _ in range(2):  # warm-up: allocator, kernels, lazy inits
            denoiser(x, sigma)
            latents = solvers.sample(denoiser, noise, solver=args.solver, steps=args.steps).images
            model.decode(latents)
        assert latents is not None
        for _ in range(args.rounds):
            forward = _timed(lambda: [denoiser(x, sigma) for _ in range(nfe)], model.device) / nfe
            run = _timed(lambda: solvers.sample(denoiser, noise, solver=args.solver, steps=args.steps), model.device)
            cached, encoder.cache = encoder.cache, fresh  # every text is new to an empty cache
            try:
                encodes.append(_timed(lambda: encoder.encode(prompts), model.device))
            finally:
                encoder.cache = cached
            decodes.append(_timed(lambda: model.decode(latents), model.device))
            forwards.append(forward)
            runs.append(run)
            ratios.append(run / (nfe * forward))
    compared = _compare_diffusers(model, args, prompts, noise, height, width) if args.compare_diffusers else {}
    return {
        **compared,
        "batch": args.batch,
        "height": height,
        "width": width,
        "latent_shape": "x".join(str(n) for n in shape),
        "solver": args.solver,
        "steps": args.steps,
        "nfe": nfe,
        "guidance": args.guidance,
        "forward_ms": 1e3 * statistics.median(forwards),
        "sampling_ms": 1e3 * statistics.median(runs),
        "sampling_over_nfe_forwards": statistics.median(ratios),
        "goal": "<= 1.05",
        "text_encoding_ms": 1e3 * statistics.median(encodes),
        "vae_decoding_ms": 1e3 * statistics.median(decodes),
        "rounds": args.rounds,
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }


def _compare_diffusers(
    model: models.TextToImageModel,
    args: argparse.Namespace,
    prompts: list[str],
    noise: torch.Tensor,
    height: int,
    width: int,
) -> dict[str, Any]:
    """Paired rounds of our loop and diffusers' pipeline loop (see the module docstring)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    pipelines = {
        "StableDiffusionPipeline": StableDiffusionPipeline,
        "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    }
    schedulers: dict[str, Callable[[Any], Any]] = {
        "euler": lambda config: EulerDiscreteScheduler.from_config(config),
        "dpmpp_2m": lambda config: DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        ),
    }
    if args.solver not in schedulers:
        raise BenchError(f"--solver {args.solver}: --compare-diffusers knows {', '.join(schedulers)}")
    pipeline = (
        pipelines[model.pipeline_class]
        .from_pretrained(model.source, local_files_only=True, dtype=model.dtype)
        .to(model.device)
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = schedulers[args.solver](pipeline.scheduler.config)
    with torch.inference_mode():
        encoded = pipeline.encode_prompt(
            prompts, device=model.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    embeddings = dict(zip(names, encoded, strict=False))
    start = noise.to(model.dtype)

    def theirs() -> object:
        return pipeline(
            **embeddings,
            guidance_scale=args.guidance,
            num_inference_steps=args.steps,
            height=height,
            width=width,
            latents=start.clone(),
            output_type="latent",
        ).images

    def ours() -> object:
        denoiser = model.conditioned(prompts, None, args.guidance, height=height, width=width)
        return solvers.sample(denoiser, noise, solver=args.solver, steps=args.steps).images

    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    with torch.inference_mode():
        theirs(), ours()  # warm-up
        for _ in range(args.rounds):
            times["ours"].append(_timed(ours, model.device))
            times["theirs"].append(_timed(theirs, model.device))
    ratios = [a / b for a, b in zip(times["ours"], times["theirs"], strict=True)]
    return {
        "ours_loop_ms": 1e3 * statistics.median(times["ours"]),
        "diffusers_loop_ms": 1e3 * statistics.median(times["theirs"]),
        "ours_over_diffusers_loop": statistics.median(ratios),
    }


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = provenance.collect(options_of(args))  # at the start: the code and tree this run executes
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        sources, names = list(args.model), list(args.model)
        for kind in args.full_size:  # saved in the run's dtype: the files are what a user would have
            dtype = models.loading.resolve_dtype(args.dtype)
            sources.append(str(save_full_size_pipeline(kind, Path(folder) / kind, dtype=dtype)))
            names.append(f"random-{kind}")
        if not sources:
            sources = [str(save_tiny_pipeline(kind, Path(folder) / kind)) for kind in TINY_KINDS]
            names = [f"tiny-{kind}" for kind in TINY_KINDS]
        for name, source in zip(names, sources, strict=True):
            try:
                model = models.load(source, name=name, device=args.device, dtype=args.dtype)
            except models.ModelError as error:
                raise BenchError(f"--model {source}: {error}") from None
            if not isinstance(model, models.TextToImageModel):
                raise BenchError(f"--model {source}: expected a text-to-image pipeline, found a {model.kind} model")
            try:
                row = {"model": name, "pipeline": model.pipeline_class, **measure(model, args)}
            except models.ModelError as error:
                raise BenchError(str(error)) from None
            rows.append(row)
            if "ours_over_diffusers_loop" in row:
                print(
                    f"{name}: ours / diffusers' pipeline loop {row['ours_over_diffusers_loop']:.3f} "
                    f"({row['ours_loop_ms']:.1f} vs {row['diffusers_loop_ms']:.1f} ms)"
                )
            print(
                f"{name}: sampling / (NFE x forward) {row['sampling_over_nfe_forwards']:.3f} (goal <= 1.05); "
                f"forward {row['forward_ms']:.2f} ms, sampling {row['sampling_ms']:.1f} ms at NFE {row['nfe']}, "
                f"text encoding {row['text_encoding_ms']:.2f} ms, VAE decoding {row['vae_decoding_ms']:.2f} ms "
                f"(batch {row['batch']}, {row['height']}x{row['width']})"
            )
    provenance.write_csv(args.out / f"{args.name}.csv", rows, COLUMNS)
    provenance.write_json(args.out / f"{args.name}.json", meta, rows)
    return 0


__all__ = ["add_parser", "measure", "run"]
