"""A diffusers `UNet2DModel` trained with a DDPM-family schedule, as a `solvers.Denoiser`.

DDPM models are discrete-time VP models: at training timestep t, x_vp = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps. Dividing by sqrt(abar_t) gives the EDM form x = x0 + sigma_t eps with

    sigma_t = sqrt((1 - abar_t) / abar_t),    x_vp = x / sqrt(1 + sigma_t^2),

so the solvers step x and this module does the rest, once: it maps sigma to a (fractional)
timestep, scales the input into the VP space the network was trained in, and turns the
network's eps / v / x0 output into the data prediction D(x, sigma).

Those three maps are a `Parameterisation`: `VPDiscreteSchedule` here, `models.flow.FlowSchedule`
for a rectified-flow UNet (velocity prediction); `UNetDenoiser` drives either.

Depends on the solver contract's conventions and on diffusers' `UNet2DModel`; never on the
service or the benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Literal, Protocol, cast

import torch
from diffusers.models import UNet2DConditionModel, UNet2DModel  # not `diffusers`: its dummies fool type checkers
from torch import Tensor

from .errors import InvalidConditioningError, UnsupportedModelError, UnsupportedSchedulerError
from .guidance import guided_halves

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]

BETA_SCHEDULES: tuple[BetaSchedule, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES: tuple[PredictionType, ...] = ("epsilon", "v_prediction", "sample")
MAX_TRAIN_TIMESTEPS = 100_000

# diffusers' own defaults (DDPMScheduler and friends), so a config that leaves a field out means
# what it means to diffusers' `from_config`.
_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}


class Parameterisation(Protocol):
    """How a network trained in its own noise convention becomes the EDM denoiser D(x, sigma).

    Attributes:
        prediction_type: what the network predicts ("epsilon", "v_prediction", "sample",
            "flow_prediction").
        sigma_min, sigma_max: the EDM sigma range a schedule may span.
        sigma_levels: the trained sigmas of a discrete-time model, ascending, float64, (T,); None
            for a continuous-time one.
    In the maps, x is the EDM state (B, ...), sigma (B,) and sigma_b the same values shaped
    (B, 1, ..., 1) in x's dtype.
    """

    # Read-only properties: the implementations are frozen dataclasses.
    @property
    def prediction_type(self) -> str: ...

    @property
    def sigma_levels(self) -> Tensor | None: ...

    @property
    def sigma_min(self) -> float: ...

    @property
    def sigma_max(self) -> float: ...

    def network_input(self, x: Tensor, sigma_b: Tensor) -> Tensor:
        """The input the network was trained on at this noise level, x's dtype."""
        ...

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's timestep for each sigma, (B,) float64."""
        ...

    def denoised(self, x: Tensor, sigma_b: Tensor, output: Tensor) -> Tensor:
        """D(x, sigma) from the network output (in x's dtype), shape and dtype of x."""
        ...


