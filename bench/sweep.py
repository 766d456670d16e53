"""Quality versus NFE for many solvers under one protocol: the Python API behind `fd-vs-nfe`.

    from bench.sweep import SweepConfig, run_sweep
    rows = run_sweep(SweepConfig(model="mnist", solvers=["euler", "dpmpp_2m"], nfe=[5, 10], num_samples=256),
                     out=Path("bench/results/my-run"))

Protocol, identical for every row:
- samples k = 0..N-1 use seed `seed_base + k` (one CPU generator per seed) and, for a
  class-conditional model, label `labels[k]`: the digits 0..9 repeated, shuffled by a generator
  seeded with `seed_base` (balanced and seeded); guidance, schedule and its parameters, AFS and
  dtype are options and columns;
- the reference is one high-accuracy run per (model, guidance, dtype, seeds): `heun` with
  `reference_steps` steps on the `logsnr` schedule over the model's full sigma range, validated
  against twice the steps on the first `reference_check` samples (that RMSE is printed and
  recorded; it must be far below the smallest error reported). `reference_steps=0` runs without
  one: `rmse_ref` stays empty and the rows carry the image metrics only, so a large N (where the
  Frechet distance resolves what N = 1,000 cannot) costs the rows' own evaluations, not a
  255-evaluation reference per sample;
- an NFE a solver cannot spend exactly is a row with `reachable=false` and no metrics, never
  rounded to a neighbour.

Metrics: the in-domain Frechet distance on the project's MNIST classifier features against the
10,000 test images, its noise floor at the same N and a bias-corrected bootstrap 90% interval; class accuracy of
conditional samples (the reference's own FD, interval and class accuracy go into the results' meta: the
value every row tends to as NFE grows); `rmse_ref`, the RMSE of each final sample against the reference from the same
noise, averaged; FID when asked for (bench/fid.py); counted nfe and network_evals; wall time per
sample (summed over processes).

Work is cut into chunks of `batch_size` samples: chunk c holds samples c*B .. (c+1)*B - 1, always
sampled as one batch, so results do not depend on how many processes ran them. Each chunk's
statistics (classifier features, per-sample reference error, predictions, Inception features
until the row is complete; never images, except a few previews for the sample grid) are cached
under `cache/`, keyed by everything that defines them: an interrupted sweep resumes chunk by
chunk and a new solver computes only its rows. The reference is cached the same way.

Multi-process: under `accelerate launch` (e.g. `--num_processes 8` on 8 GPUs, or `--cpu
--num_processes 2`) process r computes the chunks c with c % world == r, the processes meet at
a barrier, and the main process assembles the rows from the chunk files and writes the outputs.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

import models
import provenance
import solvers
from solvers.amed import PredictorKey, PredictorStore, predictor_key, read_card
from solvers.learned import ANY_METHOD, grid_key

from .errors import BenchError
from .fid import FidExtractor, FidUnavailable
from .frechet import FeatureStats, frechet_distance
from .mnist_quality import MnistScorer, quantise

# The shared result schema (the AMED issue and docs/ use it too); never rename these.
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
    "processes",
    "predictor",
    "predictor_training_s",
    "predictor_trajectories",
    "predictor_sha256",
    "grid",
    "grid_method",
    "grid_sigmas",
    "cached",
)
BOOTSTRAP_RESAMPLES = 200
BOOTSTRAP_SEED = 1234
REFERENCE_SOLVER, REFERENCE_SCHEDULE = "heun", "logsnr"


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
    reference_steps: int = Field(128, ge=0, description="0: no reference (rmse_ref empty); else >= 2")
    reference_check: int = Field(64, ge=1)
    tier: str = "cpu"
    bootstrap: int = Field(BOOTSTRAP_RESAMPLES, ge=0)
    fid: bool = False
    fid_weights: str | None = None
    fid_reference: str | None = Field(None, description="image folder or .npz of statistics; default MNIST test")
    grid: int = Field(10, ge=0, le=64, description="samples per solver in the sample grids")
    predictor_dirs: list[str] = Field(default_factory=list, description="AMED predictor folders, before the model's")

    @field_validator("reference_steps")
    @classmethod
    def _reference_steps(cls, value: int) -> int:
        if value == 1:
            raise ValueError("reference_steps=1 is out of range: expected 0 (no reference) or >= 2")
        return value

    @property
    def has_reference(self) -> bool:
        return self.reference_steps > 0


class Distributed(Protocol):
    """What the sweep needs of accelerate's PartialState."""

    process_index: int
    num_processes: int
    is_main_process: bool
    device: torch.device

    def wait_for_everyone(self) -> None: ...


