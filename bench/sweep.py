"""Quality versus NFE for many solvers under one protocol: the Python API behind `fd-vs-nfe`.

    from bench.sweep import SweepConfig, run_sweep
    rows = run_sweep(SweepConfig(model="mnist", solvers=["euler", "dpmpp_2m"], nfe=[5, 10], num_samples=256),
                     out=Path("bench/results/my-run"))

Protocol, identical for every row:
- samples k = 0..N-1 use seed `seed_base + k` (one CPU generator per seed) and, for a
  class-conditional model, label `labels[k]`: the digits 0..9 repeated, shuffled by a generator
  seeded with `seed_base` (balanced and seeded); guidance, schedule and its parameters, AFS and
  dtype are options and columns;
- the reference is one high-accuracy run per (model, guidance, schedule range, seeds): `heun` with
  `reference_steps` steps on the `logsnr` schedule, validated against twice the steps on the first
  `reference_check` samples (that RMSE is printed and recorded; it must be far below the smallest
  error reported);
- an NFE a solver cannot spend exactly is a row with `reachable=false` and no metrics, never
  rounded to a neighbour.

Metrics: the in-domain Frechet distance on the project's MNIST classifier features against the
10,000 test images, its noise floor at the same N and a bootstrap 90% interval; class accuracy of
conditional samples; `rmse_ref`, the RMSE of each final sample against the reference from the same
noise, averaged; counted nfe and network_evals; wall time per sample.

Each row's statistics (features, per-sample reference error, predictions), not images, are cached
under `cache/` keyed by everything that defines the row, so an interrupted sweep resumes and a new
solver computes only its rows. The reference samples are cached the same way.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor

import models
import solvers
from models import provenance
from models.mnist.classifier import load_classifier

from .frechet import FeatureStats, frechet_distance
from .mnist_quality import MnistScorer, quantise

# The shared result schema (the AMED issue and the README use it too); never rename these.
COLUMNS = (
    "model",
    "model_fingerprint",
    "solver",
    "base",
    "schedule",
    "schedule_params",
    "afs",
    "guidance",
    "steps",
    "nfe",
    "network_evals",
    "num_samples",
    "tier",
    "fd_indomain",
    "fd_indomain_floor",
    "fd_ci_low",
    "fd_ci_high",
    "fid",
    "rmse_ref",
    "class_acc",
    "wall_s_per_sample",
    "device",
    "dtype",
    "batch",
    "tf32",
    "git_rev",
    "command",
    "reachable",
    "solver_params",
    "reference",
    "cached",
)
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 1234


class SweepConfig(BaseModel):
    """Everything that defines a sweep (validated; frozen)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = "mnist"
    solvers: list[str] = Field(min_length=1)
    solver_params: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per solver name")
    nfe: list[int] = Field(min_length=1)
    num_samples: int = Field(ge=2)
    schedule: str = "polynomial"
    schedule_params: dict[str, Any] = Field(default_factory=dict)
    afs: bool = False
    guidance: float = 1.0
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    device: str = "auto"
    batch_size: int = Field(250, ge=1)
    seed_base: int = Field(0, ge=0)
    reference_steps: int = Field(128, ge=2)
    reference_check: int = Field(64, ge=1)
    tier: str = "cpu"
    bootstrap: int = Field(BOOTSTRAP_RESAMPLES, ge=0)


@dataclass
class SweepContext:
    config: SweepConfig
    model: models.DiffusionModel
    scorer: MnistScorer | None
    seeds: list[int]
    labels: Tensor | None
    reference: Tensor
    reference_check_rmse: float
    cache: Path
    meta: dict[str, Any]


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def balanced_labels(count: int, classes: int, seed: int) -> Tensor:
    """The digits 0..classes-1 repeated to `count`, shuffled by a generator seeded with `seed`."""
    labels = torch.arange(count) % classes
    return labels[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]