@dataclass(frozen=True, eq=False)
class VPDiscreteSchedule:
    """The trained noise levels of a discrete-time VP (DDPM-family) model, in float64.

    Build it with `from_config`. eq=False: the fields are tensors, so identity is the only
    meaningful equality.

    Attributes:
        beta_schedule: how the betas were laid out ("linear", "scaled_linear", "squaredcos_cap_v2").
        prediction_type: what the network predicts ("epsilon", "v_prediction", "sample").
        alphas_cumprod: abar_t, shape (T,), float64, decreasing in t.
        sigmas: sigma_t = sqrt((1 - abar_t) / abar_t), shape (T,), float64, increasing in t
            (index = training timestep).
        log_sigmas: log(sigmas), shape (T,), float64; the grid sigma_to_timestep interpolates on.
    """

    beta_schedule: BetaSchedule
    prediction_type: PredictionType
    alphas_cumprod: Tensor = field(repr=False)
    sigmas: Tensor = field(init=False, repr=False)
    log_sigmas: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        abar = self.alphas_cumprod.to(torch.float64)
        sigmas = torch.sqrt((1.0 - abar) / abar)
        # frozen: derived fields are set once here, never afterwards.
        object.__setattr__(self, "alphas_cumprod", abar)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", torch.log(sigmas))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VPDiscreteSchedule:
        """The schedule a diffusers scheduler config describes (e.g. `scheduler.config` or the
        parsed scheduler_config.json).

        Only the fields that define the trained model are read: num_train_timesteps, beta_start,
        beta_end, beta_schedule, prediction_type (missing ones take diffusers' defaults), and
        trained_betas / rescale_betas_zero_snr / variance_type, which must be absent or neutral.
        Sampling-time fields (timestep_spacing, steps_offset, clip_sample, thresholding, ...) are
        the solver's business and ignored here.

        Raises:
            UnsupportedSchedulerError: a field with a value this adapter cannot honour.
        """
        values = {**_DEFAULTS, **config}
        if config.get("trained_betas") is not None:
            raise UnsupportedSchedulerError("trained_betas", config["trained_betas"], "null (explicit betas)")
        if config.get("rescale_betas_zero_snr", False):
            raise UnsupportedSchedulerError(
                "rescale_betas_zero_snr",
                config["rescale_betas_zero_snr"],
                "false (zero terminal SNR has sigma_max = inf)",
            )
        variance_type = config.get("variance_type")
        if variance_type in ("learned", "learned_range"):
            raise UnsupportedSchedulerError(
                "variance_type", variance_type, "a fixed variance (learned variance doubles the output channels)"
            )
        count = values["num_train_timesteps"]
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= MAX_TRAIN_TIMESTEPS:
            raise UnsupportedSchedulerError("num_train_timesteps", count, f"an integer in 2..{MAX_TRAIN_TIMESTEPS}")
        schedule = values["beta_schedule"]
        if schedule not in BETA_SCHEDULES:
            raise UnsupportedSchedulerError("beta_schedule", schedule, f"one of {', '.join(BETA_SCHEDULES)}")
        prediction = values["prediction_type"]
        if prediction not in PREDICTION_TYPES:
            raise UnsupportedSchedulerError("prediction_type", prediction, f"one of {', '.join(PREDICTION_TYPES)}")
        if schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(count)
        else:
            start = _beta(values, "beta_start")
            end = _beta(values, "beta_end")
            if schedule == "linear":
                betas = torch.linspace(start, end, count, dtype=torch.float64)
            else:  # scaled_linear: linear in sqrt(beta), as latent-diffusion models were trained
                betas = torch.linspace(math.sqrt(start), math.sqrt(end), count, dtype=torch.float64) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)
        return cls(cast(BetaSchedule, schedule), cast(PredictionType, prediction), abar)

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_levels(self) -> Tensor:
        return self.sigmas

    def network_input(self, x: Tensor, sigma_b: Tensor) -> Tensor:
        """x_vp = x / sqrt(1 + sigma^2), the VP-scaled input."""
        return x * input_scale(sigma_b)

    def timestep(self, sigma: Tensor) -> Tensor:
        return self.sigma_to_timestep(sigma)

    def denoised(self, x: Tensor, sigma_b: Tensor, output: Tensor) -> Tensor:
        return data_prediction(x, sigma_b, output, self.prediction_type)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_timestep(self, sigma: Tensor) -> Tensor:
        """The fractional training timestep of each sigma: linear interpolation in log sigma over
        the trained levels, clamped to [0, T-1].

        Differentiable w.r.t. sigma inside the trained range (the bracket is found on detached
        values, the weight is computed from the differentiable log sigma); outside it the result
        is clamped and the gradient is zero. A sigma equal to a trained level gives its integer
        timestep exactly.

        Args:
            sigma: shape (B,), positive, any float dtype and device.
        Returns:
            the timesteps, shape (B,), float64, on sigma's device.
        """
        log_levels = self.log_sigmas.to(sigma.device)  # (T,) ascending; a 1000-element copy at most
        log_sigma = torch.log(sigma.to(torch.float64))
        # right=True: a sigma equal to level k lands in bracket [k, k+1] with weight exactly 0.
        low = torch.searchsorted(log_levels, log_sigma.detach(), right=True) - 1
        low = low.clamp(0, log_levels.numel() - 2)
        lo, hi = log_levels[low], log_levels[low + 1]
        weight = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
        return low.to(torch.float64) + weight


def _beta(values: Mapping[str, Any], name: str) -> float:
    value = values[name]
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < float(value) < 1.0:
        raise UnsupportedSchedulerError(name, value, "a number in the open interval (0, 1)")
    return float(value)