@dataclass
class SingleProcess:
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def wait_for_everyone(self) -> None:
        return None


def distributed_state(device: str = "auto") -> Distributed:
    """accelerate's process state under a distributed launch, else a single process.

    Without a GPU (or with device "cpu") the processes meet over gloo: accelerate only does that
    when asked for the CPU, so it is asked here. Launch several CPU processes with
    `accelerate launch --multi_gpu --num_processes N` (torchrun underneath); in accelerate 1.x
    `accelerate launch --cpu --num_processes N` starts one process unless given an MPI hostfile.
    """
    try:
        from accelerate import PartialState
    except ImportError:
        return SingleProcess()
    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    return state if state.num_processes > 1 else SingleProcess()


@dataclass
class SweepContext:
    config: SweepConfig
    model: models.DiffusionModel
    scorer: MnistScorer | None
    fid: FidExtractor | None
    fid_note: str | None
    seeds: list[int]
    labels: Tensor | None
    cache: Path
    reference_key: str
    meta: dict[str, Any]
    state: Distributed
    predictors: PredictorStore = field(default_factory=lambda: PredictorStore([]))
    reference_check_rmse: float = float("nan")
    reference_chunks: dict[int, Tensor] = field(default_factory=dict)

    @property
    def chunks(self) -> list[tuple[int, int, int]]:
        """(index, start, stop) of every chunk."""
        size = self.config.batch_size
        return [(c, s, min(s + size, len(self.seeds))) for c, s in enumerate(range(0, len(self.seeds), size))]

    def owned(self) -> list[tuple[int, int, int]]:
        return [chunk for chunk in self.chunks if chunk[0] % self.state.num_processes == self.state.process_index]


def _hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def balanced_labels(count: int, classes: int, seed: int) -> Tensor:
    """The digits 0..classes-1 repeated to `count`, shuffled by a generator seeded with `seed`."""
    labels = torch.arange(count) % classes
    return labels[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]


def _sample_chunk(
    context: SweepContext,
    start: int,
    stop: int,
    solver: str,
    steps: int,
    schedule: str,
    schedule_params: dict[str, Any],
    solver_params: dict[str, Any],
    afs: bool,
    predictor: Any = None,
    grid: Tensor | None = None,
) -> tuple[Tensor, int, int, float]:
    """Samples start..stop-1 as one batch: (images float32 CPU, nfe, network_evals per sample, seconds)."""
    config, model = context.config, context.model
    began = time.perf_counter()
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
            predictor=predictor,
            grid=grid,
        )
        images = result.images.float().cpu()  # the copy to the CPU waits for the device
    return images, result.nfe, result.network_evals, time.perf_counter() - began


def _reference_path(context: SweepContext, chunk: int) -> Path:
    return context.cache / f"reference-{context.reference_key}-c{chunk}.safetensors"


def _check_path(context: SweepContext) -> Path:
    return context.cache / f"reference-{context.reference_key}-check.safetensors"


def _reference_chunk(context: SweepContext, chunk: int, start: int, stop: int) -> Tensor:
    """The reference samples of one chunk (computed and cached by the process that owns it)."""
    if chunk in context.reference_chunks:
        return context.reference_chunks[chunk]
    path = _reference_path(context, chunk)
    if path.is_file():
        samples = load_file(str(path))["samples"]
    else:
        steps = context.config.reference_steps
        samples, _, _, _ = _sample_chunk(
            context, start, stop, REFERENCE_SOLVER, steps, REFERENCE_SCHEDULE, {}, {}, False
        )
        context.cache.mkdir(parents=True, exist_ok=True)
        save_file({"samples": samples.contiguous()}, str(path))
    context.reference_chunks[chunk] = samples
    return samples


