"""The rectified-flow transformers of SD3 and Flux as text-to-image backbones.

A backbone binds encoded prompts, guidance and an image size into a `FlowTransformerDenoiser`, a
`solvers.Denoiser` over latents (B, C, h, w) in the EDM form of models/flow.py: the solver steps
x = x_t / (1 - t), the network sees x_t = x / (1 + sigma) at t = sigma / (1 + sigma) and its
velocity v becomes D = (x - sigma v) / (1 + sigma).

- `SD3Backbone`: SD3Transformer2DModel reads latents as they are (it patches them itself), the
  timestep t * N (N = num_train_timesteps), the prompt states and the pooled vector. A static
  shift (SD3's 3.0) or, when the scheduler config says use_dynamic_shifting, e^mu with mu from
  the image's patch count.
- `FluxBackbone`: FluxTransformer2DModel reads latents packed 2 x 2 into tokens (B, h w / 4, 4 C)
  with per-token (0, row, column) ids and zero text ids, the timestep t itself (it scales by 1000
  inside), and, when guidance-distilled (guidance_embeds), the guidance scale as an input: one
  pass per step, no negative prompt. A model without guidance_embeds runs true CFG (two passes).
  The shift is dynamic: mu from the token count, as FluxPipeline computes it.

Guidance with two passes is D = D_u + w (D_c - D_u), which equals guiding the velocity (D is
affine in v), so it is what diffusers' pipelines do. `denoise_with_feature` also returns a middle
transformer block's image-token states averaged over channels, reshaped to the token grid
(B, h / p, w / p): the AMED predictor's input.

Depends on models/flow.py, the prompt batches and diffusers' transformer classes; never on the
service or the benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidConditioningError, UnsupportedModelError
from .flow import FlowSchedule, t_of_sigma
from .guidance import guided_halves
from .prompts import PromptBatch

# diffusers' calculate_shift defaults (FlowMatchEulerDiscreteScheduler's registered config).
_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
# diffusers' FluxPipeline default latent side (its transformer config has no sample_size).
FLUX_DEFAULT_SAMPLE_SIZE = 128


def shift_mu(tokens: int, config: Mapping[str, Any]) -> float:
    """The dynamic shift's mu for an image of `tokens` latent tokens: linear in the token count
    through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as diffusers'
    calculate_shift (the same line outside that interval)."""
    values = {key: config.get(key, default) for key, default in _SHIFT_DEFAULTS.items()}
    slope = (values["max_shift"] - values["base_shift"]) / (values["max_image_seq_len"] - values["base_image_seq_len"])
    return float(tokens * slope + values["base_shift"] - slope * values["base_image_seq_len"])


class _FlowBackbone:
    """What both transformers share: the schedule per size, the passes, the feature block.

    Subclasses set `patch` (latent pixels per token side), `guidance_distilled` and implement
    `velocity` and `feature_module`.
    """

    patch: int = 2
    guidance_distilled: bool = False
    max_latent_side: int | None = None
    pipeline_prediction = "flow_prediction"

    def __init__(
        self, transformer: torch.nn.Module, scheduler_config: Mapping[str, Any], sample_size: int, factor: int
    ) -> None:
        self.transformer = transformer
        self.factor = factor  # the VAE's: image pixels per latent pixel
        self.scheduler_config = dict(scheduler_config)
        self.dynamic = bool(self.scheduler_config.get("use_dynamic_shifting", False))
        parameter = next(iter(transformer.parameters()))
        self.device, self.dtype = parameter.device, parameter.dtype
        self.default_latent_size: tuple[int, int] = (sample_size, sample_size)
        self.prediction_type: str = self.pipeline_prediction
        default = self.schedule_for(*self.default_latent_size)
        self.sigma_min, self.sigma_max = default.sigma_min, default.sigma_max
        self.sigma_levels: Tensor | None = default.sigma_levels

    def tokens(self, latent_height: int, latent_width: int) -> int:
        return (latent_height // self.patch) * (latent_width // self.patch)

    def schedule_for(self, latent_height: int, latent_width: int) -> FlowSchedule:
        """The schedule at this latent size: its shift is dynamic (depends on the token count)
        when the scheduler config says so, else the config's `shift`."""
        mu = shift_mu(self.tokens(latent_height, latent_width), self.scheduler_config) if self.dynamic else None
        return FlowSchedule.from_config(self.scheduler_config, mu=mu).with_trained_levels()

    def schedule_at(self, height: int, width: int) -> FlowSchedule:
        """`schedule_for` of a height x width image (pixels)."""
        return self.schedule_for(height // self.factor, width // self.factor)

    def noise_range(self, height: int, width: int) -> tuple[float, float, Tensor | None]:
        schedule = self.schedule_at(height, width)
        return schedule.sigma_min, schedule.sigma_max, schedule.sigma_levels

    def denoiser(
        self, cond: PromptBatch | None, uncond: PromptBatch | None, guidance: Tensor, height: int, width: int
    ) -> FlowTransformerDenoiser:
        """The denoiser over the latents of a height x width image (pixels); `cond` / `uncond`
        None when no sample needs that pass."""
        return FlowTransformerDenoiser(self, self.schedule_at(height, width), cond, uncond, guidance)

    def velocity(self, x_t: Tensor, t: Tensor, prompts: PromptBatch, guidance: Tensor | None) -> Tensor:
        """v(x_t, t): x_t (N, C, h, w) in the model dtype, t (N,) float64; prompts of N rows on the
        device; guidance (N,) for a distilled model. Returns (N, C, h, w)."""
        raise NotImplementedError

    def feature_module(self) -> torch.nn.Module:
        """The middle transformer block (its output's second element: the image tokens' states)."""
        raise NotImplementedError


class SD3Backbone(_FlowBackbone):
    """SD3Transformer2DModel with its FlowMatchEulerDiscreteScheduler config (see the module docstring)."""

    def __init__(self, transformer: Any, scheduler_config: Mapping[str, Any], factor: int) -> None:
        config = transformer.config
        if config["in_channels"] != (config.get("out_channels") or config["in_channels"]):
            raise UnsupportedModelError("transformer.out_channels", config["out_channels"], "= in_channels")
        self.patch = int(config["patch_size"])
        self.timestep_scale = float(scheduler_config.get("num_train_timesteps", 1000))
        # Its learned position table covers pos_embed_max_size patches a side.
        self.max_latent_side = int(config.get("pos_embed_max_size") or 96) * self.patch
        super().__init__(transformer, scheduler_config, int(config["sample_size"]), factor)

    def velocity(self, x_t: Tensor, t: Tensor, prompts: PromptBatch, guidance: Tensor | None) -> Tensor:
        result: Tensor = self.transformer(
            hidden_states=x_t,
            timestep=t * self.timestep_scale,
            encoder_hidden_states=prompts.hidden,
            pooled_projections=prompts.pooled,
            return_dict=False,
        )[0]
        return result

    def feature_module(self) -> torch.nn.Module:
        blocks: Any = self.transformer.transformer_blocks
        return blocks[len(blocks) // 2]


class FluxBackbone(_FlowBackbone):
    """FluxTransformer2DModel with its FlowMatchEulerDiscreteScheduler config (see the module docstring)."""

    patch = 2  # the 2 x 2 packing (the transformer's own patch_size is 1)

    def __init__(
        self,
        transformer: Any,
        scheduler_config: Mapping[str, Any],
        factor: int,
        default_side: int = FLUX_DEFAULT_SAMPLE_SIZE,
    ) -> None:
        """default_side: the default latent side (the transformer config has none; the loader
        passes the VAE's sample_size / factor, real Flux's 1024 / 8 = diffusers' 128)."""
        config = transformer.config
        if int(config.get("patch_size", 1)) != 1:
            raise UnsupportedModelError("transformer.patch_size", config["patch_size"], "1 (latents are packed 2 x 2)")
        if config["in_channels"] % 4:
            raise UnsupportedModelError("transformer.in_channels", config["in_channels"], "4 x the latent channels")
        self.guidance_distilled = bool(config.get("guidance_embeds", False))
        self.latent_channels = int(config["in_channels"]) // 4
        super().__init__(transformer, scheduler_config, default_side, factor)

    def velocity(self, x_t: Tensor, t: Tensor, prompts: PromptBatch, guidance: Tensor | None) -> Tensor:
        height, width = x_t.shape[-2:]
        packed = pack(x_t)
        rows = torch.arange(height // 2, device=x_t.device, dtype=x_t.dtype)
        columns = torch.arange(width // 2, device=x_t.device, dtype=x_t.dtype)
        row_ids, column_ids = torch.meshgrid(rows, columns, indexing="ij")
        # Per token (0, row, column): the ids FluxPipeline._prepare_latent_image_ids builds.
        image_ids = torch.stack([torch.zeros_like(row_ids), row_ids, column_ids], dim=-1).reshape(-1, 3)
        text_ids = torch.zeros(prompts.hidden.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        output: Tensor = self.transformer(
            hidden_states=packed,
            timestep=t,  # the transformer multiplies by 1000 itself
            guidance=guidance,
            pooled_projections=prompts.pooled,
            encoder_hidden_states=prompts.hidden,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return unpack(output, height, width)

    def feature_module(self) -> torch.nn.Module:
        model: Any = self.transformer
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        return blocks[len(blocks) // 2]


def pack(latents: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h w / 4, 4 C): each 2 x 2 patch one token, channels outermost in the
    token, tokens row by row (FluxPipeline._pack_latents)."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack`: (B, h w / 4, 4 C) -> (B, C, h, w)."""
    batch, _, features = tokens.shape
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


class FlowTransformerDenoiser:
    """A flow transformer with bound prompts and guidance at one image size, as a
    `solvers.Denoiser` and `FeatureDenoiser` over latents (B, C, h, w).

    Guidance w per sample: a distilled backbone takes w as the network's input (one pass);
    otherwise D = D_u + w (D_c - D_u), w = 1 the conditional pass alone, w = 0 the unconditional
    one, anything else both in one forward of 2B rows (evals_per_call 2). No autograd mode is
    entered, so gradients flow to x and sigma (AMED training).

    Attributes:
        sigma_min, sigma_max, sigma_levels: this size's schedule (its shift included).
        evals_per_call: network evaluations per call, 1 or 2.
        batch_size: B of the bound prompts.
    """

    def __init__(
        self,
        backbone: _FlowBackbone,
        schedule: FlowSchedule,
        cond: PromptBatch | None,
        uncond: PromptBatch | None,
        guidance: Tensor,
    ) -> None:
        self.backbone = backbone
        self.schedule = schedule
        self.sigma_min, self.sigma_max = schedule.sigma_min, schedule.sigma_max
        self.sigma_levels: Tensor | None = schedule.sigma_levels
        w = torch.as_tensor(guidance, dtype=torch.float64).detach().cpu()
        if w.dim() != 1 or not bool(torch.isfinite(w).all()):
            raise InvalidConditioningError("guidance", guidance, "a finite tensor of shape (B,)")
        self.batch_size = int(w.shape[0])
        device, dtype = backbone.device, backbone.dtype
        self._passes: list[PromptBatch] = []
        self._guidance_input: Tensor | None = None
        self._weights: Tensor | None = None
        if backbone.guidance_distilled:
            if cond is None or uncond is not None:
                raise InvalidConditioningError("negative_prompts", "given", "none: this model is guidance-distilled")
            self._passes.append(_on(cond, device, dtype))
            self._guidance_input = w.to(device=device, dtype=torch.float32)
        else:
            for prompts in (cond, uncond):
                if prompts is not None:
                    self._passes.append(_on(prompts, device, dtype))
            if len(self._passes) == 2:
                self._weights = w
        if not self._passes:
            raise InvalidConditioningError("prompts", None, "at least one pass (the conditional or the unconditional)")
        for prompts in self._passes:
            if prompts.hidden.shape[0] != self.batch_size:
                raise InvalidConditioningError(
                    "prompts", f"{prompts.hidden.shape[0]} rows", f"{self.batch_size}, one per sample"
                )
        self.evals_per_call = len(self._passes)
        self._hidden = torch.cat([p.hidden for p in self._passes])
        pooled = [p.pooled for p in self._passes]
        self._pooled = torch.cat([p for p in pooled if p is not None]) if all(p is not None for p in pooled) else None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """D(x, sigma): x (B, C, h, w) = x0 + sigma eps in any float dtype and device, sigma (B,).
        Returns the data prediction, shape, dtype and device of x."""
        return self._denoise(x, sigma, want_feature=False)[0]

    def denoise_with_feature(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """D(x, sigma) and the middle block's image-token states averaged over channels,
        (B, h / p, w / p) in x's dtype; from the conditional pass under guidance."""
        denoised, feature = self._denoise(x, sigma, want_feature=True)
        assert feature is not None  # the hook sets it whenever want_feature is True
        return denoised, feature

    def _denoise(self, x: Tensor, sigma: Tensor, *, want_feature: bool) -> tuple[Tensor, Tensor | None]:
        batch = x.shape[0]
        if batch != self.batch_size:
            raise InvalidConditioningError("x", f"batch {batch}", f"batch {self.batch_size}, the bound prompts'")
        backbone = self.backbone
        device = backbone.device
        x_dev = x.to(device)
        sigma_b = sigma.to(device=device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        # Scale before casting: a half-precision model gets the O(1) x_t rounded, not x.
        x_in = self.schedule.network_input(x_dev, sigma_b).to(backbone.dtype)
        t = t_of_sigma(sigma.to(device=device, dtype=torch.float64))
        if len(self._passes) == 2:
            x_in, t = torch.cat([x_in, x_in]), torch.cat([t, t])
        captured: list[Tensor] = []
        handle = None
        if want_feature:
            handle = backbone.feature_module().register_forward_hook(
                lambda _module, _inputs, output: captured.append(output[1] if isinstance(output, tuple) else output)
            )
        try:
            raw = backbone.velocity(x_in, t, PromptBatch(self._hidden, self._pooled), self._guidance_input)
        finally:
            if handle is not None:
                handle.remove()
        output = raw.to(x.dtype)  # D in x's dtype: x - sigma v cancels low bits at large sigma
        if self._weights is not None:
            denoised = guided_halves(
                lambda out: self.schedule.denoised(x_dev, sigma_b, out), output, batch, self._weights
            )
        else:
            denoised = self.schedule.denoised(x_dev, sigma_b, output)
        feature = None
        if want_feature:
            tokens = captured[-1][:batch].mean(dim=-1)
            side_h, side_w = x.shape[-2] // backbone.patch, x.shape[-1] // backbone.patch
            feature = tokens.reshape(batch, side_h, side_w).to(device=x.device, dtype=x.dtype)
        return denoised.to(x.device), feature


def _on(prompts: PromptBatch, device: torch.device, dtype: torch.dtype) -> PromptBatch:
    pooled = None if prompts.pooled is None else prompts.pooled.to(device=device, dtype=dtype)
    return PromptBatch(prompts.hidden.to(device=device, dtype=dtype), pooled)


__all__ = [
    "FLUX_DEFAULT_SAMPLE_SIZE",
    "FlowTransformerDenoiser",
    "FluxBackbone",
    "SD3Backbone",
    "pack",
    "shift_mu",
    "unpack",
]
