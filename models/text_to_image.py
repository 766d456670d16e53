"""Text-to-image latent models (Stable Diffusion, SDXL) as `solvers.Denoiser`s over latents.

A `TextToImageModel` is three parts, each replaceable by model family:
- a `PromptEncoder` (prompts.py): texts -> per-token states and pooled vectors, cached;
- a backbone: the denoising network with its noise parameterisation, which binds encoded prompts,
  guidance and the image size into a `Denoiser` (here `UNetTextBackbone`: a DDPM-family UNet with
  cross-attention, SDXL's added text/time embedding when the UNet has one; the rectified-flow
  transformers of SD3 and Flux are flow_transformers.py's);
- a `LatentCodec` (latent_codec.py): the VAE, images <-> latents.

The model itself does what is common to all of them: validate the size against the VAE factor and
the size limits, encode the prompts of a request once, choose the unconditional pass (a negative
prompt, the empty prompt, or zeros where the pipeline says `force_zeros_for_empty_prompt`) and run
only the passes the per-sample guidance needs. Depends on the solver contract's conventions and
on diffusers; never on the service or the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from diffusers.models import UNet2DConditionModel
from torch import Tensor

from solvers.contract import Denoiser

from .diffusers_unet import UNetDenoiser, VPDiscreteSchedule, unet_traits
from .errors import InvalidConditioningError, UnsupportedModelError
from .latent_codec import LatentCodec
from .prompts import PromptBatch, PromptEncoder
from .rows import PassRows, SampleRows

ModelKind = Literal["class-conditional", "text-to-image"]


@dataclass(frozen=True)
class SizeLimits:
    """The image sizes a model accepts: each side a multiple of the VAE factor in min_side..max_side
    pixels, and at most max_pixels pixels."""

    min_side: int = 32
    max_side: int = 2048
    max_pixels: int = 2048 * 2048


class Backbone(Protocol):
    """The denoising network of a text-to-image model, with its noise parameterisation.

    Attributes:
        sigma_min, sigma_max, sigma_levels: as the Denoiser contract (the trained range).
        prediction_type: what the network predicts ("epsilon", "v_prediction", "flow", ...).
        device, dtype: where and in what precision it runs.
        default_latent_size: (h, w) of the latents it was trained at.
        patch: latent pixels per token side (1 for a UNet, 2 for the transformers' patches).
        max_latent_side: the largest latent side it can position, or None for no limit.
        guidance_distilled: guidance is the network's input (one pass, no negative prompt).
    """

    sigma_min: float
    sigma_max: float
    sigma_levels: Tensor | None
    prediction_type: str
    device: torch.device
    dtype: torch.dtype
    default_latent_size: tuple[int, int]
    patch: int
    max_latent_side: int | None
    guidance_distilled: bool

    def denoiser(
        self, cond: PromptBatch | None, uncond: PromptBatch | None, guidance: Tensor, height: int, width: int
    ) -> Denoiser:
        """The denoiser over latents of an image of height x width pixels; `cond` / `uncond` are
        None when no sample needs that pass."""
        ...

    def noise_range(self, height: int, width: int) -> tuple[float, float, Tensor | None]:
        """(sigma_min, sigma_max, sigma_levels) of its denoiser at this image size (pixels)."""
        ...


class UNetTextBackbone:
    """A text-conditioned UNet2DConditionModel trained with a DDPM-family schedule (SD, SDXL).

    Args:
        unet: eval mode, gradients off, on its device and dtype.
        schedule: the trained schedule (scheduler config's betas and prediction type).
    """

    patch = 1
    max_latent_side: int | None = None
    guidance_distilled = False

    def __init__(self, unet: UNet2DConditionModel, schedule: VPDiscreteSchedule) -> None:
        traits = unet_traits(unet)
        if traits.cross_attention_dim is None:
            raise UnsupportedModelError("unet.cross_attention_dim", None, "a UNet with cross-attention blocks")
        if traits.num_class_embeds is not None:
            raise UnsupportedModelError("unet.num_class_embeds", traits.num_class_embeds, "None in a text pipeline")
        self.unet = unet
        self.schedule = schedule
        self.traits = traits
        self.sigma_min, self.sigma_max = schedule.sigma_min, schedule.sigma_max
        self.sigma_levels: Tensor | None = schedule.sigmas
        self.prediction_type: str = schedule.prediction_type
        self.device, self.dtype = unet.device, unet.dtype
        size = unet.config["sample_size"]
        side = (size, size) if isinstance(size, int) else tuple(size)
        self.default_latent_size: tuple[int, int] = (int(side[0]), int(side[1]))
        self.time_ids = "time_ids" in traits.added_inputs

    def denoiser(
        self, cond: PromptBatch | None, uncond: PromptBatch | None, guidance: Tensor, height: int, width: int
    ) -> UNetDenoiser:
        return UNetDenoiser(
            self.unet,
            self.schedule,
            embeddings=None if cond is None else cond.hidden,
            null_embeddings=None if uncond is None else uncond.hidden,
            added=self._added(cond, height, width),
            null_added=self._added(uncond, height, width),
            guidance=guidance,
            placement=(self.device, self.dtype),
        )

    def noise_range(self, height: int, width: int) -> tuple[float, float, Tensor | None]:
        return self.sigma_min, self.sigma_max, self.sigma_levels  # the trained levels, at any size

    def _added(self, prompts: PromptBatch | None, height: int, width: int) -> dict[str, Tensor] | None:
        if prompts is None or not self.traits.added_inputs:
            return None
        if prompts.pooled is None:
            raise InvalidConditioningError("pooled", None, "a pooled text embedding for this UNet's text_embeds")
        batch = prompts.hidden.shape[0]
        # SDXL's micro-conditioning: original size, crop top-left, target size. A generated image is
        # uncropped at its own size; the unconditional pass gets the same ids, as diffusers does.
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float64).expand(batch, 6)
        return {"text_embeds": prompts.pooled, "time_ids": ids}


class TextToImageModel:
    """A loaded text-to-image pipeline: prompt encoder, backbone and VAE, each loaded once.

    Attributes:
        kind: "text-to-image".
        name, source, fingerprint: as DiffusionModel (the fingerprint covers every component).
        pipeline_class: the diffusers pipeline class it was saved as.
        prompts, backbone, codec: the parts (see the module docstring).
        force_zeros_for_empty_prompt: the unconditional pass without a negative prompt is zeros
            (SDXL) rather than the empty prompt's encoding.
        guidance_distilled: guidance is an input of the network (Flux dev): one pass per step,
            no negative prompt.
        size_multiple: image sides are multiples of this (the VAE factor times the backbone's patch).
        default_size: (height, width) in pixels the model was trained at.
        sample_shape: the latent shape at the default size.
        limits: the accepted image sizes.
        sigma_min, sigma_max, sigma_levels, prediction_type, device, dtype: the backbone's.
        scheduler_config: the pipeline's scheduler config as read.
    """

    kind: ModelKind = "text-to-image"

    def __init__(
        self,
        name: str,
        source: str,
        *,
        pipeline_class: str,
        prompts: PromptEncoder,
        backbone: Backbone,
        codec: LatentCodec,
        fingerprint: str,
        force_zeros_for_empty_prompt: bool,
        limits: SizeLimits,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.source = source
        self.pipeline_class = pipeline_class
        self.prompts = prompts
        self.backbone = backbone
        self.codec = codec
        self.fingerprint = fingerprint
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.limits = limits
        self.scheduler_config = dict(scheduler_config or {})
        self.guidance_distilled = backbone.guidance_distilled
        self.size_multiple = codec.factor * backbone.patch
        self.sigma_min, self.sigma_max = backbone.sigma_min, backbone.sigma_max
        self.sigma_levels = backbone.sigma_levels
        self.prediction_type = backbone.prediction_type
        self.device, self.dtype = backbone.device, backbone.dtype
        h, w = backbone.default_latent_size
        self.default_size = (h * codec.factor, w * codec.factor)
        self.sample_shape = codec.latent_shape(*self.default_size)

    @property
    def num_class_embeds(self) -> None:
        return None

    @property
    def null_class(self) -> None:
        return None

    def check_size(self, height: int, width: int) -> tuple[int, int]:
        """Validate an image size.

        Raises:
            InvalidConditioningError: naming `height` or `width`, the value and what is allowed.
        """
        limits, factor = self.limits, self.size_multiple
        largest = limits.max_side
        if self.backbone.max_latent_side is not None:
            largest = min(largest, self.backbone.max_latent_side * self.codec.factor)
        smallest = max(limits.min_side, factor)
        allowed = f"a multiple of {factor} in {smallest}..{largest}"
        if self.backbone.patch > 1:
            allowed += f" (the VAE's factor {self.codec.factor} x the transformer's {self.backbone.patch} x 2 patches)"
        for field, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidConditioningError(field, value, allowed)
            if value % factor or not smallest <= value <= largest:
                raise InvalidConditioningError(field, value, allowed)
        if height * width > limits.max_pixels:
            raise InvalidConditioningError(
                "height x width", f"{height} x {width}", f"at most {limits.max_pixels} pixels"
            )
        return height, width

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a height x width image (validated, see check_size)."""
        return self.codec.latent_shape(*self.check_size(height, width))

    def noise_range(self, height: int, width: int) -> tuple[float, float, Tensor | None]:
        """(sigma_min, sigma_max, sigma_levels) of the denoiser at this image size: the model's own
        unless its shift depends on the size (Flux's dynamic shift). Validates the size."""
        self.check_size(height, width)
        return self.backbone.noise_range(height, width)

    def dropped_tokens(self, texts: Sequence[str]) -> list[int]:
        """Per text, how many tokens truncation to the encoders' context cuts (as diffusers cuts them)."""
        return [self.prompts.dropped_tokens(text) for text in texts]

    def conditioned(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str | None] | None = None,
        guidance: float | Tensor = 1.0,
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> Denoiser:
        """The denoiser over latents (B, C, h, w) for these prompts.

        Args:
            prompts: one text per sample (B).
            negative_prompts: one per sample, the unconditional pass's texts; None (for all, or for
                one sample): the empty prompt, or zeros where force_zeros_for_empty_prompt.
            guidance: w, a float or a tensor (B,): D = D_u + w (D_c - D_u); 1 = conditional only,
                0 = unconditional only (one network evaluation per call), else both halves in one
                forward (evals_per_call 2). A guidance-distilled model reads w as its input
                (one pass, any w) and takes no negative prompts.
            height, width: the image size in pixels (default: the model's).
        Raises:
            InvalidConditioningError: naming the argument and what is allowed.
        """
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        self.check_size(height, width)
        texts = _texts("prompts", prompts)
        batch = len(texts)
        negatives: list[str | None] = [None] * batch
        if negative_prompts is not None:
            if isinstance(negative_prompts, str) or not all(t is None or isinstance(t, str) for t in negative_prompts):
                raise InvalidConditioningError("negative_prompts", negative_prompts, "a list of strings (or None)")
            negatives = list(negative_prompts)
            if len(negatives) != batch:
                raise InvalidConditioningError(
                    "negative_prompts", f"{len(negatives)} texts", f"{batch}, one per prompt"
                )
        w = torch.as_tensor(guidance, dtype=torch.float64).detach().cpu()
        if w.dim() > 1 or (w.dim() == 1 and w.shape[0] != batch) or not bool(torch.isfinite(w).all()):
            raise InvalidConditioningError("guidance", guidance, f"a finite number or a tensor of shape ({batch},)")
        w = w.expand(batch) if w.dim() == 0 else w
        if self.guidance_distilled:
            given = [k for k, n in enumerate(negatives) if n is not None]
            if given:
                raise InvalidConditioningError(
                    "negative_prompts",
                    f"a negative prompt for sample {given[0]}",
                    "none: this model is guidance-distilled (guidance is an input of the network, one pass per "
                    "step; true CFG needs a model without guidance_embeds)",
                )
            cond = _to(self.prompts.encode(texts), self.device)
            return self.backbone.denoiser(cond, None, w.clone(), height, width)
        # Only the passes some sample needs are encoded and run.
        cond = self.prompts.encode(texts) if bool((w != 0).any()) else None
        uncond = None
        if bool((w != 1).any()):
            uncond = self._unconditional(texts, negatives, cond)
        return self.backbone.denoiser(_to(cond, self.device), _to(uncond, self.device), w.clone(), height, width)

    def sample_rows(
        self,
        prompts: Sequence[str],
        negative_prompts: Sequence[str | None] | None = None,
        guidance: float | Tensor = 1.0,
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> SampleRows:
        """Per-row conditioning of these samples for step-level batching (models.rows): the
        arguments and checks of `conditioned`, each prompt encoded once; `rows_denoiser` at the
        same size runs any mix of such rows in one forward."""
        denoiser = self.conditioned(prompts, negative_prompts, guidance, height=height, width=width)
        del denoiser  # validated and encoded (the encodings are cached): the rows reuse them
        texts = list(prompts)
        batch = len(texts)
        negatives: list[str | None] = list(negative_prompts) if negative_prompts is not None else [None] * batch
        w = torch.as_tensor(guidance, dtype=torch.float64).detach().cpu().expand(batch).clone()
        if self.guidance_distilled:
            cond = _to(self.prompts.encode(texts), self.device)
            assert cond is not None
            rows = PassRows(batch, hidden=cond.hidden, pooled=cond.pooled, scale=w)
            return SampleRows(rows, None, torch.ones(batch, dtype=torch.float64))
        encoded = _to(self.prompts.encode(texts), self.device) if bool((w != 0).any()) else None
        uncond = None
        if bool((w != 1).any()):
            uncond = _to(self._unconditional(texts, negatives, encoded), self.device)
        return SampleRows(_pass_rows(encoded), _pass_rows(uncond), w)

    def rows_denoiser(self, rows: PassRows, height: int | None = None, width: int | None = None) -> Denoiser:
        """The unguided denoiser over latents of a height x width image (default: the model's) whose
        row k runs the pass of `rows` row k (from `sample_rows` at that size)."""
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        if rows.hidden is None:
            raise InvalidConditioningError("rows.hidden", None, "prompt states (N, L, D) from sample_rows")
        # One pass per row: guidance 1 runs the conditional pass, here the rows' own prompts (an
        # unconditional row carries the negative or empty prompt's states, or SDXL's zeros).
        scale = rows.scale if rows.scale is not None else torch.ones(rows.size, dtype=torch.float64)
        return self.backbone.denoiser(PromptBatch(rows.hidden, rows.pooled), None, scale, height, width)

    def _unconditional(self, texts: list[str], negatives: list[str | None], cond: PromptBatch | None) -> PromptBatch:
        """The unconditional pass's embeddings: the negative prompt where given, else the empty
        prompt's, or zeros where the pipeline says force_zeros_for_empty_prompt."""
        if not self.force_zeros_for_empty_prompt:
            return self.prompts.encode([n if n is not None else "" for n in negatives])
        given = [n for n in negatives if n is not None]
        encoded = self.prompts.encode(given) if given else None
        if len(given) == len(negatives) and encoded is not None:
            return encoded
        shape = cond if cond is not None else self.prompts.encode(texts[:1])
        zero = PromptBatch(
            torch.zeros_like(shape.hidden[0]), None if shape.pooled is None else torch.zeros_like(shape.pooled[0])
        )
        hidden, pooled, k = [], [], 0
        for negative in negatives:
            if negative is None:
                hidden.append(zero.hidden)
                pooled.append(zero.pooled)
            else:
                assert encoded is not None
                hidden.append(encoded.hidden[k])
                pooled.append(None if encoded.pooled is None else encoded.pooled[k])
                k += 1
        rows = [p for p in pooled if p is not None]
        return PromptBatch(torch.stack(hidden), torch.stack(rows) if len(rows) == len(pooled) else None)

    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1], float32, from latents (B, C, h, w)."""
        return self.codec.decode(latents)

    def encode(self, images: Tensor) -> Tensor:
        """Latents (B, C, h, w), float32, of images (B, 3, H, W) in [-1, 1] (validated size)."""
        if images.dim() == 4:
            self.check_size(int(images.shape[2]), int(images.shape[3]))
        return self.codec.encode(images)

    def __repr__(self) -> str:
        return (
            f"TextToImageModel(name={self.name!r}, pipeline={self.pipeline_class}, device={self.device}, "
            f"dtype={self.dtype}, fingerprint={self.fingerprint[:12]})"
        )


def _texts(field: str, texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
        raise InvalidConditioningError(field, texts, "a non-empty list of strings, one per sample")
    return list(texts)


def _pass_rows(prompts: PromptBatch | None) -> PassRows | None:
    if prompts is None:
        return None
    return PassRows(int(prompts.hidden.shape[0]), hidden=prompts.hidden, pooled=prompts.pooled)


def _to(prompts: PromptBatch | None, device: torch.device) -> PromptBatch | None:
    if prompts is None:
        return None
    pooled = None if prompts.pooled is None else prompts.pooled.to(device)
    return PromptBatch(prompts.hidden.to(device), pooled)


__all__ = ["Backbone", "ModelKind", "SizeLimits", "TextToImageModel", "UNetTextBackbone"]