def _reference_check(context: SweepContext) -> None:
    """RMSE of the first `reference_check` reference samples against twice the steps (chunk 0's owner)."""
    path = _check_path(context)
    if path.is_file() or context.state.process_index != 0:
        return
    _, start, stop = context.chunks[0]
    stop = min(stop, start + context.config.reference_check)
    finer, _, _, _ = _sample_chunk(
        context, start, stop, REFERENCE_SOLVER, 2 * context.config.reference_steps, REFERENCE_SCHEDULE, {}, {}, False
    )
    reference = _reference_chunk(context, *context.chunks[0])[: stop - start]
    rmse = (reference - finer).pow(2).mean().sqrt()
    save_file({"check_rmse": rmse.reshape(1)}, str(path))


def _seeds_and_labels(config: SweepConfig, model: models.DiffusionModel) -> tuple[list[int], Tensor | None]:
    seeds = list(range(config.seed_base, config.seed_base + config.num_samples))
    labels = None
    if model.num_class_embeds is not None:
        classes = model.null_class if model.null_class is not None else model.num_class_embeds
        labels = balanced_labels(config.num_samples, classes, config.seed_base)
    return seeds, labels


def _reference_key(config: SweepConfig, fingerprint: str, labels: Tensor | None) -> str:
    return _hash(
        {
            "kind": "reference",
            "fingerprint": fingerprint,
            "guidance": config.guidance,
            "dtype": config.dtype,
            "seeds": [config.seed_base, config.num_samples],
            "batch": config.batch_size,
            "steps": config.reference_steps,
            "labels": labels.tolist() if labels is not None else None,
        }
    )


def benchmark_targets(
    config: SweepConfig, cache: Path, model: models.DiffusionModel
) -> tuple[list[int], Tensor | None, Tensor]:
    """A sweep's noise seeds, labels and reference samples, read from its cache and never computed:
    what every row of that sweep is scored against (the oracle grid of `sampler-amed oracle-grid`
    is fitted to exactly these).

    Raises:
        BenchError: a reference chunk is missing from `cache` (run the sweep first).
    """
    if not config.has_reference:
        raise BenchError("reference_steps=0: a sweep without a reference has no targets to fit")
    seeds, labels = _seeds_and_labels(config, model)
    key = _reference_key(config, model.fingerprint, labels)
    parts = []
    for chunk, start in enumerate(range(0, config.num_samples, config.batch_size)):
        path = cache / f"reference-{key}-c{chunk}.safetensors"
        if not path.is_file():
            raise BenchError(f"{path}: no reference chunk {chunk} for this sweep in {cache} (run the sweep first)")
        samples = load_file(str(path))["samples"]
        if samples.shape[0] != min(config.batch_size, config.num_samples - start):
            raise BenchError(f"{path}: {samples.shape[0]} samples, expected chunk {chunk} of {config.num_samples}")
        parts.append(samples)
    return seeds, labels, torch.cat(parts)


def prepare(config: SweepConfig, cache: Path, state: Distributed | None = None) -> SweepContext:
    """Load the model and the scorers, fix seeds and labels, and compute (or load) the reference."""
    state = state if state is not None else distributed_state(config.device)
    device = str(state.device) if state.num_processes > 1 and config.device == "auto" else config.device
    model = models.class_conditional(models.load(config.model, device=device, dtype=config.dtype))
    mnist_like = model.sample_shape == (1, 28, 28)
    scorer = MnistScorer.shared(model.device) if mnist_like else None
    fid, fid_note = None, None
    if config.fid:
        try:
            fid = FidExtractor(config.fid_weights, device=model.device)
        except FidUnavailable as error:
            fid_note = f"FID not computed: {error}"
            if state.is_main_process:
                warnings.warn(fid_note, stacklevel=2)
    seeds, labels = _seeds_and_labels(config, model)
    reference_key = _reference_key(config, model.fingerprint, labels)
    meta = provenance.collect(config.model_dump())
    context = SweepContext(config, model, scorer, fid, fid_note, seeds, labels, cache, reference_key, meta, state)
    folders = [*map(Path, config.predictor_dirs), models.loading.find_files(config.model).root / "amed"]  # yours win
    context.predictors = PredictorStore([folder for folder in folders if folder.is_dir()])
    if not config.has_reference:
        return context
    for chunk in tqdm(context.owned(), desc="reference", disable=not state.is_main_process, leave=False):
        _reference_chunk(context, *chunk)
    _reference_check(context)
    state.wait_for_everyone()
    context.reference_check_rmse = float(load_file(str(_check_path(context)))["check_rmse"][0])
    return context


