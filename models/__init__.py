"""Model adapters: everything that turns a model into a `solvers.Denoiser`.

`load(source)` gives a `DiffusionModel` (a built-in name such as "mnist", a diffusers folder, or a
hub id from the local cache); its `conditioned(labels, guidance)` is the denoiser solvers run.

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
from .loading import BUILTINS, DiffusionModel, load

__all__ = [
    "BUILTINS",
    "DiffusionModel",
    "InvalidConditioningError",
    "InvalidDeviceError",
    "ModelError",
    "ModelLoadError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "UnsupportedSchedulerError",
    "load",
]
