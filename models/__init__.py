"""Model adapters: everything that turns a model into a `solvers.Denoiser`.

`load(source)` gives a model (from a built-in name such as "mnist", a diffusers folder, or a hub
id from the local cache) of one of two kinds: a class-conditional `DiffusionModel`, whose
`conditioned(labels, guidance)` is the denoiser solvers run, or a `TextToImageModel` (Stable
Diffusion, SDXL, SD3 and Flux pipelines), whose `conditioned(prompts, negative_prompts, guidance, height=,
width=)` is a denoiser over latents, with `decode` / `encode` between latents and images. Both
kinds also give their conditioning per network row (`sample_rows`, `rows_denoiser`, models/rows.py),
so that one forward can hold rows of many requests.

Depends on the solver contract only (`solvers.contract`), never on the service or the benchmarks.
"""

from .errors import (
    InvalidConditioningError,
    InvalidDeviceError,
    ModelError,
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
    UnsupportedSchedulerError,
)
from .loading import BUILTINS, DiffusionModel, Model, class_conditional, load
from .prompts import PromptCache
from .text_to_image import ModelKind, SizeLimits, TextToImageModel

__all__ = [
    "BUILTINS",
    "DiffusionModel",
    "InvalidConditioningError",
    "InvalidDeviceError",
    "Model",
    "ModelError",
    "ModelKind",
    "ModelLoadError",
    "ModelNotFoundError",
    "PromptCache",
    "SizeLimits",
    "TextToImageModel",
    "UnsupportedModelError",
    "UnsupportedSchedulerError",
    "class_conditional",
    "load",
]