def reference_scores(context: SweepContext) -> dict[str, Any]:
    """The image metrics of the reference samples themselves (main process, after the reference
    exists): what every row converges to as its NFE grows. A row can sit below it by noise or by
    an error that happens to help, but no solver of the same ODE approaches anything else."""
    if context.scorer is None or not context.config.has_reference:
        return {}
    images = torch.cat([_reference_chunk(context, *chunk) for chunk in context.chunks])
    features = context.scorer.features(quantise(images))
    low, high = bootstrap_interval(features, context.scorer.test_stats, context.config.bootstrap)
    scores = {
        "reference_fd_indomain": frechet_distance(FeatureStats.of(features), context.scorer.test_stats),
        "reference_fd_ci": [low, high],
    }
    if context.labels is not None:
        with torch.inference_mode():
            logits = context.scorer.classifier.classify(features.to(context.scorer.device)).cpu()
        scores["reference_class_acc"] = float((logits.argmax(1) == context.labels).double().mean())
    return scores


def bootstrap_interval(
    features: Tensor, reference: FeatureStats, resamples: int, level: float = 0.9
) -> tuple[float, float]:
    """A `level` interval for the Frechet distance of this many samples, by bootstrap over the
    generated features (the reference statistics held fixed), bias-corrected.

    A resample with replacement repeats about a third of its samples, which shrinks the feature
    covariance and raises the distance by about as much as the finite-N bias itself; the plain
    percentile interval then often lies wholly above the estimate. So the percentiles are shifted
    down by that excess (bootstrap median minus estimate): the width comes from the bootstrap, the
    centre from the estimate. Clamped at 0. Near the noise floor it is conservative (covers more
    than `level`; tests/test_sweep.py measures the coverage).
    """
    if resamples == 0:
        return float("nan"), float("nan")
    generator = np.random.default_rng(BOOTSTRAP_SEED)
    values = features.double().numpy()
    count = values.shape[0]
    estimate = frechet_distance(FeatureStats.of(values), reference)
    distances = [
        frechet_distance(FeatureStats.of(values[generator.integers(0, count, count)]), reference)
        for _ in range(resamples)
    ]
    low, middle, high = np.quantile(distances, [(1 - level) / 2, 0.5, 1 - (1 - level) / 2])
    excess = middle - estimate
    return max(float(low - excess), 0.0), max(float(high - excess), 0.0)


@dataclass(frozen=True)
class RowPlan:
    """One (solver, NFE) row: what defines it, and where its chunks live."""

    solver: str
    nfe: int
    steps: int | None
    solver_params: dict[str, Any]
    base: dict[str, Any]
    key: str
    schedule_params: dict[str, Any]
    """The sweep's, with a `learned` schedule's method resolved (the grid's)."""
    predictor: PredictorKey | None = None
    grid: Tensor | None = None
    """The stored sigmas of a `learned` schedule."""

    def chunk_path(self, context: SweepContext, chunk: int) -> Path:
        return context.cache / f"row-{self.key}-c{chunk}.safetensors"

    def stats_path(self, context: SweepContext) -> Path:
        return context.cache / f"row-{self.key}-fid.npz"


