"""Loading diffusion models the way their users keep them: `models.load(source)`.

A source is, in this order:
- a built-in name (`mnist`, `mnist-flow`, shipped in models/builtin/ in diffusers layout);
- a local folder in diffusers layout: a pipeline (model_index.json or unet/ + scheduler/), or a
  bare UNet folder (config.json and weights) with its scheduler_config.json beside them or in
  scheduler/;
- a Hugging Face hub id ("org/name"), resolved from the local cache only: nothing is downloaded.

Weights are read from safetensors only; pickle-format files (.bin, .pt, .ckpt) are refused, since
loading them can run code. Every problem with the files is a `ModelLoadError` naming the file, an
unsupported scheduler or UNet an `UnsupportedSchedulerError` / `UnsupportedModelError` naming the
field, an unknown source a `ModelNotFoundError`: never a traceback from inside a library.

The loaded `DiffusionModel` binds conditioning with `conditioned(...)`, which returns the
`solvers.Denoiser` the solvers run. Depends on the solver contract's conventions (through
diffusers_unet) and on diffusers / huggingface_hub / safetensors; never on the service or bench.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models import UNet2DConditionModel, UNet2DModel
from diffusers.utils import is_accelerate_available
from torch import Tensor

from .diffusers_unet import Parameterisation, UNetDenoiser, VPDiscreteSchedule, unet_traits
from .errors import (
    InvalidConditioningError,
    InvalidDeviceError,
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
    UnsupportedSchedulerError,
)
from .files import DIFFUSERS_WEIGHTS, digest, read_json, weight_files
from .flow import FLOW_SCHEDULERS, FlowSchedule
from .flow_pipelines import load_flow_pipeline
from .pipelines import FLOW_PIPELINE_CLASSES, TEXT_PIPELINES, VP_SCHEDULERS, load_text_pipeline, pipeline_class
from .prompts import DEFAULT_CACHE_SIZE, PromptCache
from .rows import PassRows, SampleRows
from .text_to_image import ModelKind, SizeLimits, TextToImageModel

DTypeName = Literal["float32", "float16", "bfloat16", "float64"]
# float64 is for reference runs (batch-invariance and cross-checks), not for serving.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

BUILTIN_ROOT = Path(__file__).resolve().parent / "builtin"


@dataclass(frozen=True)
class Builtin:
    folder: Path
    null_class: int | None
    description: str


BUILTINS: dict[str, Builtin] = {
    "mnist": Builtin(
        BUILTIN_ROOT / "mnist",
        null_class=10,
        description="class-conditional MNIST digits 0-9 (label 10 = null class), 28x28, trained by this project",
    ),
    "mnist-flow": Builtin(
        BUILTIN_ROOT / "mnist-flow",
        null_class=10,
        description="class-conditional MNIST digits 0-9 (label 10 = null class), 28x28, a rectified-flow "
        "(velocity) UNet trained by this project",
    ),
}

UNET_CLASSES: dict[str, type[UNet2DModel] | type[UNet2DConditionModel]] = {
    "UNet2DModel": UNet2DModel,
    "UNet2DConditionModel": UNet2DConditionModel,
}
WEIGHTS_NAME = DIFFUSERS_WEIGHTS.single
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


@dataclass(frozen=True)
class ModelFiles:
    """Where a model's files are.

    Attributes:
        kind: "builtin", "directory" or "hub".
        root: the folder the source named (the snapshot folder for a hub id).
        unet_dir: the folder holding the denoising network's config.json and weights (unet/, or a
            flow pipeline's transformer/).
        scheduler_config: the scheduler's JSON config file.
    """

    kind: Literal["builtin", "directory", "hub"]
    root: Path
    unet_dir: Path
    scheduler_config: Path


def resolve_device(spec: str) -> torch.device:
    """ "auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or "mps" as a torch device.

    Raises:
        InvalidDeviceError: an unknown spelling, or a device this host does not have.
    """
    if not isinstance(spec, str) or not _DEVICE.match(spec):
        raise InvalidDeviceError("device", spec, "auto, cpu, cuda, cuda:N or mps")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise InvalidDeviceError("device", spec, f"a CUDA device index below {count} (this host has {count})")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidDeviceError("device", spec, "auto or cpu (MPS is not available on this host)")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise InvalidDeviceError("dtype", name, f"one of {', '.join(DTYPES)}")
    return DTYPES[name]


def find_files(source: str | Path, hub_cache: Path | None = None) -> ModelFiles:
    """Resolve a source to its files without reading the weights.

    Raises:
        ModelNotFoundError: an unknown name, a missing folder, a hub id absent from the cache.
        ModelLoadError: a folder that is not in diffusers layout.
    """
    return _layout(*find_root(source, hub_cache))


def find_root(source: str | Path, hub_cache: Path | None = None) -> tuple[Path, Literal["builtin", "directory", "hub"]]:
    """The folder a source names, and what kind of source it is; nothing is read.

    Raises:
        ModelNotFoundError: an unknown name, a missing folder, a hub id absent from the cache.
        ModelLoadError: a file where a folder belongs.
    """
    text = str(source)
    if isinstance(source, str) and source in BUILTINS:
        return BUILTINS[source].folder, "builtin"
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(path, "is a file: expected a diffusers folder (a pipeline or a UNet folder)")
        return path, "directory"
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _cached_snapshot(text, hub_cache), "hub"
    raise ModelNotFoundError(
        f"model source {text!r} not found: expected a built-in name ({', '.join(sorted(BUILTINS))}), "
        "an existing diffusers folder, or a hub id 'org/name' in the local Hugging Face cache"
    )


def _cached_snapshot(repo_id: str, hub_cache: Path | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=hub_cache))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError, OSError) as error:
        raise ModelNotFoundError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache ({hub_cache or constants.HF_HUB_CACHE}); "
            "nothing is downloaded at run time: fetch it on a connected machine with "
            f"`huggingface-cli download {repo_id}` (same HF_HOME), or pass a local folder "
            f"({type(error).__name__})"
        ) from None


def _layout(root: Path, kind: Literal["builtin", "directory", "hub"]) -> ModelFiles:
    network = next((root / name for name in ("unet", "transformer") if (root / name).is_dir()), None)
    if network is not None:  # a pipeline: a UNet, or the transformer of SD3 / Flux
        unet_dir = network
        candidates = [root / "scheduler" / "scheduler_config.json"]
    elif (root / "config.json").is_file():
        unet_dir = root
        candidates = [root / "scheduler_config.json", root / "scheduler" / "scheduler_config.json"]
    else:
        if kind == "builtin" and not root.exists():
            raise ModelLoadError(root, "the built-in model is missing from this checkout")
        raise ModelLoadError(
            root,
            "not a diffusers model folder: expected unet/ or transformer/ and scheduler/ (a pipeline) or "
            "config.json (a UNet)",
        )
    scheduler = next((c for c in candidates if c.is_file()), None)
    if scheduler is None:
        raise ModelLoadError(
            candidates[0], "missing: the scheduler config defines the noise levels the UNet was trained on"
        )
    return ModelFiles(kind, root, unet_dir, scheduler)


def fingerprint(files: ModelFiles, weights: list[Path]) -> str:
    """SHA-256 over the weight files' bytes and the UNet and scheduler configs (see files.digest)."""
    return digest(weights, [files.unet_dir / "config.json", files.scheduler_config])


