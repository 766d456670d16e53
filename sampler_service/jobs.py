"""From a GenerateRequest to a validated `Job` and its `Plan`: the service's boundary.

Everything a request says is checked here, once, and every problem is reported together as
field violations (INVALID_ARGUMENT) or as the one NOT_FOUND / FAILED_PRECONDITION that makes the
rest meaningless. After this, the batcher and the engine trust the job.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf import struct_pb2
from torch import Tensor

import models
import solvers
from solvers import MAX_SEED, Params, SolverSpec
from solvers.amed import PredictorKey, PredictorStore, predictor_key, train_command
from solvers.errors import shorten
from solvers.learned import ANY_METHOD, GridKey, grid_key, train_schedule_command

from .errors import InvalidRequest, NotFound, PredictorMissing, ServiceError, Violation, from_domain
from .gen.sampler.v1 import sampler_pb2 as pb
from .settings import Limits
from .text_inputs import TextInputs, check_class_request, text_inputs

DEFAULT_SCHEDULE = "polynomial"
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
# Answers (a plan, the solver list) show a solver's reachable NFE up to this many values.
REACHABLE_SHOWN = 64
MAX_VIOLATIONS_PER_FIELD = 3  # a list field with many bad entries reports the first few
OUTPUT_FORMATS = {
    pb.OUTPUT_FORMAT_UNSPECIFIED: pb.OUTPUT_FORMAT_PNG,
    pb.OUTPUT_FORMAT_PNG: pb.OUTPUT_FORMAT_PNG,
    pb.OUTPUT_FORMAT_RAW_FLOAT32: pb.OUTPUT_FORMAT_RAW_FLOAT32,
}


@dataclass
class ServedModel:
    """A loaded model as the service knows it."""

    name: str
    model: models.Model
    description: str
    ready: bool = False
    predictors: PredictorStore = field(default_factory=lambda: PredictorStore([]))

    @property
    def num_labels(self) -> int:
        return self.model.num_class_embeds or 0

    def label_names(self) -> list[str]:
        names = [str(k) for k in range(self.num_labels)]
        if self.model.null_class is not None:
            names[self.model.null_class] = "null"
        return names


@dataclass(frozen=True)
class MergeKey:
    """Requests with equal keys can share one sampling loop (labels and guidance stay per sample)."""

    fingerprint: str
    model: str
    solver: str
    solver_params: str  # canonical JSON
    schedule: str
    schedule_params: str  # canonical JSON
    steps: int
    afs: bool
    conditional_pass: bool  # some sample has w != 0
    unconditional_pass: bool  # some sample has w != 1
    predictor: str | None
    # Text-to-image: samples of one batch share the image size and the img2img entry step.
    height: int = 0
    width: int = 0
    start_step: int = 0


@dataclass(frozen=True)
class Plan:
    """What a request will do and cost."""

    model: str
    solver: str
    schedule: str
    steps: int
    nfe: int
    network_evals: int
    sigmas: tuple[float, ...]
    reachable_nfe: tuple[int, ...]
    needs_predictor: bool
    predictor_available: bool
    predictor_key: str
    train_command: str
    seeds: tuple[int, ...]
    latent_shape: tuple[int, ...] = ()
    height: int = 0
    width: int = 0
    start_step: int = 0
    dropped_tokens: tuple[int, ...] = ()

    def to_proto(self) -> pb.PlanResponse:
        return pb.PlanResponse(
            model=self.model,
            solver=self.solver,
            schedule=self.schedule,
            steps=self.steps,
            nfe=self.nfe,
            network_evals=self.network_evals,
            sigmas=list(self.sigmas),
            reachable_nfe=list(self.reachable_nfe),
            predictor=pb.PredictorStatus(
                required=self.needs_predictor,
                available=self.predictor_available,
                key=self.predictor_key,
                train_command=self.train_command,
            ),
            num_samples=len(self.seeds),
            seeds=list(self.seeds),
            latent_shape=list(self.latent_shape),
            height=self.height,
            width=self.width,
            start_step=self.start_step,
            dropped_tokens=list(self.dropped_tokens),
        )


@dataclass(eq=False)
class Job:
    """A validated generation request."""

    request_id: str
    served: ServedModel
    sampling: solvers.SamplingPlan | None
    """The validated run the engine executes (None only while its learned grid is missing: Plan
    reports that, Generate refuses it in require_predictor)."""
    seeds: tuple[int, ...]
    labels: tuple[int, ...] | None  # per sample; None for a model without labels
    guidance: tuple[float, ...]
    output_format: int
    preview_every: int
    plan: Plan
    key: MergeKey
    predictor: PredictorKey | None = None
    grid: GridKey | None = None
    """The learned grid a `learned` schedule steps along (the plan's grid)."""
    text: TextInputs | None = None  # text-to-image conditioning; None for a class-conditional model

    @property
    def num_samples(self) -> int:
        return len(self.seeds)

    @property
    def evals_per_call(self) -> int:
        return int(self.key.conditional_pass) + int(self.key.unconditional_pass)

    @property
    def rows(self) -> int:
        """Network rows the request occupies in a batch."""
        return self.num_samples * self.evals_per_call


def _plain(struct: struct_pb2.Struct, prefix: str, violations: list[Violation]) -> dict[str, Any] | None:
    """A Struct as Python values, or None (with a violation) when it holds NaN or an infinity.

    Integral numbers become ints (JSON has one number type). Non-finite numbers are refused here,
    naming their path: no parameter takes them, and protobuf's JSON conversion cannot even print them.
    """
    bad: list[str] = []

    def convert(value: struct_pb2.Value, path: str) -> Any:
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            number = value.number_value
            if not math.isfinite(number):
                bad.append(path)
                return number
            return int(number) if number.is_integer() and abs(number) < 2**53 else number
        if kind == "string_value":
            return value.string_value
        if kind == "bool_value":
            return value.bool_value
        if kind == "struct_value":
            return {k: convert(v, f"{path}.{k}") for k, v in value.struct_value.fields.items()}
        if kind == "list_value":
            return [convert(v, f"{path}[{i}]") for i, v in enumerate(value.list_value.values)]
        return None

    plain = {k: convert(v, f"{prefix}.{k}") for k, v in struct.fields.items()}
    for path in bad[:MAX_VIOLATIONS_PER_FIELD]:
        violations.append(Violation(shorten(path), "NaN or an infinity is invalid: expected a finite number"))
    return None if bad else plain


def _canonical(params: Params) -> str:
    return json.dumps(params.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def build_job(
    request: pb.GenerateRequest, served_models: dict[str, ServedModel], limits: Limits, request_id: str
) -> Job:
    """Validate `request` against the served models, the registries and the limits.

    Raises:
        NotFound: unknown model, solver or schedule.
        InvalidRequest: every invalid field (field path, value, what is allowed).
        PredictorMissing: the solver needs a trained predictor that does not exist.
    """
    if not request.model:
        raise InvalidRequest([Violation("model", f"required: one of {', '.join(served_models)}")])
    if request.model not in served_models:
        raise NotFound("model", request.model, list(served_models))
    served = served_models[request.model]
    model = served.model
    if not request.solver:
        raise InvalidRequest([Violation("solver", f"required: one of {', '.join(solvers.SOLVERS.names())}")])
    try:
        spec = solvers.SOLVERS.get(request.solver)
        schedule = request.schedule or DEFAULT_SCHEDULE
        solvers.SCHEDULES.get(schedule)
    except solvers.SolverError as error:
        raise from_domain(error) from None

    violations: list[Violation] = []

    def attempt(action: Any) -> Any:
        try:
            return action()
        except (solvers.SolverError, models.ModelError) as error:
            mapped = from_domain(error)
            if isinstance(mapped, InvalidRequest):
                violations.extend(mapped.violations)
                return None
            raise mapped from None

    solver_values = _plain(request.solver_params, "solver_params", violations)
    schedule_values = _plain(request.schedule_params, "schedule_params", violations)
    solver_params = attempt(lambda: spec.parse_params(solver_values)) if solver_values is not None else None
    schedule_params = (
        attempt(lambda: solvers.SCHEDULES.get(schedule).parse_params(schedule_values))
        if schedule_values is not None
        else None
    )
    afs = bool(request.afs)

    steps: int | None = None
    budget = request.WhichOneof("budget")
    if budget is None:
        violations.append(Violation("steps", f"set steps (1..{limits.max_steps}) or nfe"))
    elif budget == "steps":
        if not 1 <= request.steps <= limits.max_steps:
            violations.append(Violation("steps", f"{request.steps} is out of range: expected 1..{limits.max_steps}"))
        else:
            steps = request.steps
    elif solver_params is not None:
        steps = attempt(lambda: spec.require_steps_for_nfe(request.nfe, afs, solver_params))
        if steps is not None and steps > limits.max_steps:
            violations.append(
                Violation("nfe", f"{request.nfe} needs {steps} steps; this server allows {limits.max_steps}")
            )
            steps = None
    learned = solvers.SCHEDULES.get(schedule).needs_grid  # its grid is looked up below, once guidance is known

    too_long = [
        Violation(name, f"{len(values)} values is too many: expected at most {limits.max_samples_per_request}")
        for name, values in (("seeds", request.seeds), ("labels", request.labels), ("guidance", request.guidance))
        if len(values) > limits.max_samples_per_request
    ]
    if too_long:  # one value per sample at most: the rest of the request is not worth reading
        raise InvalidRequest(too_long)
    seeds = _seeds(request, limits, violations)
    count = len(seeds) if seeds else 0
    text: TextInputs | None = None
    if isinstance(model, models.TextToImageModel):
        text = text_inputs(request, model, served.name, count, steps, limits, violations)
        labels = None
        if text is not None and text.init_image is not None and spec.needs_predictor:
            violations.append(
                Violation("init_image", f"not with solver {spec.name!r}: its predictor is trained on the whole grid")
            )
        if text is not None and spec.needs_predictor and (text.height, text.width) != model.default_size:
            # Predictors read the UNet's bottleneck at the size they were trained at (sampler-amed
            # train samples the model's default size).
            height, width = model.default_size
            violations.append(
                Violation(
                    "width" if text.width != width else "height",
                    f"{text.width} x {text.height}: solver {spec.name!r} samples at its predictor's training "
                    f"size, {width} x {height}",
                )
            )
    else:
        check_class_request(request, served.name, violations)
        for name, value in (("width", request.width), ("height", request.height)):
            fixed = model.default_size[1] if name == "width" else model.default_size[0]
            if value and value != fixed:
                violations.append(Violation(name, f"{value} is not supported: model {served.name!r} samples {fixed}"))
        labels = _labels(request, served, count, violations)
    guidance = _guidance(request, served, count, labels, limits, violations)
    # The noise range at the requested size: a model whose shift depends on the size (Flux's
    # dynamic shift) spans another range at another size.
    sigma_min, sigma_max, sigma_levels = model.sigma_min, model.sigma_max, model.sigma_levels
    if isinstance(model, models.TextToImageModel) and text is not None:
        sigma_min, sigma_max, sigma_levels = model.noise_range(text.height, text.width)
    output_format = OUTPUT_FORMATS.get(request.output_format)
    if output_format is None:
        violations.append(Violation("output_format", f"{request.output_format} is not one of PNG (1), RAW_FLOAT32 (2)"))
    if spec.needs_predictor and guidance is not None and len(set(guidance)) > 1:
        violations.append(
            Violation(
                "guidance",
                f"{sorted(set(guidance))}: solver {spec.name!r} takes one value for all samples "
                "(its predictor is trained for one guidance scale)",
            )
        )
    wanted_grid: GridKey | None = None
    grid: Tensor | None = None
    if learned and steps is not None and schedule_params is not None and solver_params is not None:
        wanted_grid = served.predictors.resolve_grid(
            grid_key(
                model_fingerprint=model.fingerprint,
                solver=spec.name,
                solver_params=solver_params.model_dump(),
                method=schedule_params.model_dump()["method"] or ANY_METHOD,
                nfe=spec.nfe(steps, afs),
                afs=afs,
                guidance=guidance[0] if guidance else 1.0,
            )
        )
        # the plan, its merge key and a plugin's predictor key carry the method the grid has
        schedule_params = schedule_params.model_copy(update={"method": wanted_grid.method})
        if guidance is not None and len(set(guidance)) > 1:
            violations.append(
                Violation(
                    "guidance", f"{sorted(set(guidance))}: a learned grid is trained for one value for all samples"
                )
            )
        elif served.predictors.has_grid(wanted_grid):
            grid = served.predictors.find_grid(wanted_grid, served.name)
    grid_missing = wanted_grid is not None and grid is None
    start = text.start if text is not None else 0
    sampling: solvers.SamplingPlan | None = None
    if steps is not None and solver_params is not None and schedule_params is not None and not grid_missing:
        # The one place a request's run is validated and its grid built: the engine runs this plan.
        sampling = attempt(
            lambda: solvers.plan(
                spec.name,
                steps=steps,
                schedule=schedule,
                schedule_params=schedule_params,
                solver_params=solver_params,
                afs=afs,
                sigma_min=sigma_min,
                sigma_max=sigma_max,
                sigma_levels=sigma_levels,
                grid=grid,
                start=start,
                image_to_image=text is not None and text.init_image is not None,
            )
        )
    if steps is not None and request.preview_every > steps:
        violations.append(Violation("preview_every", f"{request.preview_every} is out of range: expected 0..{steps}"))
    if violations:
        raise InvalidRequest(violations)
    # Without violations every part was parsed (a failed part adds one); the plan is missing only
    # while its learned grid is (Plan reports that, Generate refuses it).
    assert steps is not None
    assert solver_params is not None
    assert schedule_params is not None
    assert output_format is not None
    assert guidance is not None

    guided = labels is not None or text is not None
    conditional = any(w != 0 for w in guidance) if guided else True
    unconditional = any(w != 1 for w in guidance) if guided else False
    if isinstance(model, models.TextToImageModel) and model.guidance_distilled:
        conditional, unconditional = True, False  # guidance is the network's input: one pass
    run_steps = steps - start  # img2img runs the grid's tail: its steps and NFE are what is counted
    nfe = sampling.solver_nfe if sampling is not None else spec.nfe(run_steps, afs)
    wanted: PredictorKey | None = None
    if spec.needs_predictor and sampling is not None:
        wanted = predictor_key(sampling, model_fingerprint=model.fingerprint, guidance=guidance[0] if guidance else 1.0)
    key_text = wanted.describe() if wanted is not None else ""
    command = train_command(wanted, served.name) if wanted is not None else ""
    available = wanted is not None and served.predictors.has(wanted)
    if wanted_grid is not None and (grid_missing or wanted is None):  # Plan reports the grid
        key_text, command = wanted_grid.describe(), train_schedule_command(wanted_grid, served.name)
        available = not grid_missing
    if command and text is not None:
        command += ' --prompt "<a training prompt>" (repeat --prompt for more)'
    plan = Plan(
        model=served.name,
        solver=spec.name,
        schedule=schedule,
        steps=run_steps,
        nfe=nfe,
        network_evals=nfe * (int(conditional) + int(unconditional)),
        sigmas=tuple(sampling.sigmas.tolist()) if sampling is not None else (),
        reachable_nfe=tuple(reachable_shown(spec, afs, solver_params, limits.max_steps)),
        needs_predictor=spec.needs_predictor or wanted_grid is not None,
        predictor_available=available,
        predictor_key=key_text,
        train_command=command,
        seeds=tuple(seeds),
        latent_shape=text.latent_shape if text is not None else tuple(model.sample_shape),
        height=text.height if text is not None else model.default_size[0],
        width=text.width if text is not None else model.default_size[1],
        start_step=start,
        dropped_tokens=text.dropped_tokens if text is not None else (),
    )
    key = MergeKey(
        fingerprint=model.fingerprint,
        model=served.name,
        solver=spec.name,
        solver_params=_canonical(solver_params),
        schedule=schedule,
        schedule_params=_canonical(schedule_params),
        steps=steps,
        afs=afs,
        conditional_pass=conditional,
        unconditional_pass=unconditional,
        predictor=key_text or None,
        height=text.height if text is not None else 0,
        width=text.width if text is not None else 0,
        start_step=start,
    )
    return Job(
        request_id=request_id,
        served=served,
        sampling=sampling,
        seeds=tuple(seeds),
        labels=labels,
        guidance=guidance,
        output_format=output_format,
        preview_every=request.preview_every,
        plan=plan,
        key=key,
        predictor=wanted,
        grid=wanted_grid,
        text=text,
    )


def require_predictor(job: Job) -> None:
    """FAILED_PRECONDITION for a job whose solver needs a predictor this server lacks (Generate only;
    Plan reports it in PredictorStatus)."""
    store = job.served.predictors
    if job.grid is not None and not store.has_grid(job.grid):
        grids = [key.describe() for key in store.grid_keys(job.served.model.fingerprint)]
        raise PredictorMissing(job.plan.predictor_key, grids, job.plan.train_command)
    if job.predictor is not None and not job.served.predictors.has(job.predictor):
        available = [key.describe() for key in job.served.predictors.keys(job.served.model.fingerprint)]
        raise PredictorMissing(job.plan.predictor_key, available, job.plan.train_command)


def _seeds(request: pb.GenerateRequest, limits: Limits, violations: list[Violation]) -> list[int]:
    count = request.num_samples or len(request.seeds) or len(request.labels) or len(request.prompt) or 1
    if not 1 <= count <= limits.max_samples_per_request:
        violations.append(
            Violation("num_samples", f"{count} is out of range: expected 1..{limits.max_samples_per_request}")
        )
        return []
    if request.seeds and request.HasField("base_seed"):
        violations.append(Violation("base_seed", "give seeds or base_seed, not both"))
        return []
    if request.seeds:
        if len(request.seeds) != count:
            violations.append(
                Violation("seeds", f"{len(request.seeds)} seeds for {count} samples: give one per sample")
            )
            return []
        bad = [(i, s) for i, s in enumerate(request.seeds) if s > MAX_SEED]
        for i, s in bad[:MAX_VIOLATIONS_PER_FIELD]:
            violations.append(Violation(f"seeds[{i}]", f"{s} is out of range: expected 0..{MAX_SEED}"))
        return [] if bad else list(request.seeds)
    base = request.base_seed if request.HasField("base_seed") else secrets.randbelow(MAX_SEED - 4096)
    if base + count - 1 > MAX_SEED:
        violations.append(Violation("base_seed", f"{base} + {count} samples exceeds the largest seed {MAX_SEED}"))
        return []
    return [base + i for i in range(count)]


def _labels(
    request: pb.GenerateRequest, served: ServedModel, count: int, violations: list[Violation]
) -> tuple[int, ...] | None:
    model = served.model
    given = list(request.labels)
    if model.num_class_embeds is None:
        if given:
            violations.append(Violation("labels", f"model {served.name!r} takes no labels: leave labels empty"))
        return None
    top = model.num_class_embeds - 1
    bad = [(i, v) for i, v in enumerate(given) if not 0 <= v <= top]
    for i, v in bad[:MAX_VIOLATIONS_PER_FIELD]:
        violations.append(Violation(f"labels[{i}]", f"{v} is out of range: expected 0..{top}"))
    if bad or count == 0:
        return None
    if not given:
        if model.null_class is None:
            violations.append(Violation("labels", f"required for model {served.name!r}: labels in 0..{top}"))
            return None
        return (model.null_class,) * count
    if len(given) == 1:
        return (given[0],) * count
    if len(given) != count:
        violations.append(Violation("labels", f"{len(given)} labels for {count} samples: give one, or one per sample"))
        return None
    return tuple(given)


def _guidance(
    request: pb.GenerateRequest,
    served: ServedModel,
    count: int,
    labels: tuple[int, ...] | None,
    limits: Limits,
    violations: list[Violation],
) -> tuple[float, ...] | None:
    given = [float(w) for w in request.guidance]
    for i, w in enumerate(given):
        if not math.isfinite(w) or not limits.min_guidance <= w <= limits.max_guidance:
            violations.append(
                Violation(
                    f"guidance[{i}]", f"{w} is out of range: expected {limits.min_guidance}..{limits.max_guidance}"
                )
            )
            return None
    if count == 0:
        return None
    if len(given) not in (0, 1, count):
        violations.append(
            Violation("guidance", f"{len(given)} values for {count} samples: give one, or one per sample")
        )
        return None
    values = tuple(given) if len(given) == count else (given[0] if given else 1.0,) * count
    if any(w != 1.0 for w in values) and served.model.kind == "class-conditional":
        model = served.model
        if model.num_class_embeds is None or model.null_class is None:
            violations.append(Violation("guidance", f"model {served.name!r} has no null class: guidance must be 1"))
            return None
        if not request.labels:
            violations.append(Violation("guidance", "needs labels: without labels the samples are unconditional"))
            return None
    return values


def conditioning(jobs_rows: list[tuple[Job, int, int]], device: torch.device) -> tuple[Tensor | None, Tensor]:
    """Labels (or None) and guidance of a batch's rows, in order."""
    labels: list[int] = []
    guidance: list[float] = []
    for job, start, stop in jobs_rows:
        if job.labels is not None:
            labels.extend(job.labels[start:stop])
        guidance.extend(job.guidance[start:stop])
    label_tensor = torch.tensor(labels, dtype=torch.int64, device=device) if labels else None
    return label_tensor, torch.tensor(guidance, dtype=torch.float64)


@dataclass(frozen=True)
class TextBatch:
    """The text-to-image conditioning of a batch's rows, in order (jobs of one merge key share the size)."""

    prompts: list[str]
    negatives: list[str | None]
    guidance: Tensor
    height: int
    width: int
    latent_shape: tuple[int, int, int]


def text_batch(jobs_rows: list[tuple[Job, int, int]]) -> TextBatch:
    prompts: list[str] = []
    negatives: list[str | None] = []
    guidance: list[float] = []
    for job, start, stop in jobs_rows:
        assert job.text is not None  # a text model's jobs always carry it (build_job)
        prompts.extend(job.text.prompts[start:stop])
        negatives.extend(job.text.negatives[start:stop])
        guidance.extend(job.guidance[start:stop])
    text = jobs_rows[0][0].text
    assert text is not None
    return TextBatch(
        prompts, negatives, torch.tensor(guidance, dtype=torch.float64), text.height, text.width, text.latent_shape
    )


def init_latents(
    model: models.TextToImageModel, jobs_rows: list[tuple[Job, int, int]], shape: tuple[int, int, int]
) -> Tensor | None:
    """The encoded init image of each row (zeros for rows without one), or None when no row has one.
    Each job's image is encoded once per batch, on the model's worker thread."""
    if all(job.text is None or job.text.init_image is None for job, _, _ in jobs_rows):
        return None
    blocks = []
    for job, start, stop in jobs_rows:
        image = job.text.init_image if job.text is not None else None
        latents = model.encode(image) if image is not None else torch.zeros(1, *shape, device=model.device)
        blocks.append(latents.to(model.device).expand(stop - start, *shape))
    return torch.cat(blocks)


def reachable_shown(spec: SolverSpec[Any], afs: bool, params: Params, max_steps: int) -> list[int]:
    """The NFE `spec` spends exactly with `params` in at most `max_steps` steps: the first REACHABLE_SHOWN."""
    return spec.reachable_nfe(afs, params, limit=spec.nfe(max_steps, afs))[:REACHABLE_SHOWN]


def check_request_id(value: str) -> str | None:
    """The id if acceptable (1..128 printable ASCII characters), else None."""
    return value if _REQUEST_ID.match(value) else None


__all__ = [
    "Job",
    "MergeKey",
    "Plan",
    "ServedModel",
    "ServiceError",
    "build_job",
    "check_request_id",
    "conditioning",
    "init_latents",
    "require_predictor",
    "text_batch",
]
