"""Loading StableDiffusion3Pipeline and FluxPipeline folders as `TextToImageModel`s.

The rectified-flow siblings of pipelines.py's SD / SDXL loader, with the same rules: each component
read once, from safetensors only, its config checked for what the adapter sizes things by, and
every mismatch between components (encoder widths, latent channels) a ModelLoadError naming the
file before any request runs.

- StableDiffusion3Pipeline: transformer/ (SD3Transformer2DModel), vae/, CLIP-L and CLIP-G
  (text_encoder/, text_encoder_2/: CLIPTextModelWithProjection), T5 (text_encoder_3/,
  tokenizer_3/), optional: a folder saved without it runs with zeros in its place, as diffusers does.
- FluxPipeline: transformer/ (FluxTransformer2DModel), vae/, CLIP (text_encoder/: CLIPTextModel)
  and T5 (text_encoder_2/).
- Both: scheduler/ a FlowMatchEulerDiscreteScheduler config (its shift, or dynamic shifting); the
  VAE's scaling_factor and shift_factor.

Depends on pipelines.py's readers, the flow backbones and prompt encoders; never on the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models import AutoencoderKL

from .errors import ModelLoadError, UnsupportedModelError, UnsupportedSchedulerError
from .files import DIFFUSERS_WEIGHTS, TRANSFORMERS_WEIGHTS, digest, read_json, weight_files
from .flow import FLOW_SCHEDULERS, FlowSchedule
from .flow_prompts import FLUX_T5_TOKENS, SD3_T5_TOKENS, FluxPromptEncoder, SD3PromptEncoder, T5Text
from .flow_transformers import FLUX_DEFAULT_SAMPLE_SIZE, FluxBackbone, SD3Backbone
from .latent_codec import LatentCodec
from .pipelines import (
    TEXT_EXTRA_HINT,
    _config,
    _diffusers_model,
    _tokenizer,
    _transformers_model,
)
from .prompts import PromptCache
from .text_to_image import SizeLimits, TextToImageModel

_CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
_T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast")


@dataclass(frozen=True)
class FlowPipelineSpec:
    """A supported rectified-flow pipeline class.

    Attributes:
        transformer: the transformer class model_index.json must name.
        components: the other model_index.json entries it needs, with the classes each may be.
        optional: entries that may be null (SD3's T5), with their classes.
    """

    transformer: str
    components: dict[str, tuple[str, ...]]
    optional: dict[str, tuple[str, ...]]


FLOW_PIPELINES: dict[str, FlowPipelineSpec] = {
    "StableDiffusion3Pipeline": FlowPipelineSpec(
        transformer="SD3Transformer2DModel",
        components={
            "vae": ("AutoencoderKL",),
            "text_encoder": ("CLIPTextModelWithProjection",),
            "text_encoder_2": ("CLIPTextModelWithProjection",),
            "tokenizer": _CLIP_TOKENIZERS,
            "tokenizer_2": _CLIP_TOKENIZERS,
            "scheduler": tuple(sorted(FLOW_SCHEDULERS)),
        },
        optional={"text_encoder_3": ("T5EncoderModel",), "tokenizer_3": _T5_TOKENIZERS},
    ),
    "FluxPipeline": FlowPipelineSpec(
        transformer="FluxTransformer2DModel",
        components={
            "vae": ("AutoencoderKL",),
            "text_encoder": ("CLIPTextModel",),
            "text_encoder_2": ("T5EncoderModel",),
            "tokenizer": _CLIP_TOKENIZERS,
            "tokenizer_2": _T5_TOKENIZERS,
            "scheduler": tuple(sorted(FLOW_SCHEDULERS)),
        },
        optional={},
    ),
}
REQUIRED_KEYS = {
    "SD3Transformer2DModel": (
        "in_channels",
        "patch_size",
        "sample_size",
        "joint_attention_dim",
        "pooled_projection_dim",
    ),
    "FluxTransformer2DModel": ("in_channels", "joint_attention_dim", "pooled_projection_dim"),
    "vae": ("latent_channels", "block_out_channels", "scaling_factor"),
}


def load_flow_pipeline(
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
    """Load an SD3 or Flux pipeline folder (see the module docstring).

    Raises:
        ModelLoadError: a missing component, file or config key; pickle-only or corrupt weights;
            components whose widths do not fit each other; the text extra not installed.
        UnsupportedModelError, UnsupportedSchedulerError: a component this adapter cannot drive.
    """
    spec = FLOW_PIPELINES[class_name]
    index_path = root / "model_index.json"
    index = read_json(index_path)
    folders = _folders(root, index, index_path, class_name, spec)
    transformer_config = _config(folders["transformer"], "transformer")
    for key in REQUIRED_KEYS[spec.transformer]:
        if key not in transformer_config:
            raise ModelLoadError(
                folders["transformer"] / "config.json", f"has no {key!r}: the transformer config must state it"
            )
    vae_config = _config(folders["vae"], "vae")
    for key in REQUIRED_KEYS["vae"]:
        if key not in vae_config:
            raise ModelLoadError(folders["vae"] / "config.json", f"has no {key!r}: the VAE config must state it")
    scheduler_path = folders["scheduler"] / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path)
    _check_scheduler(scheduler_path, scheduler_config)
    transformers = _transformers()

    encoder_names = [c for c in ("text_encoder", "text_encoder_2", "text_encoder_3") if c in folders]
    tokenizer_names = [c for c in ("tokenizer", "tokenizer_2", "tokenizer_3") if c in folders]
    transformer_weights = weight_files(folders["transformer"], DIFFUSERS_WEIGHTS, "transformer", variant)
    vae_weights = weight_files(folders["vae"], DIFFUSERS_WEIGHTS, "VAE", variant)
    encoder_weights = [
        path for c in encoder_names for path in weight_files(folders[c], TRANSFORMERS_WEIGHTS, "text encoder", variant)
    ]
    encoder_configs = [folders[c] / "config.json" for c in encoder_names]
    tokenizer_files = [p for c in tokenizer_names for p in sorted(folders[c].iterdir()) if p.is_file()]
    component_configs = [folders["transformer"] / "config.json", folders["vae"] / "config.json", *encoder_configs]
    fingerprint = digest(
        transformer_weights + vae_weights + encoder_weights,
        [index_path, *component_configs, scheduler_path],
        raw=tokenizer_files,
    )
    encoder_fingerprint = digest(encoder_weights, encoder_configs, raw=tokenizer_files)

    transformer_class = _transformer_class(spec.transformer)
    transformer = _diffusers_model(transformer_class, folders["transformer"], dtype, device, variant)
    upcast = bool(vae_config.get("force_upcast", True)) and dtype == torch.float16
    vae = _diffusers_model(AutoencoderKL, folders["vae"], torch.float32 if upcast else dtype, device, variant)
    codec = LatentCodec(vae)
    half = dtype in (torch.float16, torch.bfloat16)
    encoder_dtype = torch.float32 if text_encoder_device.type == "cpu" and half else dtype

    def encoder(component: str) -> Any:
        return _transformers_model(
            transformers[index[component][1]], folders[component], encoder_dtype, text_encoder_device, variant
        )

    def t5_tokenizer(component: str) -> Any:
        return _t5_tokenizer(transformers, folders[component])

    prompts: SD3PromptEncoder | FluxPromptEncoder
    if class_name == "StableDiffusion3Pipeline":
        backbone: SD3Backbone | FluxBackbone = SD3Backbone(transformer, scheduler_config, codec.factor)
        clip_encoders = [encoder("text_encoder"), encoder("text_encoder_2")]
        t5 = None
        if "text_encoder_3" in folders:
            t5 = T5Text(t5_tokenizer("tokenizer_3"), encoder("text_encoder_3"), SD3_T5_TOKENS)
        prompts = SD3PromptEncoder(
            [_tokenizer(transformers, folders["tokenizer"]), _tokenizer(transformers, folders["tokenizer_2"])],
            clip_encoders,
            t5,
            joint_width=int(transformer_config["joint_attention_dim"]),
            fingerprint=encoder_fingerprint,
            cache=cache,
        )
        _check_sd3(folders, transformer_config, vae_config, clip_encoders, t5)
    else:
        vae_side = vae_config.get("sample_size")
        side = int(vae_side) // codec.factor if isinstance(vae_side, int) and vae_side >= codec.factor * 2 else None
        backbone = FluxBackbone(transformer, scheduler_config, codec.factor, side or FLUX_DEFAULT_SAMPLE_SIZE)
        clip = encoder("text_encoder")
        t5 = T5Text(t5_tokenizer("tokenizer_2"), encoder("text_encoder_2"), FLUX_T5_TOKENS)
        prompts = FluxPromptEncoder(
            _tokenizer(transformers, folders["tokenizer"]), clip, t5, fingerprint=encoder_fingerprint, cache=cache
        )
        _check_flux(folders, transformer_config, vae_config, clip, t5)
    return TextToImageModel(
        name,
        source,
        pipeline_class=class_name,
        prompts=prompts,
        backbone=backbone,
        codec=codec,
        fingerprint=fingerprint,
        force_zeros_for_empty_prompt=False,  # SD3 and Flux encode the empty prompt
        limits=limits,
        scheduler_config=scheduler_config,
    )


def _folders(
    root: Path, index: dict[str, Any], index_path: Path, class_name: str, spec: FlowPipelineSpec
) -> dict[str, Path]:
    wanted = {"transformer": (spec.transformer,), **spec.components}
    folders: dict[str, Path] = {}
    for component, classes in {**wanted, **spec.optional}.items():
        entry = index.get(component)
        missing = not isinstance(entry, list) or len(entry) != 2 or entry[1] is None
        if missing and component in spec.optional:
            continue
        if missing:
            raise ModelLoadError(index_path, f"has no {component!r} component: {class_name} needs {', '.join(wanted)}")
        assert isinstance(entry, list)
        if entry[1] not in classes:
            raise UnsupportedModelError(f"{index_path}: {component}", entry[1], f"one of {', '.join(classes)}")
        folder = root / component
        if not folder.is_dir():
            raise ModelLoadError(folder, f"missing: model_index.json lists the {component} component")
        folders[component] = folder
    pairs = [("text_encoder_3", "tokenizer_3")] if spec.optional else []
    for encoder, tokenizer in pairs:
        if (encoder in folders) != (tokenizer in folders):
            present, absent = (encoder, tokenizer) if encoder in folders else (tokenizer, encoder)
            raise ModelLoadError(index_path, f"lists {present} but not {absent}: both or neither")
    return folders


def _check_scheduler(path: Path, config: dict[str, Any]) -> None:
    scheduler_class = config.get("_class_name")
    if scheduler_class not in FLOW_SCHEDULERS:
        raise UnsupportedSchedulerError(
            f"{path}: _class_name", scheduler_class, f"a flow-matching scheduler ({', '.join(sorted(FLOW_SCHEDULERS))})"
        )
    for key in ("invert_sigmas", "stochastic_sampling"):
        if config.get(key):
            raise UnsupportedSchedulerError(f"{path}: {key}", config[key], "false (the deterministic flow ODE)")
    try:
        # Checks the fields the backbones read (mu stands in for a size when the shift is dynamic).
        FlowSchedule.from_config(config, mu=0.0)
    except UnsupportedSchedulerError as error:
        raise UnsupportedSchedulerError(f"{path}: {error.field}", error.value, error.allowed) from None


def _transformers() -> dict[str, Any]:
    try:
        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5Tokenizer,  # transformers 5: the tokenizers-backed one (T5TokenizerFast is its alias)
        )
    except ImportError:
        raise ModelLoadError(
            "transformers", f"not installed: text-to-image pipelines need it; {TEXT_EXTRA_HINT}"
        ) from None
    return {
        "CLIPTextModel": CLIPTextModel,
        "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
        "CLIPTokenizer": CLIPTokenizer,
        "T5EncoderModel": T5EncoderModel,
        "T5Tokenizer": T5Tokenizer,
    }


def _transformer_class(name: str) -> Any:
    from diffusers.models import FluxTransformer2DModel, SD3Transformer2DModel

    return {"SD3Transformer2DModel": SD3Transformer2DModel, "FluxTransformer2DModel": FluxTransformer2DModel}[name]


def _t5_tokenizer(transformers: dict[str, Any], folder: Path) -> Any:
    try:
        return transformers["T5Tokenizer"].from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, Exception) as error:  # tokenizers raises its own types
        message = " ".join(str(error).split())[:300]
        raise ModelLoadError(folder, f"not a readable T5 tokenizer ({type(error).__name__}: {message})") from None


def _check_sd3(
    folders: dict[str, Path],
    transformer: dict[str, Any],
    vae: dict[str, Any],
    clip_encoders: list[Any],
    t5: T5Text | None,
) -> None:
    """The widths that must agree (a mismatched folder would otherwise fail inside the first request)."""
    path = folders["transformer"] / "config.json"
    if transformer["in_channels"] != vae["latent_channels"]:
        raise ModelLoadError(
            path,
            f"in_channels={transformer['in_channels']} does not match the VAE's "
            f"latent_channels={vae['latent_channels']}",
        )
    pooled = sum(int(e.config.projection_dim) for e in clip_encoders)
    if transformer["pooled_projection_dim"] != pooled:
        raise ModelLoadError(
            path,
            f"pooled_projection_dim={transformer['pooled_projection_dim']} does not match the CLIP encoders' "
            f"projections side by side ({pooled})",
        )
    clip_width = sum(int(e.config.hidden_size) for e in clip_encoders)
    if clip_width > transformer["joint_attention_dim"]:
        raise ModelLoadError(
            path,
            f"joint_attention_dim={transformer['joint_attention_dim']} is narrower than the CLIP states ({clip_width})",
        )
    if t5 is not None and t5.width != transformer["joint_attention_dim"]:
        raise ModelLoadError(
            path, f"joint_attention_dim={transformer['joint_attention_dim']} does not match T5's d_model={t5.width}"
        )


def _check_flux(
    folders: dict[str, Path], transformer: dict[str, Any], vae: dict[str, Any], clip: Any, t5: T5Text
) -> None:
    path = folders["transformer"] / "config.json"
    if transformer["in_channels"] != 4 * vae["latent_channels"]:
        raise ModelLoadError(
            path,
            f"in_channels={transformer['in_channels']} is not 4 x the VAE's latent_channels={vae['latent_channels']} "
            "(latents are packed 2 x 2)",
        )
    if transformer["pooled_projection_dim"] != int(clip.config.hidden_size):
        raise ModelLoadError(
            path,
            f"pooled_projection_dim={transformer['pooled_projection_dim']} does not match CLIP's hidden_size="
            f"{clip.config.hidden_size}",
        )
    if t5.width != transformer["joint_attention_dim"]:
        raise ModelLoadError(
            path, f"joint_attention_dim={transformer['joint_attention_dim']} does not match T5's d_model={t5.width}"
        )


__all__ = ["FLOW_PIPELINES", "FlowPipelineSpec", "load_flow_pipeline"]