def _cosine_betas(count: int, max_beta: float = 0.999) -> Tensor:
    """diffusers' `betas_for_alpha_bar(count)` (the GLIDE / improved-DDPM cosine schedule), in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - alpha_bar((i + 1) / count) / alpha_bar(i / count), max_beta) for i in range(count)]
    return torch.tensor(betas, dtype=torch.float64)


def input_scale(sigma: Tensor) -> Tensor:
    """c_in = 1 / sqrt(1 + sigma^2): EDM x to the VP-scaled x_vp the network was trained on. Same shape as sigma."""
    return torch.rsqrt(1.0 + sigma * sigma)


def data_prediction(x: Tensor, sigma: Tensor, output: Tensor, prediction_type: PredictionType) -> Tensor:
    """D(x, sigma) from the network output, for each prediction type.

    With alpha = 1 / sqrt(1 + sigma^2) and sigma_vp = sigma alpha (the VP coefficients) and
    x_vp = alpha x: eps gives x0 = x - sigma eps; v = alpha eps - sigma_vp x0 gives
    x0 = alpha x_vp - sigma_vp v; a sample prediction is x0 itself.

    Args:
        x: the EDM state, shape (B, ...).
        sigma: shape (B, 1, ..., 1), broadcastable to x, x's dtype.
        output: the network output in x's dtype, shape of x.
    Returns:
        the data prediction, shape and dtype of x.
    """
    if prediction_type == "epsilon":
        return x - sigma * output
    if prediction_type == "v_prediction":
        alpha = input_scale(sigma)
        return alpha * (alpha * x) - (sigma * alpha) * output
    return output


class UNetDenoiser:
    """A diffusers UNet with its trained parameterisation (a DDPM-family schedule, or a rectified
    flow) and bound conditioning, as a `solvers.Denoiser` (and a `FeatureDenoiser`).

    Conditioning is fixed at construction, so solvers never see it. With guidance w per sample,
    D = D_u + w (D_c - D_u): w = 1 runs the conditional pass alone and w = 0 the unconditional one
    (one network evaluation per call); any other w runs both halves in one forward of 2B rows
    (`evals_per_call` = 2). An unconditional UNet has only the one pass.

    The module is used as given (device, dtype, train/eval mode are the caller's choice); inputs
    move to its device and dtype for the network call and results come back in x's dtype and
    device. No autograd mode is entered here, so gradients flow to x and sigma (AMED training).

    Args:
        unet: a UNet2DModel (optionally with a class-label embedding) or a UNet2DConditionModel
            conditioned on class labels and/or precomputed encoder embeddings, with a positional
            time embedding and as many output channels as input channels.
        schedule: the trained parameterisation (VPDiscreteSchedule.from_config, or
            models.flow.FlowSchedule.from_config for a velocity-predicting flow UNet).
        labels: class labels (B,) of the conditional pass (a 0-dim tensor: the same label for any
            batch); None for an unconditional UNet.
        null_labels: class labels (B,) of the unconditional pass (e.g. the null class); needed when
            a class-conditional UNet runs with guidance != 1.
        embeddings: encoder hidden states (B, L, D) of the conditional pass (UNet2DConditionModel).
        null_embeddings: those of the unconditional pass, (B, L, D).
        added: the extra inputs of a UNet with an added embedding (SDXL's "text_time": text_embeds
            (B, P), the pooled text embedding, and time_ids (B, 6), the original size, crop corner
            and target size) of the conditional pass.
        null_added: those of the unconditional pass.
        guidance: w, a float or a tensor (B,).
        placement: (device, dtype) of the UNet's parameters, when the caller knows them (read
            from the module otherwise).
    Attributes:
        sigma_min, sigma_max: the smallest and largest trained sigma.
        sigma_levels: the trained sigmas, ascending, float64, shape (T,) (index = timestep);
            None for a continuous-time (flow) model.
        evals_per_call: network evaluations per call, 1 or 2.
        batch_size: B of the bound conditioning, or None when nothing per-sample is bound.
    Raises:
        UnsupportedModelError: a UNet this adapter cannot drive.
        InvalidConditioningError: conditioning that does not fit the UNet.
    """

    def __init__(
        self,
        unet: UNet2DModel | UNet2DConditionModel,
        schedule: Parameterisation,
        *,
        labels: Tensor | None = None,
        null_labels: Tensor | None = None,
        embeddings: Tensor | None = None,
        null_embeddings: Tensor | None = None,
        added: Mapping[str, Tensor] | None = None,
        null_added: Mapping[str, Tensor] | None = None,
        guidance: float | Tensor = 1.0,
        placement: tuple[torch.device, torch.dtype] | None = None,
    ) -> None:
        self.traits = unet_traits(unet)
        self.unet = unet
        # diffusers' .device and .dtype walk every module (about 1.5% of a small UNet's forward on
        # CPU, 4 ms for the tiny SD: a quarter of its one-row forward when a step-level batcher binds
        # rows every tick); the conditioning below is bound to this device, so the model must stay
        # put anyway, and a caller that knows where it is passes `placement`.
        self._device, self._model_dtype = placement if placement is not None else (unet.device, unet.dtype)
        self.schedule = schedule
        self.prediction_type = schedule.prediction_type
        self.sigma_levels: Tensor | None = schedule.sigma_levels
        self.sigma_min = schedule.sigma_min
        self.sigma_max = schedule.sigma_max
        w = torch.as_tensor(guidance, dtype=torch.float64).detach().cpu()
        if w.dim() > 1 or not bool(torch.isfinite(w).all()):
            raise InvalidConditioningError("guidance", guidance, "a finite number or a tensor of shape (B,)")
        named = (
            ("labels", labels),
            ("null_labels", null_labels),
            ("embeddings", embeddings),
            ("null_embeddings", null_embeddings),
        )
        # A 0-dim label tensor applies to every sample (any batch); the others fix B.
        sizes = {name: t.shape[0] for name, t in named if t is not None and t.dim() > 0}
        for name, extra in (("added", added), ("null_added", null_added)):
            sizes.update({f"{name}.{key}": t.shape[0] for key, t in (extra or {}).items() if t.dim() > 0})
        if w.dim() == 1:
            sizes["guidance"] = w.shape[0]
        if len(set(sizes.values())) > 1:
            raise InvalidConditioningError("batch", sizes, "one batch size B for labels, embeddings and guidance")
        self.batch_size: int | None = next(iter(sizes.values()), None)
        conditional = bool((w != 0).any())
        unconditional = bool((w != 1).any())
        self._passes: list[_Pass] = []
        if conditional:
            self._passes.append(self._make_pass("labels", labels, "embeddings", embeddings, "added", added))
        if unconditional:
            self._passes.append(
                self._make_pass(
                    "null_labels", null_labels, "null_embeddings", null_embeddings, "null_added", null_added
                )
            )
        self.evals_per_call = len(self._passes)
        self._guidance = w if self.evals_per_call == 2 else None
        self._feature_pass = 0  # the conditional half's, when there are two

    def _make_pass(
        self,
        label_name: str,
        labels: Tensor | None,
        embed_name: str,
        embeddings: Tensor | None,
        added_name: str,
        added: Mapping[str, Tensor] | None,
    ) -> _Pass:
        traits = self.traits
        if traits.num_class_embeds is None:
            if labels is not None:
                raise InvalidConditioningError(label_name, "a tensor", "None: this UNet has no class embedding")
        elif labels is None:
            raise InvalidConditioningError(
                label_name,
                None,
                f"class labels (B,) in 0..{traits.num_class_embeds - 1} for this class-conditional UNet",
            )
        else:
            if labels.dim() > 1 or labels.dtype not in (torch.int64, torch.int32):
                raise InvalidConditioningError(
                    label_name, f"{labels.dtype} {tuple(labels.shape)}", "an integer tensor (B,) or a 0-dim one"
                )
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= traits.num_class_embeds:
                bad = low if low < 0 else high
                raise InvalidConditioningError(label_name, bad, f"labels in 0..{traits.num_class_embeds - 1}")
        if traits.cross_attention_dim is None:
            if embeddings is not None:
                raise InvalidConditioningError(embed_name, "a tensor", "None: this UNet has no cross-attention")
        elif embeddings is None:
            raise InvalidConditioningError(
                embed_name, None, f"encoder embeddings (B, L, {traits.cross_attention_dim}) for this UNet"
            )
        elif embeddings.dim() != 3 or embeddings.shape[-1] != traits.cross_attention_dim:
            raise InvalidConditioningError(
                embed_name, tuple(embeddings.shape), f"shape (B, L, {traits.cross_attention_dim})"
            )
        expected = traits.added_inputs
        given = dict(added or {})
        if set(given) != set(expected):
            allowed = ", ".join(f"{k} (B, {shape[1]})" for k, shape in expected.items()) if expected else "None"
            raise InvalidConditioningError(added_name, sorted(given), f"{allowed} for this UNet")
        for key, width in expected.items():
            tensor = given[key]
            if tensor.dim() != 2 or tensor.shape[1] != width[1]:
                raise InvalidConditioningError(f"{added_name}.{key}", tuple(tensor.shape), f"shape (B, {width[1]})")
        device, dtype = self._device, self._model_dtype
        return _Pass(
            labels.to(device=device, dtype=torch.int64) if labels is not None else None,
            embeddings.to(device=device, dtype=dtype) if embeddings is not None else None,
            {k: t.to(device=device, dtype=dtype) for k, t in given.items()} or None,
        )

    @classmethod
    def from_scheduler_config(cls, unet: UNet2DModel, scheduler_config: Mapping[str, Any]) -> UNetDenoiser:
        """The unconditional denoiser of `unet` trained with the schedule of a diffusers scheduler config.

        Raises:
            UnsupportedSchedulerError, UnsupportedModelError.
        """
        return cls(unet, VPDiscreteSchedule.from_config(scheduler_config))

    def sigma_to_timestep(self, sigma: Tensor) -> Tensor:
        """The network's timestep of each sigma (Parameterisation.timestep): shape (B,) -> (B,) float64."""
        return self.schedule.timestep(sigma)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """D(x, sigma).

        Args:
            x: the EDM state x = x0 + sigma eps, shape (B, C, H, W), any float dtype and device.
            sigma: shape (B,), one per sample, within [sigma_min, sigma_max] (clamped in t outside).
        Returns:
            the data prediction, shape, dtype and device of x.
        """
        return self._denoise(x, sigma, want_feature=False)[0]

    def denoise_with_feature(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """D(x, sigma) and the bottleneck feature: the lowest-resolution activation (the middle
        block's output) averaged over channels, shape (B, h, w), x's dtype and device; from the
        conditional half under guidance. The hook that reads it lives only during this call."""
        denoised, feature = self._denoise(x, sigma, want_feature=True)
        assert feature is not None  # set by the hook whenever want_feature is True
        return denoised, feature

    def _denoise(self, x: Tensor, sigma: Tensor, *, want_feature: bool) -> tuple[Tensor, Tensor | None]:
        batch = x.shape[0]
        if self.batch_size is not None and batch != self.batch_size:
            raise InvalidConditioningError("x", f"batch {batch}", f"batch {self.batch_size}, the bound conditioning's")
        device, model_dtype = self._device, self._model_dtype
        x_dev = x.to(device)
        sigma_b = sigma.to(device=device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        # Scale before casting, so the half-precision case rounds the O(1) scaled input, not x.
        x_in = self.schedule.network_input(x_dev, sigma_b).to(model_dtype)
        timestep = self.schedule.timestep(sigma.to(device))
        passes = self._passes
        if len(passes) == 2:
            x_in, timestep = torch.cat([x_in, x_in]), torch.cat([timestep, timestep])
        labels = _cat([p.labels.expand(batch) if p.labels is not None else None for p in passes])
        embeddings = _cat([p.embeddings for p in passes])
        added = None
        if passes[0].added is not None:
            added = {
                key: _cat([p.added[key] if p.added is not None else None for p in passes]) for key in passes[0].added
            }
        captured: list[Tensor] = []
        handle = None
        if want_feature:
            handle = bottleneck_module(self.unet).register_forward_hook(
                lambda _module, _inputs, output: captured.append(output[0] if isinstance(output, tuple) else output)
            )
        try:
            if isinstance(self.unet, UNet2DConditionModel):
                raw = self.unet(
                    x_in, timestep, encoder_hidden_states=embeddings, class_labels=labels, added_cond_kwargs=added
                ).sample
            else:
                raw = self.unet(x_in, timestep, class_labels=labels).sample
        finally:
            if handle is not None:
                handle.remove()
        # Convert in x's dtype: in a half-precision model dtype, x (~157 at DDPM's sigma_max)
        # would lose its low bits, and x - sigma eps cancels them out into D.
        output = raw.to(x.dtype)
        if len(passes) == 2:
            assert self._guidance is not None
            denoised = guided_halves(
                lambda out: self.schedule.denoised(x_dev, sigma_b, out), output, batch, self._guidance
            )
        else:
            denoised = self.schedule.denoised(x_dev, sigma_b, output)
        feature = None
        if want_feature:
            feature = captured[-1][:batch].mean(dim=1).to(device=x.device, dtype=x.dtype)
        return denoised.to(x.device), feature


@dataclass(frozen=True)
class _Pass:
    """The conditioning of one half of a guided forward, on the UNet's device."""

    labels: Tensor | None
    embeddings: Tensor | None
    added: dict[str, Tensor] | None = None


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else torch.cat(present)


@dataclass(frozen=True)
class UNetTraits:
    """What a UNet needs as conditioning.

    Attributes:
        num_class_embeds: size of the class-label table, or None.
        cross_attention_dim: width of the encoder embeddings its cross-attention reads, or None.
        added_inputs: the inputs of an added embedding with their shapes, ("B", width) (SDXL's
            text_embeds and time_ids); empty when it has none.
    """

    num_class_embeds: int | None
    cross_attention_dim: int | None
    added_inputs: dict[str, tuple[str, int]] = field(default_factory=dict)


def unet_traits(unet: UNet2DModel | UNet2DConditionModel) -> UNetTraits:
    """Check that this adapter can drive `unet` and say what conditioning it takes.

    Raises:
        UnsupportedModelError: naming the config field and what is supported.
    """
    config = unet.config
    # A "learned" embedding is an integer lookup table (no fractional t, no gradient); a
    # "fourier" one belongs to VE score models that divide their output by sigma themselves.
    if config["time_embedding_type"] != "positional":
        raise UnsupportedModelError("unet.time_embedding_type", config["time_embedding_type"], "'positional'")
    if config["out_channels"] != config["in_channels"]:
        raise UnsupportedModelError(
            "unet.out_channels",
            config["out_channels"],
            f"{config['in_channels']} (= in_channels; no learned variance)",
        )
    # Other class embeddings take float vectors or timesteps, not labels.
    if config["class_embed_type"] is not None:
        raise UnsupportedModelError("unet.class_embed_type", config["class_embed_type"], "None (a label table)")
    cross: int | None = None
    added: dict[str, tuple[str, int]] = {}
    if isinstance(unet, UNet2DConditionModel):
        for key in ("encoder_hid_dim_type", "time_cond_proj_dim"):
            if config.get(key) is not None:
                raise UnsupportedModelError(
                    f"unet.{key}", config[key], "None (image prompts and LCM are not supported)"
                )
        addition = config.get("addition_embed_type")
        if addition == "text_time":
            # SDXL: the pooled text embedding and six size numbers, each of the latter embedded
            # with addition_time_embed_dim sinusoids; the rest of the projection is the pooled width.
            time_ids = 6
            pooled = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
            if pooled < 1:
                raise UnsupportedModelError(
                    "unet.projection_class_embeddings_input_dim",
                    config["projection_class_embeddings_input_dim"],
                    f"more than 6 x addition_time_embed_dim = {time_ids * config['addition_time_embed_dim']}",
                )
            added = {"text_embeds": ("B", pooled), "time_ids": ("B", time_ids)}
        elif addition is not None:
            raise UnsupportedModelError("unet.addition_embed_type", addition, "None or 'text_time' (SDXL)")
        blocks = [*config["down_block_types"], *config["up_block_types"], config.get("mid_block_type") or ""]
        if any("CrossAttn" in block for block in blocks):
            dim = config["cross_attention_dim"]
            if not isinstance(dim, int):
                raise UnsupportedModelError("unet.cross_attention_dim", dim, "one integer for all blocks")
            cross = dim
    elif not isinstance(unet, UNet2DModel):
        raise UnsupportedModelError("unet", type(unet).__name__, "UNet2DModel or UNet2DConditionModel")
    return UNetTraits(config["num_class_embeds"], cross, added)


def bottleneck_module(unet: UNet2DModel | UNet2DConditionModel) -> torch.nn.Module:
    """The module whose output is the U-Net's lowest-resolution activation: the middle block, or
    the last down block when the UNet has none."""
    if unet.mid_block is not None:
        return unet.mid_block
    return unet.down_blocks[-1]


__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "Parameterisation",
    "UNetDenoiser",
    "UNetTraits",
    "VPDiscreteSchedule",
    "bottleneck_module",
    "data_prediction",
    "input_scale",
    "unet_traits",
]
