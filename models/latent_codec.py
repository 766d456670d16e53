"""The VAE of a latent diffusion model: images in [-1, 1] <-> the latents the solvers step.

Latents are the VAE's latent distribution scaled as the diffusion model was trained on them:
z = (mode - shift) * scaling (SD 1.x / 2.x, SDXL: shift 0; SD3 and Flux carry a shift), or, when
the VAE config has per-channel statistics, z = (mode - mean) * scaling / std (as diffusers' SDXL
pipelines read `latents_mean` / `latents_std`). Decoding inverts it.

`force_upcast` (set in the configs of VAEs that overflow in float16, SDXL's among them) keeps the
VAE in float32 when the model is served in float16, as diffusers' pipelines upcast it before
decoding. Depends on diffusers' AutoencoderKL; nothing else of ours but the errors.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models import AutoencoderKL
from torch import Tensor

from .errors import InvalidConditioningError


class LatentCodec:
    """An AutoencoderKL with the scaling its diffusion model was trained with.

    Args:
        vae: the autoencoder, eval mode, gradients off, on its device and dtype.
    Attributes:
        factor: the spatial factor between images and latents (2 ** (number of blocks - 1)).
        channels: latent channels.
        scaling_factor, shift_factor: from the VAE config (shift 0 when absent).
        device, dtype: where and in what precision the VAE runs.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        config: Any = vae.config
        self.vae = vae
        self.factor = 2 ** (len(config["block_out_channels"]) - 1)
        self.channels = int(config["latent_channels"])
        self.scaling_factor = float(config["scaling_factor"])
        self.shift_factor = float(config.get("shift_factor") or 0.0)
        parameter = next(iter(vae.parameters()))
        self.device, self.dtype = parameter.device, parameter.dtype
        mean, std = config.get("latents_mean"), config.get("latents_std")
        self._mean = self._std = None
        if mean is not None and std is not None:
            self._mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            self._std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, height / factor, width / factor); the caller validates the size."""
        return (self.channels, height // self.factor, width // self.factor)

    def decode(self, latents: Tensor) -> Tensor:
        """Images from latents.

        Args:
            latents: (B, C, h, w), any float dtype and device.
        Returns:
            images (B, 3, h * factor, w * factor) in [-1, 1], float32, on latents' device.
        """
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise InvalidConditioningError("latents", tuple(latents.shape), f"shape (B, {self.channels}, h, w)")
        z = latents.to(device=self.device, dtype=torch.float32)
        if self._mean is not None and self._std is not None:
            z = z * self._std.to(z.device) / self.scaling_factor + self._mean.to(z.device)
        else:
            z = z / self.scaling_factor + self.shift_factor
        with torch.no_grad():
            images = self.vae.decode(z.to(self.dtype), return_dict=False)[0]
        return images.float().clamp(-1.0, 1.0).to(latents.device)

    def encode(self, images: Tensor) -> Tensor:
        """Latents of images: the mode of the VAE's latent distribution, scaled (deterministic;
        diffusers' img2img pipelines draw a sample from it instead, which adds the VAE's small
        posterior noise).

        Args:
            images: (B, 3, H, W) in [-1, 1], H and W multiples of `factor`, any float dtype and device.
        Returns:
            latents (B, C, H / factor, W / factor), float32, on images' device.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise InvalidConditioningError("images", tuple(images.shape), "shape (B, 3, H, W)")
        with torch.no_grad():
            posterior = self.vae.encode(images.to(device=self.device, dtype=self.dtype)).latent_dist
        z = posterior.mode().float()
        if self._mean is not None and self._std is not None:
            z = (z - self._mean.to(z.device)) * self.scaling_factor / self._std.to(z.device)
        else:
            z = (z - self.shift_factor) * self.scaling_factor
        return z.to(images.device)


__all__ = ["LatentCodec"]
