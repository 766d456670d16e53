"""Domain errors of the model adapters.

Every error an adapter raises on purpose for an unusable model or configuration is a `ModelError`,
so callers (the service, the benchmark CLI) map one family in one place. Messages name the field,
the bad value and what is allowed. This module imports nothing else of ours.
"""

from __future__ import annotations


class ModelError(Exception):
    """Base class of every error the model adapters raise on purpose."""


class _FieldError(ModelError, ValueError):
    """One configuration field is not usable: `field` names it, `value` is what came, `allowed` what may."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={_short(value)} is not supported: expected {allowed}")


class UnsupportedSchedulerError(_FieldError):
    """A field of a diffusers scheduler config that the adapter cannot turn into trained sigmas."""


class UnsupportedModelError(_FieldError):
    """A field of a model config (e.g. a UNet's time embedding) that the adapter cannot drive."""


class InvalidConditioningError(_FieldError):
    """Conditioning (labels, embeddings, guidance) that does not fit the model."""


class InvalidDeviceError(_FieldError):
    """A device or dtype choice that is unknown or not available on this host."""


class ModelNotFoundError(ModelError, LookupError):
    """A model source that is neither a built-in name, a local folder nor a cached hub id."""


class ModelLoadError(ModelError):
    """A model folder whose files are missing, unsafe, corrupt or inconsistent; `path` names the file."""

    def __init__(self, path: object, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