class DiffusionModel:
    """A loaded diffusion model: the UNet on its device and dtype, its trained schedule, and what
    conditioning it takes. `conditioned(...)` gives the `Denoiser` the solvers run.

    Attributes:
        name: the name it was loaded under.
        source: the source string it was loaded from.
        fingerprint: SHA-256 hex of weights and configs.
        unet, schedule: the network (eval mode, gradients off for its parameters) and its trained
            parameterisation (a VPDiscreteSchedule, or a FlowSchedule for a rectified-flow UNet).
        device, dtype: where and in what precision the network runs.
        num_class_embeds: size of the class-label table, None for models without labels.
        null_class: the label of the unconditional pass, None when the model has none.
        cross_attention_dim: width of the encoder embeddings, None when it takes none.
        sample_shape: (C, H, W) of one sample.
        scheduler_config: the scheduler config as read (for driving diffusers' own schedulers).
        sigma_min, sigma_max, sigma_levels: as the Denoiser contract.
    """

    kind: ModelKind = "class-conditional"

    def __init__(
        self,
        name: str,
        source: str,
        unet: UNet2DModel | UNet2DConditionModel,
        schedule: Parameterisation,
        fingerprint: str,
        null_class: int | None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        traits = unet_traits(unet)
        if null_class is not None and (
            traits.num_class_embeds is None or not 0 <= null_class < traits.num_class_embeds
        ):
            allowed = (
                "None (the model has no labels)"
                if traits.num_class_embeds is None
                else (f"a label in 0..{traits.num_class_embeds - 1}")
            )
            raise InvalidConditioningError("null_class", null_class, allowed)
        if traits.added_inputs:
            raise UnsupportedModelError(
                "unet.addition_embed_type",
                unet.config["addition_embed_type"],
                "None for a bare UNet (load the whole pipeline folder, with its model_index.json)",
            )
        self.name = name
        self.source = source
        self.unet = unet
        self.schedule = schedule
        self.fingerprint = fingerprint
        self.scheduler_config = dict(scheduler_config or {})
        self.device = unet.device
        self.dtype = unet.dtype
        self.num_class_embeds = traits.num_class_embeds
        self.cross_attention_dim = traits.cross_attention_dim
        self.null_class = null_class
        size = unet.config["sample_size"]
        if isinstance(size, int):
            height, width = size, size
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            height, width = size
        else:
            raise UnsupportedModelError("unet.sample_size", size, "an integer or [height, width]")
        self.sample_shape = (int(unet.config["in_channels"]), int(height), int(width))
        self.sigma_min = schedule.sigma_min
        self.sigma_max = schedule.sigma_max
        self.sigma_levels = schedule.sigma_levels

    @property
    def prediction_type(self) -> str:
        return self.schedule.prediction_type

    @property
    def default_size(self) -> tuple[int, int]:
        """(height, width) of a sample: a pixel-space model has the one size it was trained at."""
        return (self.sample_shape[1], self.sample_shape[2])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The solver state's shape for a height x width sample: the sample itself, at the trained size.

        Raises:
            InvalidConditioningError: another size.
        """
        if (height, width) != self.default_size:
            raise InvalidConditioningError(
                "height x width",
                f"{height} x {width}",
                f"{self.default_size[0]} x {self.default_size[1]} for this model",
            )
        return self.sample_shape

    def decode(self, samples: Tensor) -> Tensor:
        """Images in [-1, 1] (B, C, H, W), float32: a pixel-space model's samples are its images."""
        return samples.float().clamp(-1.0, 1.0)

    def conditioned(
        self,
        labels: Tensor | None = None,
        guidance: float | Tensor = 1.0,
        *,
        embeddings: Tensor | None = None,
        null_embeddings: Tensor | None = None,
    ) -> UNetDenoiser:
        """The denoiser with this conditioning bound.

        Args:
            labels: class labels (B,), int64, in 0..num_class_embeds-1 (the null class included:
                that sample is unconditional); None means unconditional sampling (the null class
                for a class-conditional model), with guidance 1.
            guidance: w, float or tensor (B,): D = D_u + w (D_c - D_u). 1 = conditional only,
                0 = unconditional only (1 network evaluation per call), else 2 per call.
            embeddings, null_embeddings: encoder hidden states (B, L, D) of the conditional and
                unconditional passes, for a UNet2DConditionModel with cross-attention.
        Raises:
            InvalidConditioningError: naming the argument and what is allowed.
        """
        w = torch.as_tensor(guidance, dtype=torch.float64).detach().cpu()
        guided = bool((w != 1).any())
        if labels is None and self.num_class_embeds is not None and embeddings is None:
            if guided:
                raise InvalidConditioningError("guidance", guidance, "1.0 when labels is None (unconditional)")
            if self.null_class is None:
                raise InvalidConditioningError(
                    "labels", None, f"class labels in 0..{self.num_class_embeds - 1} (this model has no null class)"
                )
            # A 0-dim label applies to every sample of whatever batch comes.
            return UNetDenoiser(self.unet, self.schedule, labels=torch.tensor(self.null_class))
        null_labels = None
        if labels is not None and guided:
            if self.null_class is None:
                raise InvalidConditioningError(
                    "guidance", guidance, "1.0: this model has no null class (set null_class in the models config)"
                )
            null_labels = torch.full_like(labels, self.null_class)
        if self.num_class_embeds is None and labels is None and guided and embeddings is None:
            raise InvalidConditioningError("guidance", guidance, "1.0 for an unconditional model")
        return UNetDenoiser(
            self.unet,
            self.schedule,
            labels=labels,
            null_labels=null_labels,
            embeddings=embeddings,
            null_embeddings=null_embeddings,
            guidance=guidance,
        )

    def sample_rows(
        self, labels: Tensor | None = None, guidance: float | Tensor = 1.0, *, count: int = 1
    ) -> SampleRows:
        """Per-row conditioning of samples for step-level batching (models.rows): the labels' rows,
        and the null class's where a sample's guidance needs the unconditional pass.

        Args:
            labels: as `conditioned` ((B,) int64, or None: unconditional, guidance 1).
            guidance: w, float or tensor (B,).
            count: the number of samples when labels is None.
        Raises:
            InvalidConditioningError: as `conditioned`.
        """
        self.conditioned(labels, guidance)  # the same checks, the same messages
        size = int(labels.shape[0]) if labels is not None else count
        w = torch.as_tensor(guidance, dtype=torch.float64).detach().cpu().expand(size).clone()
        if labels is None:
            if self.num_class_embeds is None:
                return SampleRows(PassRows(size), None, w)
            assert self.null_class is not None  # conditioned() refuses labels None without one
            labels = torch.full((size,), self.null_class, dtype=torch.int64)
        labels = labels.to(device=self.device, dtype=torch.int64)
        uncond = None
        if bool((w != 1).any()) and self.null_class is not None:
            uncond = PassRows(size, labels=torch.full_like(labels, self.null_class))
        return SampleRows(PassRows(size, labels=labels), uncond, w)

    def rows_denoiser(self, rows: PassRows, height: int | None = None, width: int | None = None) -> UNetDenoiser:
        """The unguided denoiser whose row k runs the pass of `rows` row k (the size is the model's)."""
        placement = (self.device, self.dtype)
        if rows.labels is None:
            return UNetDenoiser(self.unet, self.schedule, placement=placement)
        return UNetDenoiser(self.unet, self.schedule, labels=rows.labels, placement=placement)

    def __repr__(self) -> str:
        return (
            f"DiffusionModel(name={self.name!r}, source={self.source!r}, device={self.device}, dtype={self.dtype}, "
            f"fingerprint={self.fingerprint[:12]})"
        )


Model = DiffusionModel | TextToImageModel
"""What `load` returns; `kind` tells which."""


def class_conditional(model: Model) -> DiffusionModel:
    """`model` as a class-conditional DiffusionModel, for callers that drive labels (benchmarks on
    mnist-like models).

    Raises:
        UnsupportedModelError: a text-to-image model.
    """
    if not isinstance(model, DiffusionModel):
        raise UnsupportedModelError(
            "model", f"{model.name} ({model.kind})", "a class-conditional or unconditional UNet model here"
        )
    return model


def load(
    source: str | Path,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: DTypeName | str = "float32",
    channels_last: bool = False,
    null_class: int | None = None,
    hub_cache: Path | None = None,
    text_encoder_device: str | None = None,
    prompt_cache: PromptCache | None = None,
    size_limits: SizeLimits | None = None,
    variant: str | None = None,
) -> Model:
    """Load a diffusion model (see the module docstring for the sources).

    Args:
        source: a built-in name, a local folder or a cached hub id.
        name: what to call it (default: the source).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        dtype: "float32", "float16" or "bfloat16": the network's precision (the solver state stays
            in its own dtype; see UNetDenoiser); a text pipeline's text encoders too, and its VAE
            unless the VAE config says force_upcast (float32 then, under float16).
        channels_last: run the network in channels-last memory format (faster convolutions on
            recent GPUs).
        null_class: the label of the unconditional pass of a class-conditional model (built-ins
            know theirs).
        hub_cache: the Hugging Face hub cache folder (default: huggingface_hub's, from HF_HOME /
            HF_HUB_CACHE).
        text_encoder_device: where a text pipeline's text encoders run (default: `device`), e.g.
            "cpu" to leave the accelerator's memory to the UNet and VAE.
        prompt_cache: the LRU cache of encoded prompts (default: a new one of DEFAULT_CACHE_SIZE).
        size_limits: the image sizes a text pipeline accepts (default: SizeLimits()).
        variant: read a precision variant's weight files (e.g. "fp16": `*.fp16.safetensors`) of a
            text pipeline; None: the plain ones. `dtype` still decides the precision it runs in.
    Returns:
        a DiffusionModel (kind "class-conditional": a UNet, optionally with labels) or a
        TextToImageModel (kind "text-to-image": a StableDiffusion, SDXL, SD3 or Flux pipeline folder).
    Raises:
        ModelNotFoundError, ModelLoadError, UnsupportedSchedulerError, UnsupportedModelError,
        InvalidDeviceError.
    """
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    root, kind = find_root(source, hub_cache)
    pipeline = pipeline_class(root)
    if pipeline in TEXT_PIPELINES or pipeline in FLOW_PIPELINE_CLASSES:
        if null_class is not None:
            raise InvalidConditioningError("null_class", null_class, "None for a text-to-image pipeline")
        load_pipeline = load_text_pipeline if pipeline in TEXT_PIPELINES else load_flow_pipeline
        return load_pipeline(
            root,
            pipeline,
            name=name or str(source),
            source=str(source),
            device=torch_device,
            dtype=torch_dtype,
            text_encoder_device=torch_device if text_encoder_device is None else resolve_device(text_encoder_device),
            cache=prompt_cache if prompt_cache is not None else PromptCache(DEFAULT_CACHE_SIZE),
            limits=size_limits or SizeLimits(),
            variant=variant,
        )
    if variant is not None:
        raise UnsupportedModelError("variant", variant, "None for a bare UNet model (variants are read for pipelines)")
    return _load_unet(source, root, kind, torch_device, torch_dtype, channels_last, null_class, name)


def _load_unet(
    source: str | Path,
    root: Path,
    kind: Literal["builtin", "directory", "hub"],
    torch_device: torch.device,
    torch_dtype: torch.dtype,
    channels_last: bool,
    null_class: int | None,
    name: str | None,
) -> DiffusionModel:
    files = _layout(root, kind)
    if files.kind == "builtin" and null_class is None:
        null_class = BUILTINS[str(source)].null_class
    unet_config = read_json(files.unet_dir / "config.json")
    class_name = unet_config.get("_class_name")
    if class_name not in UNET_CLASSES:
        raise UnsupportedModelError(
            f"{files.unet_dir / 'config.json'}: _class_name", class_name, f"one of {', '.join(UNET_CLASSES)}"
        )
    scheduler_config = read_json(files.scheduler_config)
    scheduler_class = scheduler_config.get("_class_name")
    schedule: Parameterisation
    if scheduler_class in FLOW_SCHEDULERS:
        schedule = FlowSchedule.from_config(scheduler_config)
    elif scheduler_class is None or scheduler_class in VP_SCHEDULERS:
        schedule = VPDiscreteSchedule.from_config(scheduler_config)
    else:
        raise UnsupportedSchedulerError(
            f"{files.scheduler_config}: _class_name",
            scheduler_class,
            "a discrete DDPM-family scheduler ("
            + ", ".join(sorted(VP_SCHEDULERS))
            + ") or a flow-matching one ("
            + ", ".join(sorted(FLOW_SCHEDULERS))
            + ")",
        )
    weights = weight_files(files.unet_dir)
    unet = _build_unet(UNET_CLASSES[class_name], files.unet_dir, torch_dtype)
    unet_traits(unet)  # UnsupportedModelError before anything is moved to a device
    unet.eval().requires_grad_(False)
    torch.nn.Module.to(unet, torch_device)  # in place; diffusers' typed `to` wrapper confuses checkers
    if channels_last:
        torch.nn.Module.to(unet, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch accepts it
    return DiffusionModel(
        name or str(source), str(source), unet, schedule, fingerprint(files, weights), null_class, scheduler_config
    )


def _build_unet(
    cls: type[UNet2DModel] | type[UNet2DConditionModel], unet_dir: Path, dtype: torch.dtype
) -> UNet2DModel | UNet2DConditionModel:
    try:
        loaded: Any = cls.from_pretrained(
            str(unet_dir),
            use_safetensors=True,
            local_files_only=True,
            torch_dtype=dtype,
            output_loading_info=True,
            # accelerate (not a runtime dependency) loads weights straight into empty modules; without
            # it diffusers copies them into built ones (the same model) and says so: tell it instead.
            low_cpu_mem_usage=is_accelerate_available(),
        )
        unet, info = loaded
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        message = " ".join(str(error).split())[:400]
        raise ModelLoadError(
            unet_dir, f"the weights do not fit config.json ({type(error).__name__}: {message})"
        ) from None
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {list(v)[:3]}{' ...' if len(v) > 3 else ''}" for k, v in problems.items()
        )
        raise ModelLoadError(unet_dir / WEIGHTS_NAME, f"does not fit config.json ({detail})")
    return unet


__all__ = [
    "BUILTINS",
    "DTYPES",
    "DiffusionModel",
    "Model",
    "ModelFiles",
    "TextToImageModel",
    "class_conditional",
    "find_files",
    "fingerprint",
    "load",
    "resolve_device",
    "resolve_dtype",
    "weight_files",
]
