"""The server's settings: one pydantic-settings object, read from (highest first) command-line
flags, environment variables `SAMPLER_*` (nested with `__`, e.g. `SAMPLER_LIMITS__MAX_STEPS=200`)
and an optional TOML file (`--config`). No other module reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from models import SizeLimits
from solvers import MAX_STEPS
from solvers.errors import quote

# Validation errors never quote what was given: a settings error must not print a secret (the
# whole input of a model validator would include auth_token). `describe_error` adds the values
# of the plain fields back.
SECRET_SETTINGS = ("auth_token",)


class Limits(BaseModel):
    """What one request may ask for, and how much the server takes on at once."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    max_samples_per_request: int = Field(64, ge=1, le=4096)
    max_steps: int = Field(MAX_STEPS, ge=1, le=MAX_STEPS)
    min_guidance: float = Field(0.0, ge=-100.0, le=100.0)
    max_guidance: float = Field(20.0, ge=-100.0, le=100.0)
    max_queued_requests: int = Field(64, ge=1, le=100_000, description="admitted (queued or running) requests")
    max_concurrent_streams: int = Field(128, ge=1, le=100_000)
    retry_after_seconds: float = Field(0.5, gt=0.0, le=3600.0, description="RetryInfo delay when the queue is full")
    max_prompt_chars: int = Field(4000, ge=1, le=1_000_000, description="longest prompt or negative prompt")
    min_image_side: int = Field(32, ge=8, le=16_384, description="text-to-image: smallest width or height")
    max_image_side: int = Field(2048, ge=8, le=16_384, description="text-to-image: largest width or height")
    max_image_pixels: int = Field(
        2048 * 2048, ge=64, le=2**28, description="text-to-image: largest width x height (memory grows with it)"
    )

    @model_validator(mode="after")
    def _guidance_range(self) -> Limits:
        if self.min_guidance > self.max_guidance:
            raise ValueError(f"min_guidance={self.min_guidance} is above max_guidance={self.max_guidance}")
        if self.min_image_side > self.max_image_side:
            raise ValueError(f"min_image_side={self.min_image_side} is above max_image_side={self.max_image_side}")
        return self

    def size_limits(self) -> SizeLimits:
        """The image sizes text-to-image models accept."""
        return SizeLimits(self.min_image_side, self.max_image_side, self.max_image_pixels)


class Batching(BaseModel):
    """How requests share the model: step-level (evaluations of all requests) or request-level batching."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    mode: Literal["step", "request"] = Field(
        "step",
        description="step: each forward holds the pending evaluations of all active requests, whatever their "
        "solver, steps, guidance, labels or prompts (requests of one image size); request: a batch merges whole "
        "requests with equal solver, steps, schedule and guidance passes",
    )
    max_batch_size: int = Field(256, ge=1, le=65_536, description="network rows per batch (a guided sample counts 2)")
    max_queue_delay_ms: float = Field(
        5.0,
        ge=0.0,
        le=10_000.0,
        description="how long a batch waits for company (step mode: how long a tick waits for the active "
        "requests' next evaluations)",
    )
    share_rows: int = Field(
        4,
        ge=1,
        le=65_536,
        description="step mode: while other requests are active, one evaluation takes at most as many rows of a "
        "forward as the largest other one, and at least this many (the rest in the next forwards), so a large "
        "request does not slow a small one's steps",
    )
    solo_rows: int = Field(
        16,
        ge=1,
        le=65_536,
        description="step mode: the most rows one request's evaluation takes of a forward while it runs alone, "
        "so that a request that arrives waits at most one such forward for its first step (16: a CPU forward's "
        "rows/s is flat from about 8 rows; raise it on a GPU for large lone requests)",
    )
    adaptive_delay: bool = Field(
        True,
        description="end the wait once the expected company is here: as many requests as the last batch held "
        "plus those that queued while it ran (a lone request under no load starts at once)",
    )


class Threads(BaseModel):
    """torch's thread pools (threads.py explains the default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    intra_op: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="torch intra-op threads; unset: half the CPUs this process may use (affinity and cgroup "
        "quota), 1..8",
    )
    inter_op: int | None = Field(None, ge=1, le=1024, description="torch inter-op threads; unset: 1")


class Settings(BaseSettings):
    """Everything `create_server` needs."""

    model_config = SettingsConfigDict(
        env_prefix="SAMPLER_", env_nested_delimiter="__", extra="forbid", frozen=True, hide_input_in_errors=True
    )

    host: str = Field("127.0.0.1", description="listen address; 0.0.0.0 or [::] to listen on all interfaces")
    port: int = Field(50051, ge=0, le=65_535, description="0 = pick a free port")
    models_config: Path | None = Field(None, description="TOML models config; default: the built-in mnist model")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+|mps)$", description="for the default model")
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = Field("float32", description="for the default model")
    predictor_dirs: list[Path] = Field(
        default_factory=list, description="AMED predictor folders, searched before each model's amed/"
    )
    batching: Batching = Batching()
    threads: Threads = Threads()
    limits: Limits = Limits()
    auth_token: SecretStr | None = Field(None, description="bearer token clients must send; unset = no auth")
    auth_token_file: Path | None = Field(None, description="read the bearer token from this file")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = Field(None, ge=0, le=65_535, description="Prometheus HTTP port; unset = off, 0 = free")
    metrics_host: str = Field("127.0.0.1", description="address the metrics endpoint listens on")
    reflection: bool = True
    grace_seconds: float = Field(10.0, ge=0.0, le=3600.0, description="drain period on SIGTERM/SIGINT")
    warmup: bool = Field(True, description="run the largest batch shape once before reporting SERVING")
    prompt_cache_size: int = Field(
        256, ge=0, le=1_000_000, description="encoded prompts kept (LRU, shared by the text-to-image models)"
    )

    @model_validator(mode="after")
    def _pairs(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.auth_token is not None and self.auth_token_file is not None:
            raise ValueError("give auth_token or auth_token_file, not both")
        return self

    def token(self) -> str | None:
        """The bearer token, from auth_token or auth_token_file (stripped), or None."""
        if self.auth_token is not None:
            return self.auth_token.get_secret_value()
        if self.auth_token_file is not None:
            return self.auth_token_file.read_text(encoding="utf-8").strip()
        return None


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from flags (`overrides`), then SAMPLER_* variables, then the TOML file.

    Raises:
        pydantic.ValidationError: naming each invalid setting.
    """

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    if config_file is not None and not Path(config_file).is_file():
        raise FileNotFoundError(f"settings file {config_file} does not exist")
    loaded = FileSettings(**overrides)
    return Settings.model_construct(**{name: getattr(loaded, name) for name in Settings.model_fields})


def describe_error(error: ValidationError) -> str:
    """One line naming each invalid setting, its value (never a secret's) and what is wrong."""
    parts = []
    for problem in error.errors():
        name = ".".join(str(part) for part in problem["loc"])
        message = str(problem["msg"]).removeprefix("Value error, ")
        given = problem.get("input")
        secret = any(name == s or name.startswith(f"{s}.") for s in SECRET_SETTINGS)
        if name and not secret and isinstance(given, str | int | float | bool):
            parts.append(f"{name}={quote(given)}: {message}")
        else:
            parts.append(f"{name}: {message}" if name else message)
    return "invalid settings: " + "; ".join(parts)


__all__ = ["Batching", "Limits", "Settings", "Threads", "describe_error", "load_settings"]
