"""The text-to-image fields of a GenerateRequest, validated: prompts, negative prompts, image size,
init image and strength.

Everything is checked before any work is queued, and every problem is a field violation
(INVALID_ARGUMENT) naming the field and what is allowed: prompts that are too long or contain NUL
characters, a prompt count that is neither 1 nor num_samples, sizes that are not a multiple of the
VAE factor or over the limits, an init image that is not a decodable PNG, a strength outside
(0, 1], and any of these sent to a class-conditional model (or labels to a text model). Only the
tokenizer runs here (to count the tokens truncation drops); encoders and the VAE run on the
model's worker thread.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image as PILImage
from torch import Tensor

import models
import solvers

from .errors import Violation
from .gen.sampler.v1 import sampler_pb2 as pb
from .settings import Limits

DEFAULT_STRENGTH = 0.8  # diffusers' img2img default
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True, eq=False)
class TextInputs:
    """A text-to-image request's conditioning, per sample.

    Attributes:
        prompts: one per sample.
        negatives: one per sample; None = the model's default unconditional pass.
        height, width: the image size in pixels.
        latent_shape: the solver state's shape per sample (C, h, w).
        init_image: (1, 3, H, W) in [-1, 1], float32, or None.
        start: where the run enters the grid (0 without an init image).
        dropped_tokens: per sample, tokens truncation cuts from its prompt.
    """

    prompts: tuple[str, ...]
    negatives: tuple[str | None, ...]
    height: int
    width: int
    latent_shape: tuple[int, int, int]
    init_image: Tensor | None = field(repr=False)
    start: int
    dropped_tokens: tuple[int, ...]


def check_class_request(request: pb.GenerateRequest, served_name: str, violations: list[Violation]) -> None:
    """A class-conditional model takes none of the text-to-image fields."""
    for name, given in (
        ("prompt", bool(request.prompt)),
        ("negative_prompt", bool(request.negative_prompt)),
        ("init_image", bool(request.init_image)),
        ("strength", request.HasField("strength")),
    ):
        if given:
            violations.append(
                Violation(name, f"model {served_name!r} is class-conditional: it takes labels, not {name}")
            )


def text_inputs(
    request: pb.GenerateRequest,
    model: models.TextToImageModel,
    served_name: str,
    count: int,
    steps: int | None,
    limits: Limits,
    violations: list[Violation],
) -> TextInputs | None:
    """Validate the text-to-image fields for `count` samples (0 when the count itself was invalid)
    and a grid of `steps` (None when the steps were invalid); problems go to `violations`."""
    start_count = len(violations)
    if request.labels:
        violations.append(Violation("labels", f"model {served_name!r} is text-to-image: give prompt, not labels"))
    prompts = _texts("prompt", list(request.prompt) or [""], count, limits, violations, allow_empty_list=False)
    negatives = _texts("negative_prompt", list(request.negative_prompt), count, limits, violations)
    if model.guidance_distilled and request.negative_prompt:
        violations.append(
            Violation(
                "negative_prompt",
                f"not supported by model {served_name!r}: it is guidance-distilled (guidance is an input of the "
                "network, one pass per step, no unconditional pass); leave negative_prompt empty, or serve a model "
                "without guidance_embeds for true CFG",
            )
        )
    init, image_size = _init_image(request, limits, violations)
    height = request.height or (image_size[0] if image_size else model.default_size[0])
    width = request.width or (image_size[1] if image_size else model.default_size[1])
    latent_shape = None
    try:
        latent_shape = model.latent_shape(height, width)
    except models.InvalidConditioningError as error:
        shown = error.field if error.field in ("height", "width") else "width x height"
        violations.append(Violation(shown, f"{error.value} is not supported: expected {error.allowed}"))
    if image_size is not None and (request.height or request.width) and image_size != (height, width):
        violations.append(
            Violation(
                "init_image",
                f"{image_size[1]} x {image_size[0]} pixels does not match width x height {width} x {height}",
            )
        )
    start = 0
    if request.HasField("strength") and not request.init_image:
        violations.append(Violation("strength", "applies to image-to-image only: send init_image too"))
    elif request.init_image and steps is not None:
        strength = request.strength if request.HasField("strength") else DEFAULT_STRENGTH
        try:
            start = solvers.start_step(steps, float(strength))
        except solvers.SolverError as error:
            violations.append(Violation("strength", str(error)))
    if len(violations) > start_count or count == 0 or latent_shape is None or prompts is None or negatives is None:
        return None
    per_sample = prompts if len(prompts) == count else prompts * count
    negative = tuple(negatives if len(negatives) == count else (negatives * count if negatives else [None] * count))
    dropped = tuple(model.dropped_tokens(per_sample))
    return TextInputs(
        prompts=tuple(per_sample),
        negatives=negative,
        height=height,
        width=width,
        latent_shape=latent_shape,
        init_image=init,
        start=start,
        dropped_tokens=dropped,
    )


def _texts(
    name: str,
    texts: list[str],
    count: int,
    limits: Limits,
    violations: list[Violation],
    *,
    allow_empty_list: bool = True,
) -> list[str] | None:
    bad = False
    for i, text in enumerate(texts):
        if len(text) > limits.max_prompt_chars:
            violations.append(
                Violation(f"{name}[{i}]", f"{len(text)} characters: at most {limits.max_prompt_chars} allowed")
            )
            bad = True
        elif "\x00" in text:
            violations.append(Violation(f"{name}[{i}]", "contains a NUL character"))
            bad = True
    allowed = (0, 1, count) if allow_empty_list else (1, count)
    if count and len(texts) not in allowed:
        violations.append(Violation(name, f"{len(texts)} texts for {count} samples: give one, or one per sample"))
        bad = True
    return None if bad else texts


def _init_image(
    request: pb.GenerateRequest, limits: Limits, violations: list[Violation]
) -> tuple[Tensor | None, tuple[int, int] | None]:
    """The init image as (1, 3, H, W) in [-1, 1] and its (H, W), or (None, None)."""
    data = request.init_image
    if not data:
        return None, None
    if not data.startswith(PNG_SIGNATURE):
        violations.append(Violation("init_image", "not a PNG (PNG bytes expected)"))
        return None, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data), formats=["PNG"]) as image:
                width, height = image.size
                # Checked from the header, before the pixels are decompressed.
                if width * height > limits.max_image_pixels or max(width, height) > limits.max_image_side:
                    violations.append(
                        Violation(
                            "init_image",
                            f"{width} x {height} pixels is too large: at most {limits.max_image_side} a side and "
                            f"{limits.max_image_pixels} pixels",
                        )
                    )
                    return None, None
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        violations.append(Violation("init_image", "not a decodable PNG"))
        return None, None
    tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return tensor.unsqueeze(0), (height, width)


__all__ = ["DEFAULT_STRENGTH", "TextInputs", "check_class_request", "text_inputs"]
