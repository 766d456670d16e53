"""`model-card`: measure the quality and speed of the embedded `mnist` model and record them in its
model card.

    python -m bench model-card                         # CPU defaults: 2,000 guided + 1,000 unguided
    python -m bench model-card --per-digit 1000 --unguided 10000   # the GPU-sized run

- class-conditional samples (--per-digit per digit, guidance --guidance) classified by the
  project's MNIST classifier as their requested digit (the bar: >= 97%);
- unconditional (null-class) samples: the digit histogram (the bar: all ten digits, none above 15%);
- the in-domain Frechet distance (classifier features) of both sets to the 10,000 test images,
  next to the noise floor at the same N (N real test images against the other 10,000 - N);
- speed: UNet evaluations per second at --speed-batch (median of --speed-repeats timed forwards).

Seeds are 0..N-1 (per set), one generator per seed. Writes bench/results/model-card-<model>.json and
.csv, the model folder's quality.json, and re-renders its README.md (unless --no-card).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import models
import provenance
import solvers
from models.mnist.architecture import NUM_CLASSES
from models.mnist.card import write_diffusion_card
from models.mnist.classifier import DEFAULT_CLASSIFIER, load_classifier

from .arguments import options_of, positive_int
from .errors import BenchError
from .mnist_quality import MnistScorer

NAME = "model-card"
RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = ("set", "n", "sampler", "guidance", "metric", "value", "result")


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="measure the embedded MNIST model's quality and speed; update its model card",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mnist", help="built-in name or folder of an MNIST-shaped model")
    parser.add_argument("--classifier", type=Path, default=DEFAULT_CLASSIFIER)
    parser.add_argument("--per-digit", type=positive_int, default=200, help="guided samples per digit")
    parser.add_argument("--unguided", type=positive_int, default=1000, help="null-class samples")
    parser.add_argument("--solver", default="heun")
    parser.add_argument("--steps", type=positive_int, default=18)
    parser.add_argument("--schedule", default="polynomial")
    parser.add_argument(
        "--guidance",
        type=float,
        nargs="+",
        default=[2.0, 1.0],
        help="w of D_u + w (D_c - D_u), one guided set per value (default: 2 and 1)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=250)
    parser.add_argument("--speed-batch", type=positive_int, default=256)
    parser.add_argument("--speed-repeats", type=positive_int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=positive_int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--card",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write quality.json and README.md into the model folder",
    )
    parser.set_defaults(handler=run)


def _generate(
    model: models.DiffusionModel, labels: torch.Tensor | None, count: int, guidance: float, args: argparse.Namespace
) -> tuple[torch.Tensor, int]:
    """count images (seeds 0..count-1) and the counted NFE per sample."""
    parts, nfe = [], 0
    for start in range(0, count, args.batch_size):
        stop = min(start + args.batch_size, count)
        batch_labels = labels[start:stop] if labels is not None else None
        denoiser = model.conditioned(batch_labels, guidance) if batch_labels is not None else model.conditioned()
        noise = solvers.make_noise(list(range(start, stop)), model.sample_shape, device=model.device)
        with torch.inference_mode():
            result = solvers.sample(denoiser, noise, solver=args.solver, steps=args.steps, schedule=args.schedule)
        parts.append(result.images.cpu())
        nfe = result.nfe
    return torch.cat(parts), nfe


def _speed(model: models.DiffusionModel, args: argparse.Namespace) -> float:
    """UNet evaluations per second at the speed batch (the conditional pass alone)."""
    batch = args.speed_batch
    labels = torch.arange(batch) % NUM_CLASSES
    denoiser = model.conditioned(labels, 1.0)
    x = torch.randn(batch, *model.sample_shape, generator=torch.Generator().manual_seed(0)).to(model.device)
    sigma = torch.full((batch,), 1.0, device=model.device)
    times = []
    with torch.inference_mode():
        denoiser(x, sigma)  # warm-up
        for _ in range(args.speed_repeats):
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            denoiser(x, sigma)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    return batch / statistics.median(times)


def _frechet_landmarks(scorer: MnistScorer, count: int) -> list[dict[str, Any]]:
    """Where the in-domain Frechet distance of known image sets lies, so a model's value can be read:
    uniform noise, and the first `count` test images blurred by a 3x3 box filter."""
    noise = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    blurred = torch.nn.functional.avg_pool2d(scorer.test_images[:count], 3, stride=1, padding=1)
    return [
        {
            "set": name,
            "n": count,
            "sampler": "",
            "guidance": None,
            "metric": "frechet_distance",
            "value": scorer.frechet_to_test(scorer.score(images)),
            "result": "",
        }
        for name, images in (("uniform noise", noise), ("test images, 3x3 box blur", blurred))
    ]


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    meta = provenance.collect(options_of(args))  # at the start: the code and tree this run executes
    try:
        model = models.class_conditional(models.load(args.model, device=args.device))
        scorer = MnistScorer(load_classifier(args.classifier), device=model.device)
    except models.ModelError as error:
        raise BenchError(str(error)) from None
    if model.null_class is None or model.sample_shape != (1, 28, 28):
        raise BenchError(f"--model {args.model}: expected a class-conditional 28x28 model with a null class")
    sampler_steps = f"{args.solver} {args.steps} steps, {args.schedule} schedule"
    rows: list[dict[str, Any]] = []

    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_digit)
    n_guided = labels.numel()
    timings: dict[str, float] = {}
    per_digit_by_w: dict[str, list[float]] = {}
    sampler = sampler_steps
    for guidance in args.guidance:
        began = time.perf_counter()
        guided, nfe = _generate(model, labels, n_guided, guidance, args)
        timings[f"guided_w{guidance}_seconds"] = round(time.perf_counter() - began, 1)
        sampler = f"{sampler_steps} ({nfe} NFE)"
        scores = scorer.score(guided)
        accuracy = scores.accuracy(labels)
        per_digit = [float((scores.predicted[labels == d] == d).double().mean()) for d in range(NUM_CLASSES)]
        per_digit_by_w[str(guidance)] = per_digit
        worst = min(range(NUM_CLASSES), key=lambda d: per_digit[d])
        rows += [
            {
                "set": "guided",
                "n": n_guided,
                "sampler": sampler,
                "guidance": guidance,
                "metric": "class_accuracy",
                "value": accuracy,
                "result": f"{100 * accuracy:.2f}% classified as the requested digit; "
                f"worst digit {worst}: {100 * per_digit[worst]:.1f}%",
            },
            {
                "set": "guided",
                "n": n_guided,
                "sampler": sampler,
                "guidance": guidance,
                "metric": "frechet_distance",
                "value": scorer.frechet_to_test(scores),
                "result": "",
            },
        ]
    rows.append(
        {
            "set": "real test images",
            "n": n_guided,
            "sampler": "",
            "guidance": None,
            "metric": "frechet_noise_floor",
            "value": scorer.noise_floor(n_guided),
            "result": "",
        }
    )
    unguided, _ = _generate(model, None, args.unguided, 1.0, args)
    null_scores = scorer.score(unguided)
    shares = null_scores.histogram()
    covered = sum(share > 0 for share in shares)
    rows += [
        {
            "set": "unguided (null class)",
            "n": args.unguided,
            "sampler": sampler,
            "guidance": None,
            "metric": "max_digit_share",
            "value": max(shares),
            "result": f"{covered}/10 digits present, largest share {100 * max(shares):.1f}% (digit "
            f"{shares.index(max(shares))}), smallest {100 * min(shares):.1f}% (bar: all ten, none above 15%)",
        },
        {
            "set": "unguided (null class)",
            "n": args.unguided,
            "sampler": sampler,
            "guidance": None,
            "metric": "frechet_distance",
            "value": scorer.frechet_to_test(null_scores),
            "result": "",
        },
        {
            "set": "real test images",
            "n": args.unguided,
            "sampler": "",
            "guidance": None,
            "metric": "frechet_noise_floor",
            "value": scorer.noise_floor(args.unguided),
            "result": "",
        },
        *_frechet_landmarks(scorer, n_guided),
        {
            "set": "real test images",
            "n": 10_000,
            "sampler": "",
            "guidance": None,
            "metric": "classifier_accuracy",
            "value": scorer.test_accuracy(),
            "result": "",
        },
    ]
    speed = _speed(model, args)
    rows.append(
        {
            "set": f"speed, batch {args.speed_batch}",
            "n": args.speed_batch,
            "sampler": "",
            "guidance": None,
            "metric": "unet_evals_per_second",
            "value": speed,
            "result": f"{speed:.0f} img-evals/s on {model.device} ({torch.get_num_threads()} threads)",
        }
    )
    for row in rows:
        if not row["result"]:
            row["result"] = f"{row['value']:.3f}"
    meta.update(
        model=model.name,
        fingerprint=model.fingerprint,
        per_digit_accuracy=per_digit_by_w,
        unguided_histogram=shares,
        **timings,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"model-card-{Path(str(args.model)).name}"
    provenance.write_csv(args.out / f"{stem}.csv", rows, COLUMNS)
    provenance.write_json(args.out / f"{stem}.json", meta, rows)
    if args.card:
        folder = models.loading.find_files(args.model).root
        (folder / "quality.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8"
        )
        write_diffusion_card(folder)
    for row in rows:
        print(f"{row['set']:<24} {row['metric']:<22} {row['result']}")
    return 0