def _sample(
    context: SweepContext,
    solver: str,
    steps: int,
    schedule: str,
    schedule_params: dict[str, Any],
    solver_params: dict[str, Any],
    afs: bool,
) -> tuple[Tensor, int, int, float]:
    """All N samples in batches: (images float32 CPU, nfe, network_evals per sample, seconds)."""
    config, model = context.config, context.model
    parts, nfe, evals = [], 0, 0
    began = time.perf_counter()
    for start in range(0, len(context.seeds), config.batch_size):
        stop = min(start + config.batch_size, len(context.seeds))
        noise = solvers.make_noise(context.seeds[start:stop], model.sample_shape, device=model.device)
        if context.labels is not None:
            denoiser = model.conditioned(context.labels[start:stop].to(model.device), config.guidance)
        else:
            denoiser = model.conditioned()
        with torch.inference_mode():
            result = solvers.sample(
                denoiser,
                noise,
                solver=solver,
                steps=steps,
                schedule=schedule,
                schedule_params=schedule_params,
                solver_params=solver_params,
                afs=afs,
            )
        parts.append(result.images.float().cpu())
        nfe, evals = result.nfe, result.network_evals
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(parts), nfe, evals, time.perf_counter() - began


def _reference(
    config: SweepConfig, model: models.DiffusionModel, seeds: list[int], labels: Tensor | None, cache: Path
) -> tuple[Tensor, float]:
    key = _hash(
        {
            "kind": "reference",
            "fingerprint": model.fingerprint,
            "guidance": config.guidance,
            "dtype": config.dtype,
            "seeds": [seeds[0], len(seeds)],
            "steps": config.reference_steps,
            "labels": labels.tolist() if labels is not None else None,
        }
    )
    path = cache / f"reference-{key}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return stored["samples"], float(stored["check_rmse"])
    context = SweepContext(config, model, None, seeds, labels, torch.empty(0), 0.0, cache, {})
    samples, _, _, _ = _sample(context, "heun", config.reference_steps, "logsnr", {}, {}, False)
    check = min(config.reference_check, len(seeds))
    context.seeds = seeds[:check]
    context.labels = labels[:check] if labels is not None else None
    finer, _, _, _ = _sample(context, "heun", 2 * config.reference_steps, "logsnr", {}, {}, False)
    check_rmse = float((samples[:check] - finer).pow(2).mean().sqrt())
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"samples": samples.contiguous(), "check_rmse": torch.tensor(check_rmse)}, str(path))
    return samples, check_rmse


def prepare(config: SweepConfig, cache: Path) -> SweepContext:
    model = models.load(config.model, device=config.device, dtype=config.dtype)
    mnist_like = model.sample_shape == (1, 28, 28)
    scorer = MnistScorer(load_classifier(), device=model.device) if mnist_like else None
    seeds = list(range(config.seed_base, config.seed_base + config.num_samples))
    labels = None
    if model.num_class_embeds is not None:
        classes = model.null_class if model.null_class is not None else model.num_class_embeds
        labels = balanced_labels(config.num_samples, classes, config.seed_base)
    reference, check = _reference(config, model, seeds, labels, cache)
    meta = provenance.collect(config.model_dump())
    return SweepContext(config, model, scorer, seeds, labels, reference, check, cache, meta)