def plan_row(context: SweepContext, solver: str, nfe: int) -> RowPlan:
    config, model = context.config, context.model
    spec = solvers.SOLVERS.get(solver)
    solver_params = config.solver_params.get(solver, {})
    params = spec.parse_params(solver_params)
    steps = spec.steps_for_nfe(nfe, config.afs, params)
    base = {
        "model": config.model,
        "model_fingerprint": model.fingerprint,
        "solver": solver,
        "base": getattr(params, "base", solver),  # an AMED plugin's base solver; else the solver itself
        "schedule": config.schedule,
        "schedule_params": json.dumps(config.schedule_params, sort_keys=True),
        "afs": config.afs,
        "guidance": config.guidance,
        "nfe": nfe,
        "steps": steps,
        "num_samples": config.num_samples,
        "tier": config.tier,
        "device": model.device.type,
        "dtype": config.dtype,
        "batch": config.batch_size,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "git_rev": (context.meta.get("git") or {}).get("revision"),
        "command": context.meta.get("command"),
        "solver_params": json.dumps(solver_params, sort_keys=True),
        "reference": (
            f"{REFERENCE_SOLVER} {config.reference_steps} steps {REFERENCE_SCHEDULE} "
            f"(2x check rmse {context.reference_check_rmse:.2e})"
            if config.has_reference
            else "none"
        ),
        "processes": context.state.num_processes,
    }
    wanted = None
    weights = None
    grid = None
    schedule_params = dict(config.schedule_params)
    if steps is not None and solvers.SCHEDULES.get(config.schedule).needs_grid:
        grid_name, grid, schedule_params["method"] = _grid_of(context, spec, solver_params, nfe)
        # which grid scored this row: a retrained grid leaves older rows naming sigmas no longer shipped
        base.update(grid=grid_name, grid_method=schedule_params["method"], grid_sigmas=json.dumps(grid.tolist()))
    if spec.needs_predictor and steps is not None:
        wanted, weights = _predictor_of(context, spec, solver_params, steps, schedule_params, grid)
        card = read_card(context.predictors.cards[wanted])
        _check_held_out(card.training, config, wanted.describe())
        picked = card.training.get("selection")  # the held-out noises that chose among training seeds
        if picked:
            chose = {"first_noise_seed": picked["first_noise_seed"], "trajectories": picked["noises"]}
            _check_held_out(chose, config, wanted.describe())
        base.update(
            predictor=wanted.describe(),
            # with several training seeds, the cost of all of them
            predictor_training_s=(picked or {}).get("wall_seconds_all_seeds", card.training.get("wall_seconds")),
            predictor_trajectories=card.training.get("trajectories"),
            # which weights scored this row: a retrained predictor leaves older rows naming weights no longer shipped
            predictor_sha256=weights,
        )
    identity = {k: base[k] for k in ("solver", "schedule", "schedule_params", "afs", "nfe")}
    # The parameters as the solver sees them, defaults filled in: a changed default must not reuse
    # rows cached under the old one, and {} and the defaults spelled out are the same row (the
    # solver_params column keeps what was asked for).
    identity["resolved_params"] = params.model_dump(mode="json")
    payload: dict[str, Any] = {"row": identity, "reference": context.reference_key, "predictor_weights": weights}
    if grid is not None:
        payload["grid"] = grid.tolist()
    key = _hash(payload)
    return RowPlan(solver, nfe, steps, solver_params, base, key, schedule_params, wanted, grid)


def _grid_of(context: SweepContext, spec: Any, solver_params: dict[str, Any], nfe: int) -> tuple[str, Tensor, str]:
    """The learned grid a row needs, with its file's name and its method (the one asked for, or the
    store's choice); its training seeds checked against the sweep's.

    Raises:
        MissingGridError: none matches; the message carries the command that trains it.
    """
    config = context.config
    method = solvers.SCHEDULES.get(config.schedule).parse_params(config.schedule_params).model_dump()["method"]
    wanted = context.predictors.resolve_grid(
        grid_key(
            model_fingerprint=context.model.fingerprint,
            solver=spec.name,
            solver_params=spec.parse_params(solver_params).model_dump(),
            method=method or ANY_METHOD,
            nfe=nfe,
            afs=config.afs,
            guidance=config.guidance,
        )
    )
    path, card = context.predictors.grid_card(wanted, config.model)
    grid = torch.tensor(card.sigmas, dtype=torch.float64)
    training = card.training
    _check_held_out(training, config, wanted.describe())
    selection = {
        "first_noise_seed": training.get("selection_first_noise_seed", 0),
        "trajectories": training.get("selection", 0),
    }
    _check_held_out(selection, config, wanted.describe())
    picked = training.get("seed_selection")  # the held-out noises that chose among seeds (select-grid)
    if picked:
        chose = {"first_noise_seed": picked["first_noise_seed"], "trajectories": picked["noises"]}
        _check_held_out(chose, config, wanted.describe())
    return provenance.shown_path(path), grid, wanted.method


