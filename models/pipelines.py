"""Loading diffusers text-to-image pipeline folders (model_index.json) as `TextToImageModel`s.

Supported pipeline classes are listed in `TEXT_PIPELINES`, each with the components it needs and
how they are read; the class-conditional and unconditional pipelines of a bare UNet
(`UNET_PIPELINES`) stay with loading.py's UNet path. Anything else is refused naming the class and
the supported list.

Each component is read once, from safetensors only (pickle files are refused, naming the file),
with its config checked for the keys the adapter sizes things by (a UNet's sample size and
cross-attention width, a VAE's latent channels and blocks). Needs the `text` extra (transformers, tokenizers)
for the text encoders; without it the error names the extra. Depends on files.py, the model parts
and diffusers / transformers; never on the service or the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import AutoencoderKL, UNet2DConditionModel
from diffusers.utils import is_accelerate_available

from .diffusers_unet import VPDiscreteSchedule
from .errors import ModelLoadError, UnsupportedModelError, UnsupportedSchedulerError
from .files import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, WeightNames, digest, read_json, weight_files
from .latent_codec import LatentCodec
from .prompts import ClipPromptEncoder, PromptCache
from .text_to_image import SizeLimits, TextToImageModel, UNetTextBackbone

# Pipelines of one bare UNet and a scheduler: loading.py's class-conditional / unconditional path.
UNET_PIPELINES = ("DDPMPipeline", "DDIMPipeline", "PNDMPipeline")
# Schedulers of the discrete DDPM family (their configs describe betas on a training grid).
VP_SCHEDULERS = frozenset(
    {
        "DDPMScheduler",
        "DDIMScheduler",
        "DDIMInverseScheduler",
        "PNDMScheduler",
        "LMSDiscreteScheduler",
        "EulerDiscreteScheduler",
        "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler",
        "KDPM2DiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler",
        "DPMSolverSinglestepScheduler",
        "DPMSolverSDEScheduler",
        "DEISMultistepScheduler",
        "UniPCMultistepScheduler",
        "SASolverScheduler",
        "TCDScheduler",
        "LCMScheduler",
    }
)
TEXT_EXTRA_HINT = "install the text extra: pip install 'diffusion-sampler-service[text]' (transformers, tokenizers)"


@dataclass(frozen=True)
class PipelineSpec:
    """A supported text-to-image pipeline class.

    Attributes:
        components: the model_index.json entries it needs, with the classes each may be.
        text_encoders: (tokenizer, encoder) component pairs, in the pipeline's order.
        layer: which hidden states the UNet reads ("last" or "penultimate", see ClipPromptEncoder).
        pooled: whether the last encoder's pooled output is an input (SDXL's text_embeds).
        force_zeros_default: force_zeros_for_empty_prompt when model_index.json does not say.
    """

    components: dict[str, tuple[str, ...]]
    text_encoders: tuple[tuple[str, str], ...]
    layer: str
    pooled: bool
    force_zeros_default: bool


_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_SCHEDULERS = tuple(sorted(VP_SCHEDULERS))
TEXT_PIPELINES: dict[str, PipelineSpec] = {
    "StableDiffusionPipeline": PipelineSpec(
        components={
            "unet": ("UNet2DConditionModel",),
            "vae": ("AutoencoderKL",),
            "text_encoder": ("CLIPTextModel",),
            "tokenizer": _TOKENIZERS,
            "scheduler": _SCHEDULERS,
        },
        text_encoders=(("tokenizer", "text_encoder"),),
        layer="last",
        pooled=False,
        force_zeros_default=False,
    ),
    "StableDiffusionXLPipeline": PipelineSpec(
        components={
            "unet": ("UNet2DConditionModel",),
            "vae": ("AutoencoderKL",),
            "text_encoder": ("CLIPTextModel",),
            "text_encoder_2": ("CLIPTextModelWithProjection",),
            "tokenizer": _TOKENIZERS,
            "tokenizer_2": _TOKENIZERS,
            "scheduler": _SCHEDULERS,
        },
        text_encoders=(("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")),
        layer="penultimate",
        pooled=True,
        force_zeros_default=True,
    ),
}
# The rectified-flow transformer pipelines: flow_pipelines.py loads them.
FLOW_PIPELINE_CLASSES = ("StableDiffusion3Pipeline", "FluxPipeline")
SUPPORTED_PIPELINES = (*TEXT_PIPELINES, *FLOW_PIPELINE_CLASSES, *UNET_PIPELINES)
# Config keys the adapter reads to size things (diffusers would silently default them). A VAE config
# without scaling_factor is allowed: SD 1.x folders saved by diffusers 0.6 lack it, and its default,
# 0.18215, is theirs (SD 2 and SDXL state theirs).
REQUIRED_KEYS = {
    "unet": ("in_channels", "out_channels", "sample_size", "cross_attention_dim"),
    "vae": ("latent_channels", "block_out_channels"),
}


def pipeline_class(root: Path) -> str | None:
    """The _class_name of root/model_index.json, None when the folder has no model_index.json.

    Raises:
        UnsupportedModelError: a class that is neither a text pipeline nor a UNet pipeline.
        ModelLoadError: an unreadable model_index.json.
    """
    index = root / "model_index.json"
    if not index.is_file():
        return None
    name = read_json(index).get("_class_name")
    if name not in SUPPORTED_PIPELINES:
        raise UnsupportedModelError(f"{index}: _class_name", name, f"one of {', '.join(SUPPORTED_PIPELINES)}")
    return str(name)


def load_text_pipeline(
    root: Path,
    class_name: str,
    *,
    name: str,
    source: str,
    device: torch.device,
    dtype: torch.dtype,
    text_encoder_device: torch.device,
    cache: PromptCache,
    limits: SizeLimits,
    variant: str | None = None,
) -> TextToImageModel:
    """Load a text-to-image pipeline folder (see the module docstring).

    Raises:
        ModelLoadError: a missing component, file or config key; pickle-only or corrupt weights;
            weights that do not fit their config; the text extra not installed.
        UnsupportedModelError, UnsupportedSchedulerError: a component this adapter cannot drive.
    """
    spec = TEXT_PIPELINES[class_name]
    index_path = root / "model_index.json"
    index = read_json(index_path)
    folders: dict[str, Path] = {}
    for component, classes in spec.components.items():
        entry = index.get(component)
        if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            raise ModelLoadError(
                index_path, f"has no {component!r} component: {class_name} needs {', '.join(spec.components)}"
            )
        if entry[1] not in classes:
            raise UnsupportedModelError(f"{index_path}: {component}", entry[1], f"one of {', '.join(classes)}")
        folder = root / component
        if not folder.is_dir():
            raise ModelLoadError(folder, f"missing: model_index.json lists the {component} component")
        folders[component] = folder
    configs = {
        component: _config(folders[component], component)
        for component in ("unet", "vae")  # the scheduler's is read by _schedule
    }
    scheduler_path = folders["scheduler"] / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path)
    schedule = _schedule(scheduler_path, scheduler_config)
    transformers = _transformers()

    weights: list[Path] = []
    unet_weights = weight_files(folders["unet"], DIFFUSERS_WEIGHTS, "UNet", variant)
    vae_weights = weight_files(folders["vae"], DIFFUSERS_WEIGHTS, "VAE", variant)
    encoder_weights: list[Path] = []
    encoder_configs: list[Path] = []
    tokenizer_files: list[Path] = []
    for tokenizer_name, encoder_name in spec.text_encoders:
        encoder_weights += weight_files(folders[encoder_name], TRANSFORMERS_WEIGHTS, "text encoder", variant)
        encoder_configs.append(folders[encoder_name] / "config.json")
        tokenizer_files += sorted(p for p in folders[tokenizer_name].iterdir() if p.is_file())
    weights = unet_weights + vae_weights + encoder_weights
    component_configs = [folders["unet"] / "config.json", folders["vae"] / "config.json", *encoder_configs]
    fingerprint = digest(weights, [index_path, *component_configs, scheduler_path], raw=tokenizer_files)
    encoder_fingerprint = digest(encoder_weights, encoder_configs, raw=tokenizer_files)

    unet = _diffusers_model(UNet2DConditionModel, folders["unet"], dtype, device, variant)
    upcast = bool(configs["vae"].get("force_upcast", True)) and dtype == torch.float16
    vae = _diffusers_model(AutoencoderKL, folders["vae"], torch.float32 if upcast else dtype, device, variant)
    tokenizers, encoders = [], []
    # Half precision on a CPU is slow and not every kernel has it: text encoders placed on the CPU
    # run in float32 (their output is cast to the UNet's dtype when it is bound).
    half = dtype in (torch.float16, torch.bfloat16)
    encoder_dtype = torch.float32 if text_encoder_device.type == "cpu" and half else dtype
    for tokenizer_name, encoder_name in spec.text_encoders:
        tokenizers.append(_tokenizer(transformers, folders[tokenizer_name]))
        encoder_class = transformers[index[encoder_name][1]]
        encoders.append(
            _transformers_model(encoder_class, folders[encoder_name], encoder_dtype, text_encoder_device, variant)
        )
    prompts = ClipPromptEncoder(
        tokenizers,
        encoders,
        layer="last" if spec.layer == "last" else "penultimate",
        pooled=spec.pooled,
        fingerprint=encoder_fingerprint,
        cache=cache,
    )
    backbone = UNetTextBackbone(unet, schedule)
    _check_widths(folders, backbone, encoders, spec)
    force_zeros = index.get("force_zeros_for_empty_prompt", spec.force_zeros_default)
    return TextToImageModel(
        name,
        source,
        pipeline_class=class_name,
        prompts=prompts,
        backbone=backbone,
        codec=LatentCodec(vae),
        fingerprint=fingerprint,
        force_zeros_for_empty_prompt=bool(force_zeros),
        limits=limits,
        scheduler_config=scheduler_config,
    )


def _config(folder: Path, component: str) -> dict[str, Any]:
    path = folder / "config.json"
    config = read_json(path)
    for key in REQUIRED_KEYS.get(component, ()):
        if key not in config:
            raise ModelLoadError(path, f"has no {key!r}: the {component} config must state it")
    return config


def _schedule(path: Path, config: dict[str, Any]) -> VPDiscreteSchedule:
    scheduler_class = config.get("_class_name")
    if scheduler_class is not None and scheduler_class not in VP_SCHEDULERS:
        raise UnsupportedSchedulerError(
            f"{path}: _class_name", scheduler_class, "a discrete DDPM-family scheduler (" + ", ".join(_SCHEDULERS) + ")"
        )
    try:
        return VPDiscreteSchedule.from_config(config)
    except UnsupportedSchedulerError as error:
        raise UnsupportedSchedulerError(f"{path}: {error.field}", error.value, error.allowed) from None


def _transformers() -> dict[str, Any]:
    """The transformers classes the text side is built from, by the names model_index.json uses."""
    try:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    except ImportError:
        raise ModelLoadError(
            "transformers", f"not installed: text-to-image pipelines need it; {TEXT_EXTRA_HINT}"
        ) from None
    return {
        "CLIPTextModel": CLIPTextModel,
        "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
        "CLIPTokenizer": CLIPTokenizer,
    }


def _tokenizer(transformers: dict[str, Any], folder: Path) -> Any:
    try:
        tokenizer = transformers["CLIPTokenizer"].from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, Exception) as error:  # tokenizers raises its own types
        message = " ".join(str(error).split())[:300]
        raise ModelLoadError(folder, f"not a readable CLIP tokenizer ({type(error).__name__}: {message})") from None
    if not isinstance(tokenizer.model_max_length, int) or not 2 < tokenizer.model_max_length <= 4096:
        raise ModelLoadError(
            folder / "tokenizer_config.json", f"model_max_length={tokenizer.model_max_length} is not 3..4096"
        )
    return tokenizer


def _diffusers_model(cls: Any, folder: Path, dtype: torch.dtype, device: torch.device, variant: str | None) -> Any:
    # accelerate is not a runtime dependency: tell diffusers whether to load into empty modules.
    loaded = _from_pretrained(
        cls,
        folder,
        DIFFUSERS_WEIGHTS.variant(variant),
        torch_dtype=dtype,
        low_cpu_mem_usage=is_accelerate_available(),
        variant=variant,
    )
    return _finish(loaded, device)


def _transformers_model(cls: Any, folder: Path, dtype: torch.dtype, device: torch.device, variant: str | None) -> Any:
    return _finish(
        _from_pretrained(cls, folder, TRANSFORMERS_WEIGHTS.variant(variant), dtype=dtype, variant=variant), device
    )


def _from_pretrained(cls: Any, folder: Path, names: WeightNames, **options: Any) -> Any:
    try:
        module, info = cls.from_pretrained(
            str(folder), use_safetensors=True, local_files_only=True, output_loading_info=True, **options
        )
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        message = " ".join(str(error).split())[:400]
        raise ModelLoadError(
            folder, f"the weights do not fit config.json ({type(error).__name__}: {message})"
        ) from None
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {sorted(v)[:3]}{' ...' if len(v) > 3 else ''}" for k, v in problems.items()
        )
        raise ModelLoadError(folder / names.single, f"does not fit config.json ({detail})")
    return module


def _finish(module: torch.nn.Module, device: torch.device) -> Any:
    module.eval().requires_grad_(False)
    torch.nn.Module.to(module, device)  # in place; diffusers' typed `to` wrapper confuses checkers
    return module


def _check_widths(
    folders: dict[str, Path], backbone: UNetTextBackbone, encoders: list[Any], spec: PipelineSpec
) -> None:
    """The encoders' output widths must be what the UNet reads (a mismatched folder would
    otherwise fail inside the first request)."""
    width = sum(int(e.config.hidden_size) for e in encoders)
    if width != backbone.traits.cross_attention_dim:
        raise ModelLoadError(
            folders["unet"] / "config.json",
            f"cross_attention_dim={backbone.traits.cross_attention_dim} does not match the text encoders' "
            f"hidden size {width}",
        )
    pooled = backbone.traits.added_inputs.get("text_embeds")
    if spec.pooled and pooled is not None and int(encoders[-1].config.projection_dim) != pooled[1]:
        raise ModelLoadError(
            folders["unet"] / "config.json",
            f"projection_class_embeddings_input_dim leaves {pooled[1]} for text_embeds, but "
            f"text_encoder_2 projects to {encoders[-1].config.projection_dim}",
        )
    if spec.pooled != (pooled is not None):
        raise ModelLoadError(
            folders["unet"] / "config.json",
            f"addition_embed_type={backbone.unet.config.get('addition_embed_type')!r} does not fit "
            f"a pipeline whose pooled text input is {'used' if spec.pooled else 'absent'}",
        )


__all__ = [
    "FLOW_PIPELINE_CLASSES",
    "SUPPORTED_PIPELINES",
    "TEXT_PIPELINES",
    "UNET_PIPELINES",
    "VP_SCHEDULERS",
    "PipelineSpec",
    "load_text_pipeline",
    "pipeline_class",
]
