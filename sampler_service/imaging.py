"""Encoding samples for the wire.

- PNG: uint8 = clamp(round((x + 1) * 127.5), 0, 255), mode L for one channel, RGB for three.
- RAW_FLOAT32: the sample itself, float32 little-endian, C x H x W, unclamped.
Previews are PNGs of the current data prediction, average-pooled to at most 64 pixels a side and
at least halved.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

from .gen.sampler.v1 import sampler_pb2 as pb

PREVIEW_MAX_SIDE = 64


def to_uint8(sample: Tensor) -> np.ndarray:
    """(C, H, W) float in about [-1, 1] -> (H, W, C) uint8 per the documented rule."""
    pixels = ((sample.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


def png_bytes(sample: Tensor) -> bytes:
    pixels = to_uint8(sample)
    channels = pixels.shape[2]
    if channels == 1:
        image = PILImage.fromarray(pixels[:, :, 0], mode="L")
    elif channels == 3:
        image = PILImage.fromarray(pixels, mode="RGB")
    else:
        raise ValueError(f"PNG needs 1 or 3 channels, not {channels}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()


def encode(sample: Tensor, output_format: int) -> pb.Image:
    """One sample (C, H, W) as an Image message in the requested format (PNG or RAW_FLOAT32)."""
    channels, height, width = sample.shape
    if output_format == pb.OUTPUT_FORMAT_RAW_FLOAT32:
        data = sample.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()
    else:
        data = png_bytes(sample)
        output_format = pb.OUTPUT_FORMAT_PNG
    wire_format: Any = output_format  # an OutputFormat enum value
    return pb.Image(format=wire_format, data=data, channels=channels, height=height, width=width)


def preview(denoised: Tensor) -> list[pb.Image]:
    """Low-resolution PNGs of a batch of predictions (B, C, H, W)."""
    side = max(denoised.shape[-2:])
    factor = max(2, math.ceil(side / PREVIEW_MAX_SIDE))
    small = torch.nn.functional.avg_pool2d(denoised.float(), factor, ceil_mode=True)
    return [encode(sample, pb.OUTPUT_FORMAT_PNG) for sample in small]


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W) or (H, W, C) uint8 array (for clients and tests)."""
    with PILImage.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def decode_raw(image: pb.Image) -> np.ndarray:
    """A RAW_FLOAT32 Image -> (C, H, W) float32 array."""
    return np.frombuffer(image.data, dtype="<f4").reshape(image.channels, image.height, image.width)


__all__ = ["decode_png", "decode_raw", "encode", "png_bytes", "preview", "to_uint8"]