def _check_held_out(training: dict[str, Any], config: SweepConfig, name: str) -> None:
    """Refuse to score a predictor on the noise seeds it was trained on.

    Raises:
        BenchError: the training seeds overlap this sweep's seeds.
    """
    # cards from before the training seed offset record only `seed` (trajectory k: seed * 1000003 + k)
    first = int(training.get("first_noise_seed", int(training.get("seed", 0)) * 1_000_003))
    trained = range(first, first + int(training.get("trajectories", 0)))
    scored = range(config.seed_base, config.seed_base + config.num_samples)
    if trained.start < scored.stop and scored.start < trained.stop:
        raise BenchError(
            f"{name} was trained on noise seeds {trained.start}..{trained.stop - 1}, which overlap "
            f"this sweep's seeds {scored.start}..{scored.stop - 1}: retrain it (training seeds now start at "
            "2**40, 2**41 for grids) or choose another --seed-base"
        )


def _predictor_of(
    context: SweepContext,
    spec: Any,
    solver_params: dict[str, Any],
    steps: int,
    schedule_params: dict[str, Any],
    grid: Tensor | None = None,
) -> tuple[PredictorKey, str]:
    """The AMED predictor a row needs and the SHA-256 of its weights (part of the row's cache key).

    Raises:
        MissingPredictorError: none matches; the message carries the command that trains it.
    """
    config, model = context.config, context.model
    plan = solvers.plan(
        spec.name,
        steps=steps,
        schedule=config.schedule,
        schedule_params=schedule_params,
        solver_params=solver_params,
        afs=config.afs,
        sigma_min=model.sigma_min,
        sigma_max=model.sigma_max,
        sigma_levels=model.sigma_levels,
        grid=grid,
    )
    wanted = predictor_key(plan, model_fingerprint=model.fingerprint, guidance=config.guidance)
    if not context.predictors.has(wanted):
        context.predictors.find(wanted, config.model)  # raises MissingPredictorError with the command
    weights = context.predictors.cards[wanted].with_suffix(".safetensors")
    return wanted, hashlib.sha256(weights.read_bytes()).hexdigest()