def bootstrap_interval(
    features: Tensor, reference: FeatureStats, resamples: int, level: float = 0.9
) -> tuple[float, float]:
    """The central `level` interval of the Frechet distance over bootstrap resamples of the
    generated features (the reference statistics held fixed)."""
    if resamples == 0:
        return float("nan"), float("nan")
    generator = np.random.default_rng(BOOTSTRAP_SEED)
    values = features.double().numpy()
    count = values.shape[0]
    distances = [
        frechet_distance(FeatureStats.of(values[generator.integers(0, count, count)]), reference)
        for _ in range(resamples)
    ]
    low, high = np.quantile(distances, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def compute_row(context: SweepContext, solver: str, nfe: int) -> dict[str, Any]:
    """One row: cached statistics when present, else sample and score (and cache)."""
    config, model = context.config, context.model
    spec = solvers.SOLVERS.get(solver)
    solver_params = config.solver_params.get(solver, {})
    params = spec.parse_params(solver_params)
    steps = spec.steps_for_nfe(nfe, config.afs, params)
    base = {
        "model": config.model,
        "model_fingerprint": model.fingerprint,
        "solver": solver,
        "base": solver,
        "schedule": config.schedule,
        "schedule_params": json.dumps(config.schedule_params, sort_keys=True),
        "afs": config.afs,
        "guidance": config.guidance,
        "nfe": nfe,
        "num_samples": config.num_samples,
        "tier": config.tier,
        "device": str(model.device),
        "dtype": config.dtype,
        "batch": config.batch_size,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "git_rev": (context.meta.get("git") or {}).get("revision"),
        "command": context.meta.get("command"),
        "solver_params": json.dumps(solver_params, sort_keys=True),
        "reference": f"heun {config.reference_steps} steps logsnr (2x check rmse {context.reference_check_rmse:.2e})",
    }
    if steps is None:
        return {**base, "steps": None, "reachable": False, "cached": False}
    key = _hash(
        {
            "row": {
                k: base[k]
                for k in (
                    "model_fingerprint",
                    "solver",
                    "schedule",
                    "schedule_params",
                    "afs",
                    "guidance",
                    "nfe",
                    "num_samples",
                    "dtype",
                    "solver_params",
                )
            },
            "seed_base": config.seed_base,
            "reference_steps": config.reference_steps,
        }
    )
    path = context.cache / f"row-{key}.safetensors"
    cached = path.is_file()
    if cached:
        stored = load_file(str(path))
        metadata = json.loads(stored_meta(path))
    else:
        images, counted_nfe, evals, seconds = _sample(
            context, solver, steps, config.schedule, config.schedule_params, solver_params, config.afs
        )
        stored = {"rmse": (images - context.reference).flatten(1).pow(2).mean(1).sqrt().contiguous()}
        if context.scorer is not None:
            features = context.scorer.features(quantise(images))
            with torch.inference_mode():
                predicted = context.scorer.classifier.classify(features.to(context.scorer.device)).argmax(1).cpu()
            stored.update(features=features.float().contiguous(), predicted=predicted.contiguous())
        metadata = {"nfe": counted_nfe, "network_evals": evals, "seconds": seconds, "steps": steps}
        context.cache.mkdir(parents=True, exist_ok=True)
        save_file(stored, str(path), metadata={"row": json.dumps(metadata)})
    row = {
        **base,
        "steps": steps,
        "reachable": True,
        "cached": cached,
        "nfe": metadata["nfe"],
        "network_evals": metadata["network_evals"],
        "wall_s_per_sample": metadata["seconds"] / config.num_samples,
        "rmse_ref": float(stored["rmse"].mean()),
        "fid": None,
    }
    if context.scorer is not None and "features" in stored:
        features = stored["features"]
        if features.shape[0] <= features.shape[1]:
            warnings.warn(
                f"{features.shape[0]} samples for {features.shape[1]} feature dimensions: the covariance "
                "is singular and the Frechet distance is biased; use more samples",
                stacklevel=2,
            )
        row["fd_indomain"] = frechet_distance(FeatureStats.of(features), context.scorer.test_stats)
        row["fd_indomain_floor"] = context.scorer.noise_floor(config.num_samples)
        row["fd_ci_low"], row["fd_ci_high"] = bootstrap_interval(features, context.scorer.test_stats, config.bootstrap)
        if context.labels is not None:
            row["class_acc"] = float((stored["predicted"] == context.labels).double().mean())
    return row


def stored_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {})["row"]


def run_sweep(
    config: SweepConfig, out: Path, cache: Path | None = None, on_row: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Compute (or load) every row, write out/results.csv and .json and the plot; return the rows."""
    cache = cache if cache is not None else out / "cache"
    context = prepare(config, cache)
    rows = []
    for solver in config.solvers:
        for nfe in config.nfe:
            row = compute_row(context, solver, nfe)
            rows.append(row)
            if on_row is not None:
                on_row(row)
    meta = {**context.meta, "reference_check_rmse": context.reference_check_rmse}
    provenance.write_csv(out / "results.csv", rows, COLUMNS)
    provenance.write_json(out / "results.json", meta, rows)
    plot(rows, out / "fd-vs-nfe.png")
    return rows


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Metric vs NFE, one line per solver (in-domain FD when present, else rmse_ref), log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: no plot", stacklevel=2)
        return None
    metric = "fd_indomain" if any(r.get("fd_indomain") is not None for r in rows) else "rmse_ref"
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, name in zip(axes, (metric, "rmse_ref"), strict=True):
        for solver in dict.fromkeys(r["solver"] for r in rows):
            points = [(r["nfe"], r[name]) for r in rows if r["solver"] == solver and r.get(name) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=solver)
        floor = [r.get("fd_indomain_floor") for r in rows if r.get("fd_indomain_floor") is not None]
        if name == "fd_indomain" and floor:
            ax.axhline(floor[0], color="gray", linestyle="--", label="noise floor")
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = [
    "COLUMNS",
    "SweepConfig",
    "balanced_labels",
    "bootstrap_interval",
    "compute_row",
    "plot",
    "prepare",
    "run_sweep",
]
