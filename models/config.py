"""The models config file: which models a server loads, in TOML.

    # models.toml
    [[models]]
    name = "mnist"                 # what clients ask for
    source = "mnist"               # built-in name, folder (relative to this file) or cached hub id
    device = "auto"                # auto, cpu, cuda, cuda:N, mps
    dtype = "float32"              # float32, float16, bfloat16
    channels_last = false
    # null_class = 1000            # the unconditional label of a class-conditional hub model
    # text_encoder_device = "cpu"  # a text pipeline's text encoders elsewhere than its UNet
    # variant = "fp16"             # a text pipeline's *.fp16.safetensors instead of the full files

Parsed with tomllib and validated with pydantic; every problem is a `ModelsConfigError` that names
the file and the field (`models[1].dtype`), the bad value and what is allowed.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from .errors import ModelError
from .loading import Model, load
from .prompts import PromptCache
from .text_to_image import SizeLimits


class ModelsConfigError(ModelError, ValueError):
    """The models config file is missing, not TOML, or not valid."""


class ModelEntry(BaseModel):
    """One model the server loads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the name clients ask for")
    source: str = Field(min_length=1, description="built-in name, local folder or cached hub id")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = "float32"
    channels_last: bool = False
    null_class: int | None = Field(default=None, ge=0)
    text_encoder_device: str | None = Field(default=None, pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$")
    variant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_]{1,32}$", description="e.g. fp16")


class ModelsConfig(BaseModel):
    """The whole file: at least one model, names unique."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelEntry] = Field(min_length=1)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelEntry]) -> list[ModelEntry]:
        names = [m.name for m in models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"model names must be unique; repeated: {', '.join(repeated)}")
        return models


def read_models_config(path: Path) -> ModelsConfig:
    """Parse and validate a models config file; relative folder sources are resolved against the
    file's folder.

    Raises:
        ModelsConfigError: naming the file, and each invalid field with its value and what is allowed.
    """
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelsConfigError(f"models config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelsConfigError(f"models config {path} cannot be read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ModelsConfigError(f"models config {path} is not valid TOML: {error}") from None
    try:
        config = ModelsConfig.model_validate(document)
    except ValidationError as error:
        problems = "; ".join(_describe(e) for e in error.errors())
        raise ModelsConfigError(f"models config {path}: {problems}") from None
    entries = []
    for entry in config.models:
        local = path.parent / entry.source
        if entry.source.startswith((".", "/", "~")) or local.is_dir():
            entry = entry.model_copy(update={"source": str(local.resolve())})
        entries.append(entry)
    return ModelsConfig(models=entries)


def _describe(error: ErrorDetails) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f"={value!r}"
    return f"{where or 'file'}{shown}: {error['msg']}"


def load_models(
    config: ModelsConfig,
    *,
    prompt_cache: PromptCache | None = None,
    size_limits: SizeLimits | None = None,
    failures: list[ModelsConfigError] | None = None,
) -> dict[str, Model]:
    """Load every model of the config, by name (in file order). Text pipelines share `prompt_cache`
    (entries are keyed by encoder fingerprint) and accept `size_limits`.

    Args:
        failures: when given, a model that fails to load is recorded here (its error names the
            model and the file) and skipped, so the others can still be served.
    Raises:
        ModelError: the first model that fails (when `failures` is None), with its name in the message.
    """
    cache = prompt_cache if prompt_cache is not None else PromptCache()
    loaded: dict[str, Model] = {}
    for entry in config.models:
        try:
            loaded[entry.name] = load(
                entry.source,
                name=entry.name,
                device=entry.device,
                dtype=entry.dtype,
                channels_last=entry.channels_last,
                null_class=entry.null_class,
                text_encoder_device=entry.text_encoder_device,
                variant=entry.variant,
                prompt_cache=cache,
                size_limits=size_limits,
            )
        except ModelError as error:
            failure = ModelsConfigError(f"model {entry.name!r} ({entry.source}): {error}")
            if failures is None:
                raise failure from error
            failures.append(failure)
    return loaded


__all__ = ["ModelEntry", "ModelsConfig", "ModelsConfigError", "load_models", "read_models_config"]