def _compute_chunk(context: SweepContext, row: RowPlan, chunk: int, start: int, stop: int) -> None:
    assert row.steps is not None
    config = context.config
    predictor = None
    if row.predictor is not None:
        predictor = context.predictors.find(row.predictor, config.model, device=context.model.device)
    images, nfe, evals, seconds = _sample_chunk(
        context,
        start,
        stop,
        row.solver,
        row.steps,
        config.schedule,
        row.schedule_params,
        row.solver_params,
        config.afs,
        predictor,
        row.grid,
    )
    stored = {}
    if config.has_reference:
        reference = _reference_chunk(context, chunk, start, stop)
        stored["rmse"] = (images - reference).flatten(1).pow(2).mean(1).sqrt().contiguous()
    if context.scorer is not None:
        features = context.scorer.features(quantise(images))
        with torch.inference_mode():
            logits = context.scorer.classifier.classify(features.to(context.scorer.device))
        stored.update(features=features.float().contiguous(), predicted=logits.argmax(1).cpu().contiguous())
    if context.fid is not None:
        stored["inception"] = context.fid.features(images).float().contiguous()
    if chunk == 0 and config.grid:
        stored["preview"] = ((images[: config.grid].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    metadata = {"nfe": nfe, "network_evals": evals, "seconds": seconds, "steps": row.steps}
    context.cache.mkdir(parents=True, exist_ok=True)
    temporary = row.chunk_path(context, chunk).with_suffix(".partial")
    save_file(stored, str(temporary), metadata={"row": json.dumps(metadata)})
    temporary.replace(row.chunk_path(context, chunk))  # a chunk file exists only when complete


def _chunk_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(json.loads((handle.metadata() or {})["row"]))


def assemble_row(context: SweepContext, row: RowPlan, cached: bool) -> dict[str, Any]:
    """The row's metrics from its chunk files (main process)."""
    config = context.config
    if row.steps is None:
        return {**row.base, "reachable": False, "cached": False}
    parts = [load_file(str(row.chunk_path(context, c))) for c, _, _ in context.chunks]
    metas = [_chunk_metadata(row.chunk_path(context, c)) for c, _, _ in context.chunks]
    result = {
        **row.base,
        "reachable": True,
        "cached": cached,
        "nfe": metas[0]["nfe"],
        "network_evals": metas[0]["network_evals"],
        "wall_s_per_sample": sum(m["seconds"] for m in metas) / config.num_samples,
        "rmse_ref": float(torch.cat([p["rmse"] for p in parts]).double().mean()) if config.has_reference else None,
        "fid": _row_fid(context, row, parts),
    }
    if context.scorer is not None:
        features = torch.cat([p["features"] for p in parts])
        if features.shape[0] <= features.shape[1]:
            warnings.warn(
                f"{features.shape[0]} samples for {features.shape[1]} feature dimensions: the covariance "
                "is singular and the Frechet distance is biased; use more samples",
                stacklevel=2,
            )
        result["fd_indomain"] = frechet_distance(FeatureStats.of(features), context.scorer.test_stats)
        # N real test images against the other 10,000 - N: defined while some are left over
        enough = config.num_samples < len(context.scorer.test_features)
        result["fd_indomain_floor"] = context.scorer.noise_floor(config.num_samples) if enough else None
        result["fd_ci_low"], result["fd_ci_high"] = bootstrap_interval(
            features, context.scorer.test_stats, config.bootstrap
        )
        if context.labels is not None:
            predicted = torch.cat([p["predicted"] for p in parts])
            result["class_acc"] = float((predicted == context.labels).double().mean())
    return result


def _row_fid(context: SweepContext, row: RowPlan, parts: list[dict[str, Tensor]]) -> float | None:
    """FID of the row: from its cached Inception statistics, else from the chunks' features (which
    are then reduced to those statistics and dropped from the chunk files, 8 KB per sample)."""
    if context.fid is None:
        return None
    from .fid import load_stats

    path = row.stats_path(context)
    if path.is_file():
        stats = load_stats(path)
    elif all("inception" in p for p in parts):
        stats = FeatureStats.of(torch.cat([p["inception"] for p in parts]))
        np.savez(path, mu=stats.mean, sigma=stats.cov, count=np.array(stats.count))
        for (chunk, _, _), part in zip(context.chunks, parts, strict=True):
            chunk_path = row.chunk_path(context, chunk)
            metadata = {"row": json.dumps(_chunk_metadata(chunk_path))}
            save_file({k: v for k, v in part.items() if k != "inception"}, str(chunk_path), metadata=metadata)
    else:
        return None  # chunks cached before FID was asked for: rerun with a fresh cache to add it
    reference = context.fid.reference_stats(context.config.fid_reference, context.cache)
    return frechet_distance(stats, reference)


def run_sweep(
    config: SweepConfig,
    out: Path,
    cache: Path | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    state: Distributed | None = None,
) -> list[dict[str, Any]]:
    """Compute (or load) every row, write out/results.csv and .json, the plots and the sample
    grids; return the rows (on the main process; the others return an empty list)."""
    cache = cache if cache is not None else out / "cache"
    context = prepare(config, cache, state)
    main = context.state.is_main_process
    plans = [plan_row(context, solver, nfe) for solver in config.solvers for nfe in config.nfe]
    cached = {
        plan.key: plan.steps is not None and all(plan.chunk_path(context, c).is_file() for c, _, _ in context.chunks)
        for plan in plans
    }
    for plan in tqdm(plans, desc="sweep", unit="row", disable=not main):
        if plan.steps is None or cached[plan.key]:
            continue
        todo = [chunk for chunk in context.owned() if not plan.chunk_path(context, chunk[0]).is_file()]
        label = f"{plan.solver} NFE {plan.nfe}"
        for chunk in tqdm(todo, desc=label, unit="chunk", disable=not main, leave=False):
            _compute_chunk(context, plan, *chunk)
    context.state.wait_for_everyone()
    if not main:
        return []
    rows = []
    for plan in plans:
        row = assemble_row(context, plan, cached[plan.key])
        rows.append(row)
        if on_row is not None:
            on_row(row)
    meta = {
        **context.meta,
        "reference_check_rmse": context.reference_check_rmse,
        **reference_scores(context),
        "fid_note": context.fid_note,
    }
    provenance.write_csv(out / "results.csv", rows, COLUMNS)
    provenance.write_json(out / "results.json", meta, rows)
    plot(rows, out / "fd-vs-nfe.png")
    if config.grid:
        for nfe in sorted(config.nfe)[:2]:
            sample_grid(context, [p for p in plans if p.nfe == nfe], out / f"samples-nfe{nfe}.png")
    return rows


def sample_grid(context: SweepContext, plans: Sequence[RowPlan], path: Path) -> Path | None:
    """The first `grid` samples of each solver at one NFE (same seeds and labels), the reference on
    top (when the sweep has one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(context.config.grid, len(context.seeds))
    lines = []
    if context.config.has_reference:
        reference = context.reference_chunks.get(0)
        if reference is None:
            reference = load_file(str(_reference_path(context, 0)))["samples"]
        lines.append(("reference", ((reference[:count].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)))
    for plan in plans:
        if plan.steps is not None:
            lines.append((plan.solver, load_file(str(plan.chunk_path(context, 0)))["preview"][:count]))
    if len(lines) < 1 + context.config.has_reference:
        return None
    figure, axes = plt.subplots(len(lines), count, figsize=(0.8 * count + 1.2, 0.85 * len(lines)), squeeze=False)
    for line, (name, images) in zip(axes, lines, strict=True):
        for column, ax in enumerate(line):
            picture = images[column].permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        line[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    nfe = next(p.nfe for p in plans)
    labels = context.labels[:count].tolist() if context.labels is not None else None
    figure.suptitle(
        f"NFE {nfe}, seeds {context.seeds[0]}..{context.seeds[count - 1]}" + (f", labels {labels}" if labels else ""),
        fontsize=9,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot(rows: Sequence[dict[str, Any]], path: Path, label: Callable[[dict[str, Any]], str] | None = None) -> Path:
    """Metric vs NFE, one line per solver (in-domain FD when present, else rmse_ref), log scale.
    `label` names a row's line where the solver name alone is ambiguous (default: the solver)."""
    name_of = label or (lambda row: str(row["solver"]))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "fd_indomain" if any(r.get("fd_indomain") is not None for r in rows) else "rmse_ref"
    panels = [metric, "rmse_ref"] if any(r.get("rmse_ref") is not None for r in rows) else [metric]  # no reference
    figure, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.6), squeeze=False)
    axes = axes[0]
    lines = list(dict.fromkeys(name_of(r) for r in rows))
    for ax, name in zip(axes, panels, strict=True):
        for k, line in enumerate(lines):  # one colour and marker per line in both panels
            points = [(r["nfe"], r[name]) for r in rows if name_of(r) == line and r.get(name) is not None]
            if points:
                style = {"color": f"C{k % 10}", "marker": "os^"[k // 10 % 3]}
                ax.plot(*zip(*sorted(points), strict=True), label=line, **style)
        floor = [r.get("fd_indomain_floor") for r in rows if r.get("fd_indomain_floor") is not None]
        if name == "fd_indomain" and floor:
            ax.axhline(floor[0], color="gray", linestyle="--", label="noise floor")
        ax.set_xlabel("NFE")
        ax.set_ylabel(name)
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the plots, not over them
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


__all__ = [
    "COLUMNS",
    "SingleProcess",
    "SweepConfig",
    "assemble_row",
    "balanced_labels",
    "bootstrap_interval",
    "distributed_state",
    "plan_row",
    "plot",
    "prepare",
    "run_sweep",
    "sample_grid",
]
