"""A diffusers `UNet2DModel` trained with a DDPM-family schedule, as a `solvers.Denoiser`.

DDPM models are discrete-time VP models: at training timestep t, x_vp = sqrt(abar_t) x0 +
sqrt(1 - abar_t) eps. Dividing by sqrt(abar_t) gives the EDM form x = x0 + sigma_t eps with

    sigma_t = sqrt((1 - abar_t) / abar_t),    x_vp = x / sqrt(1 + sigma_t^2),

so the solvers step x and this module does the rest, once: it maps sigma to a (fractional)
timestep, scales the input into the VP space the network was trained in, and turns the
network's eps / v / x0 output into the data prediction D(x, sigma).

Depends on the solver contract's conventions and on diffusers' `UNet2DModel`; never on the
service or the benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Literal, cast

import torch
from diffusers.models import UNet2DModel  # not `diffusers`: type checkers see its torch-less dummies
from torch import Tensor

from .errors import UnsupportedModelError, UnsupportedSchedulerError

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
    """A diffusers `UNet2DModel` with its DDPM-family schedule, as a `solvers.Denoiser`.

    The module is used as given (device, dtype, train/eval mode are the caller's choice); inputs
    move to its device and dtype for the network call and results come back in x's. No autograd
    mode is entered here, so gradients flow to x and sigma when the caller wants them.

    Args:
        unet: an unconditional UNet2DModel with a positional (sinusoidal) time embedding and as
            many output channels as input channels.
        schedule: the trained schedule (see VPDiscreteSchedule.from_config).
    Attributes:
        sigma_min, sigma_max: the smallest and largest trained sigma.
        sigma_levels: the trained sigmas, ascending, float64, shape (T,) (index = timestep).
        evals_per_call: 1 (one network evaluation per call).
    Raises:
        UnsupportedModelError: a UNet this adapter cannot drive.
    """

    evals_per_call = 1

    def __init__(self, unet: UNet2DModel, schedule: VPDiscreteSchedule) -> None:
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
        if config["class_embed_type"] is not None or config["num_class_embeds"] is not None:
            raise UnsupportedModelError(
                "unet.num_class_embeds",
                config["num_class_embeds"],
                "None (class-conditional UNets are not supported yet)",
            )
        self.unet = unet
        self.schedule = schedule
        self.prediction_type = schedule.prediction_type
        self.sigma_levels: Tensor | None = schedule.sigmas
        self.sigma_min = schedule.sigma_min
        self.sigma_max = schedule.sigma_max

    @classmethod
    def from_scheduler_config(cls, unet: UNet2DModel, scheduler_config: Mapping[str, Any]) -> UNetDenoiser:
        """The denoiser of `unet` trained with the schedule of a diffusers scheduler config.

        Raises:
            UnsupportedSchedulerError, UnsupportedModelError.
        """
        return cls(unet, VPDiscreteSchedule.from_config(scheduler_config))

    def sigma_to_timestep(self, sigma: Tensor) -> Tensor:
        """See VPDiscreteSchedule.sigma_to_timestep: shape (B,) -> (B,) float64."""
        return self.schedule.sigma_to_timestep(sigma)

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """D(x, sigma).

        Args:
            x: the EDM state x = x0 + sigma eps, shape (B, C, H, W), any float dtype and device.
            sigma: shape (B,), one per sample, within [sigma_min, sigma_max] (clamped in t outside).
        Returns:
            the data prediction, shape, dtype and device of x.
        """
        device, model_dtype = self.unet.device, self.unet.dtype
        x_dev = x.to(device)
        sigma_b = sigma.to(device=device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
        # Scale before casting, so the half-precision case rounds the O(1) VP-scaled input, not x.
        x_in = (x_dev * input_scale(sigma_b)).to(model_dtype)
        timestep = self.schedule.sigma_to_timestep(sigma.to(device))
        output = self.unet(x_in, timestep).sample.to(x.dtype)
        # Convert in x's dtype: in a half-precision model dtype, x (~157 at DDPM's sigma_max)
        # would lose its low bits, and x - sigma eps cancels them out into D.
        return data_prediction(x_dev, sigma_b, output, self.prediction_type).to(x.device)


__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "UNetDenoiser",
    "VPDiscreteSchedule",
    "data_prediction",
    "input_scale",
]
