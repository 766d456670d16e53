"""The AMED predictor: where in each interval to take the mean-value direction, and a small scale.

For the interval [sigma_{i+1}, sigma_i] it maps the U-Net's bottleneck feature at (x_i, sigma_i)
(the channel-mean of the lowest-resolution activation, (B, h, w)) and the two sigmas to

- r in (0, 1): the intermediate time s_i = sigma_{i+1}^r sigma_i^(1 - r) (geometric interpolation);
- c in (1 - dc, 1 + dc): a scale on the step's model terms, absorbing what the mean value
  theorem cannot give a vector field;
- a in (1 - da, 1 + da) (when da > 0): a scale on the sigma given to the network at s_i.

Architecture (one network for all intervals, ~9k parameters at 7 x 7): the flattened feature
through Linear-SiLU-Linear to `width` values; each raw sigma through a fixed sinusoidal embedding
and one shared Linear-SiLU to `width` values; the three concatenated; one Linear + sigmoid head
per output. In "table" mode the feature is absent (zeros): a learned fixed schedule for models
whose bottleneck cannot be read.

Artifacts are a safetensors file of the weights plus a JSON sidecar (`PredictorCard`) saying what
the predictor was trained for; `PredictorStore` finds the one a request needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import InvalidParameterError, MissingGridError, MissingPredictorError, SolverError
from ..learned.grid import (
    ANY_METHOD,
    GRID_FILE_PREFIX,
    UNRANKED_METHOD,
    GridCard,
    GridKey,
    GridLoadError,
    RankingEntry,
    grid_key,
    is_grid_file,
    is_ranking_file,
    read_grid,
    read_ranking,
    train_schedule_command,
)
from ..planning import SamplingPlan
from ..schedules import LEARNED_METHODS
from .bases import AMEDPluginParams

ARTIFACT_VERSION = 1


class PredictorLoadError(SolverError):
    """A predictor artifact that cannot be used: the message names the file and the problem."""


class PredictorConfig(pydantic.BaseModel):
    """The shape of a predictor network (stored in the sidecar; rebuilds the module)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    feature_shape: tuple[int, int] | None = None
    """(h, w) of the bottleneck feature, or None for table mode."""
    width: Annotated[int, pydantic.Field(ge=1, le=256)] = 16
    hidden: Annotated[int, pydantic.Field(ge=1, le=1024)] = 64
    frequencies: Annotated[int, pydantic.Field(ge=1, le=64)] = 8
    dc: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.01
    da: Annotated[float, pydantic.Field(ge=0, lt=1)] = 0.0

    @property
    def table_mode(self) -> bool:
        return self.feature_shape is None


@dataclass(frozen=True)
class Prediction:
    """Per-sample outputs for one interval, shape (B,) each, float64."""

    r: Tensor
    c: Tensor
    a: Tensor


def sinusoidal(sigma: Tensor, frequencies: int) -> Tensor:
    """sin/cos of log(sigma) at `frequencies` octave-spaced rates: (B,) -> (B, 2 * frequencies).

    The sigma values span four to five decades, so the phase runs in log sigma."""
    rates = 2.0 ** torch.arange(frequencies, dtype=sigma.dtype, device=sigma.device) / 4.0
    phase = torch.log(sigma)[:, None] * rates[None, :]
    return torch.cat([torch.sin(phase), torch.cos(phase)], dim=1)


class AMEDPredictor(nn.Module):
    """Feature and sigmas -> (r, c, a) for one interval (see the module docstring)."""

    def __init__(self, config: PredictorConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        if config.feature_shape is not None:
            h, w = config.feature_shape
            self.feature_net: nn.Module | None = nn.Sequential(
                nn.Linear(h * w, config.hidden), nn.SiLU(), nn.Linear(config.hidden, width)
            )
        else:
            self.feature_net = None
        self.sigma_net = nn.Sequential(nn.Linear(2 * config.frequencies, width), nn.SiLU())
        inputs = 3 * width if self.feature_net is not None else 2 * width
        self.head_r = nn.Linear(inputs, 1)
        self.head_c = nn.Linear(inputs, 1)
        self.head_a = nn.Linear(inputs, 1) if config.da > 0 else None
        for head in (self.head_r, self.head_c, self.head_a):
            if head is not None:  # start at r = 0.5, c = a = 1: the DPM-Solver-2 midpoint
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def forward(self, feature: Tensor | None, sigma_cur: Tensor, sigma_next: Tensor) -> Prediction:
        """Args:
            feature: (B, h, w) (detached by the caller), or None in table mode.
            sigma_cur, sigma_next: (B,), sigma_i > sigma_{i+1} > 0.
        Returns:
            r, c, a of shape (B,), float64.
        """
        dtype = next(self.parameters()).dtype
        parts = [
            self.sigma_net(sinusoidal(sigma_cur.to(dtype), self.config.frequencies)),
            self.sigma_net(sinusoidal(sigma_next.to(dtype), self.config.frequencies)),
        ]
        if self.feature_net is not None:
            if feature is None:
                raise ValueError("this predictor reads the bottleneck feature; got None")
            parts.insert(0, self.feature_net(feature.reshape(feature.shape[0], -1).to(dtype)))
        joined = torch.cat(parts, dim=1)

        def unit(head: nn.Module) -> Tensor:  # in [0, 1]; float64 keeps the bounds exact when saturated
            return torch.sigmoid(head(joined).squeeze(1).double())

        r = unit(self.head_r)
        c = 1.0 + self.config.dc * (2.0 * unit(self.head_c) - 1.0)
        a = 1.0 + self.config.da * (2.0 * unit(self.head_a) - 1.0) if self.head_a is not None else torch.ones_like(r)
        return Prediction(r, c, a)


class TrainedGrid(pydantic.BaseModel):
    """The learned grid a predictor was trained on (schedule `learned`): the predictor learned its
    intermediate points for these sigmas, so the store serves it only while the grid stored under
    this key has them."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    file: str
    method: str
    solver_params: dict[str, Any]
    sigmas: list[float] = pydantic.Field(min_length=2)


class PredictorCard(pydantic.BaseModel):
    """The JSON sidecar: what a predictor was trained for, and how."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    version: int = ARTIFACT_VERSION
    model: str
    model_fingerprint: str
    solver: Literal["amed", "amed_plugin"]
    base: str | None = None
    base_max_order: int | None = None
    nfe: int
    steps: int
    schedule: str
    schedule_params: dict[str, Any] = pydantic.Field(default_factory=dict)
    sigma_min: float
    sigma_max: float
    afs: bool
    guidance: float
    config: PredictorConfig
    grid: TrainedGrid | None = None
    """Schedule `learned`: the grid trained on (None on cards from before it was recorded)."""
    training: dict[str, Any] = pydantic.Field(default_factory=dict)

    def grid_key(self) -> GridKey | None:
        """The key of the grid recorded in `grid` (None where none is)."""
        if self.grid is None:
            return None
        return grid_key(
            model_fingerprint=self.model_fingerprint,
            solver=self.solver,
            solver_params=self.grid.solver_params,
            method=self.grid.method,
            nfe=self.nfe,
            afs=self.afs,
            guidance=self.guidance,
        )

    def key(self) -> PredictorKey:
        return PredictorKey(
            model_fingerprint=self.model_fingerprint,
            solver=self.solver,
            base=self.base,
            base_max_order=self.base_max_order,
            nfe=self.nfe,
            schedule=self.schedule,
            schedule_params=_canonical(self.schedule_params),
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            afs=self.afs,
            guidance=self.guidance,
        )


@dataclass(frozen=True)
class PredictorKey:
    """What must match between a request and a predictor."""

    model_fingerprint: str
    solver: str
    base: str | None
    base_max_order: int | None
    nfe: int
    schedule: str
    schedule_params: str
    sigma_min: float
    sigma_max: float
    afs: bool
    guidance: float

    def describe(self) -> str:
        base = f" base={self.base} max_order={self.base_max_order}" if self.base else ""
        return (
            f"model {self.model_fingerprint[:12]} solver={self.solver}{base} nfe={self.nfe} "
            f"schedule={self.schedule} {self.schedule_params} sigma=[{self.sigma_min:g}, {self.sigma_max:g}] "
            f"afs={self.afs} guidance={self.guidance:g}"
        )


def _canonical(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def predictor_key(plan: SamplingPlan, *, model_fingerprint: str, guidance: float) -> PredictorKey:
    """The key of the predictor that running `plan` (an `amed` or `amed_plugin` plan) on the model
    `model_fingerprint` at `guidance` needs: the one function that builds it (the service, the
    training command and the sweep all call it; `PredictorCard.key` reads it back)."""
    if not plan.spec.needs_predictor:
        raise InvalidParameterError("solver", plan.solver, "a solver that uses a predictor (amed, amed_plugin)")
    plugin = plan.params if isinstance(plan.params, AMEDPluginParams) else None
    sigmas = plan.sigmas
    return PredictorKey(
        model_fingerprint=model_fingerprint,
        solver=plan.solver,
        base=plugin.base if plugin else None,
        base_max_order=plugin.order_limit() if plugin else None,
        nfe=plan.solver_nfe,
        schedule=plan.schedule,
        schedule_params=_canonical(plan.schedule_params.model_dump()),
        sigma_min=float(sigmas[-1]),
        sigma_max=float(sigmas[0]),
        afs=plan.afs,
        guidance=float(guidance),
    )


def new_card(
    plan: SamplingPlan,
    *,
    model: str,
    model_fingerprint: str,
    guidance: float,
    config: PredictorConfig,
    training: dict[str, Any],
    grid: TrainedGrid | None = None,
) -> PredictorCard:
    """The sidecar of a predictor trained for `plan` (on `grid`, for a learned schedule): its key's
    fields (see predictor_key) and how it was made."""
    key = predictor_key(plan, model_fingerprint=model_fingerprint, guidance=guidance)
    return PredictorCard(
        model=model,
        model_fingerprint=key.model_fingerprint,
        solver=plan.solver,  # amed or amed_plugin: checked by predictor_key
        base=key.base,
        base_max_order=key.base_max_order,
        nfe=key.nfe,
        steps=plan.run_steps,
        schedule=key.schedule,
        schedule_params=plan.schedule_params.model_dump(),
        sigma_min=key.sigma_min,
        sigma_max=key.sigma_max,
        afs=key.afs,
        guidance=key.guidance,
        config=config,
        grid=grid,
        training=training,
    )


def save_predictor(predictor: AMEDPredictor, card: PredictorCard, stem: Path) -> tuple[Path, Path]:
    """Write `stem`.safetensors (float32 weights) and `stem`.json (the card)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    weights = {name: value.detach().float().contiguous().cpu() for name, value in predictor.state_dict().items()}
    weights_path, card_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    save_file(weights, str(weights_path), metadata={"format": "pt", "amed_artifact_version": str(ARTIFACT_VERSION)})
    card_path.write_text(card.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return weights_path, card_path


def read_card(path: Path) -> PredictorCard:
    try:
        return PredictorCard.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, pydantic.ValidationError) as error:
        raise PredictorLoadError(f"{path}: not a valid AMED predictor card ({_first_line(error)})") from None


def load_predictor(card_path: Path, device: torch.device | str = "cpu") -> tuple[AMEDPredictor, PredictorCard]:
    """The predictor described by `card_path` (its weights beside it), in eval mode on `device`."""
    card = read_card(card_path)
    weights_path = card_path.with_suffix(".safetensors")
    try:
        state = load_file(str(weights_path))
    except (OSError, SafetensorError) as error:
        raise PredictorLoadError(f"{weights_path}: cannot read the predictor weights ({_first_line(error)})") from None
    predictor = AMEDPredictor(card.config)
    try:
        predictor.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise PredictorLoadError(
            f"{weights_path}: weights do not fit the card's config ({_first_line(error)})"
        ) from None
    return predictor.to(device).eval(), card


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def train_command(key: PredictorKey, model: str) -> str:
    """The command that trains the predictor `key` describes."""
    parts = ["sampler-amed", "train", "--model", model, "--solver", key.solver]
    if key.base:
        parts += ["--base", key.base, "--base-max-order", str(key.base_max_order)]
    parts += ["--nfe", str(key.nfe), "--schedule", key.schedule]
    if key.schedule_params not in ("", "{}"):
        parts += ["--schedule-params", f"'{key.schedule_params}'"]
    parts += ["--guidance", f"{key.guidance:g}", "--afs" if key.afs else "--no-afs"]
    return " ".join(parts)


class PredictorStore:
    """The trained artifacts in some folders, found by key: AMED predictors and learned grids (the
    first folder holding a key wins). Predictors are loaded once and kept; grids are read (and
    validated) when the store is built."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.cards: dict[PredictorKey, Path] = {}
        self.grids: dict[GridKey, tuple[Path, GridCard]] = {}
        self.rankings: dict[GridKey, tuple[Path, RankingEntry]] = {}
        """Ranking entries by their key naming no method (`GridKey.any_method`)."""
        self.problems: list[str] = []
        trained_on: dict[PredictorKey, tuple[Path, TrainedGrid, GridKey]] = {}
        for folder in folders:
            for card_path in sorted(Path(folder).glob("*.json")):
                try:
                    if is_ranking_file(card_path):
                        ranking = read_ranking(card_path)
                        for entry in ranking.entries:
                            self.rankings.setdefault(ranking.key(entry), (card_path, entry))
                        continue
                    if _claims_grid(card_path):
                        grid = read_grid(card_path)
                        self.grids.setdefault(grid.key(), (card_path, grid))
                        continue
                    card = read_card(card_path)
                except (PredictorLoadError, GridLoadError) as error:
                    self.problems.append(str(error))
                    continue
                if card.key() not in self.cards:
                    self.cards[card.key()] = card_path
                    if card.grid is not None and (wanted := card.grid_key()) is not None:
                        trained_on[card.key()] = (card_path, card.grid, wanted)
        self._drop_stale_rankings()
        self._drop_stale_predictors(trained_on)
        self._loaded: dict[tuple[PredictorKey, str], AMEDPredictor] = {}

    def _drop_stale_rankings(self) -> None:
        """Forget a ranking entry unless every grid it ranks is the one stored under its key now
        (same sigmas): a grid retrained or removed after the ranking does not keep its rank."""
        for key, (path, entry) in list(self.rankings.items()):
            for ranked in entry.grids:
                stored = self.grids.get(dataclasses.replace(key, method=ranked.method))
                if stored is None or stored[1].sigmas != ranked.sigmas:
                    del self.rankings[key]
                    change = "is not stored" if stored is None else f"in {stored[0].name} differs from the one ranked"
                    self.problems.append(
                        f"{path}: ranking of {key.describe()} ignored: its {ranked.method} grid {change} "
                        "(rerun sampler-amed rank-grids)"
                    )
                    break

    def _drop_stale_predictors(self, trained_on: dict[PredictorKey, tuple[Path, TrainedGrid, GridKey]]) -> None:
        """Forget a predictor trained on a learned grid unless that grid is the one stored under its
        key now (same sigmas): with another grid its intermediate points are for the wrong intervals,
        so a request gets the missing-predictor error and the command that retrains it."""
        for key, (path, grid, wanted) in trained_on.items():
            stored = self.grids.get(wanted)
            if stored is not None and stored[1].sigmas == grid.sigmas:
                continue
            del self.cards[key]
            change = "is not stored" if stored is None else f"in {stored[0].name} has other sigmas"
            self.problems.append(
                f"{path}: predictor for {key.describe()} ignored: it was trained on the {grid.method} grid "
                f"{grid.file}, and the grid stored under that key {change} (retrain the predictor on it)"
            )

    def preload(self, device: torch.device | str = "cpu") -> None:
        """Load every predictor now; one that fails is dropped and its problem recorded."""
        for key in list(self.cards):
            try:
                self.find(key, "", device)
            except PredictorLoadError as error:
                self.problems.append(str(error))
                del self.cards[key]

    def keys(self, model_fingerprint: str | None = None) -> list[PredictorKey]:
        return [k for k in self.cards if model_fingerprint is None or k.model_fingerprint == model_fingerprint]

    def grid_keys(self, model_fingerprint: str | None = None) -> list[GridKey]:
        return [k for k in self.grids if model_fingerprint is None or k.model_fingerprint == model_fingerprint]

    def has(self, key: PredictorKey) -> bool:
        return key in self.cards

    def has_grid(self, key: GridKey) -> bool:
        return key in self.grids

    def find(self, key: PredictorKey, model: str, device: torch.device | str = "cpu") -> AMEDPredictor:
        """The predictor for `key`.

        Raises:
            MissingPredictorError: none matches; lists what exists for this model and the command
                that trains the missing one.
            PredictorLoadError: the matching artifact is corrupt.
        """
        if key not in self.cards:
            available = [k.describe() for k in self.keys(key.model_fingerprint)]
            raise MissingPredictorError(key.describe(), available, train_command(key, model))
        cache_key = (key, str(device))
        if cache_key not in self._loaded:
            self._loaded[cache_key] = load_predictor(self.cards[key], device)[0]
        return self._loaded[cache_key]

    def resolve_grid(self, key: GridKey) -> GridKey:
        """`key` with a method: itself when it names one; else the only method with a grid for the
        rest of the key, or of several the one ranked best (`sampler-amed rank-grids`), or, unranked
        or with none stored, `UNRANKED_METHOD` (whose absence `find_grid` then reports)."""
        if key.method != ANY_METHOD:
            return key
        stored = [method for method in LEARNED_METHODS if dataclasses.replace(key, method=method) in self.grids]
        if len(stored) == 1:
            return dataclasses.replace(key, method=stored[0])
        if stored and key in self.rankings:
            ranked = self.rankings[key][1].grids  # lowest RMSE first, every one stored
            return dataclasses.replace(key, method=ranked[0].method)
        return dataclasses.replace(key, method=UNRANKED_METHOD)

    def find_grid(self, key: GridKey, model: str) -> Tensor:
        """The sigmas of the learned grid for `key`, float64 (steps + 1,).

        Raises:
            MissingGridError: as `grid_card`.
        """
        return torch.tensor(self.grid_card(key, model)[1].sigmas, dtype=torch.float64)

    def grid_card(self, key: GridKey, model: str) -> tuple[Path, GridCard]:
        """The learned grid for `key`: its file and card.

        Raises:
            MissingGridError: none matches; lists the grids this model has and the command that
                trains the missing one.
        """
        if key not in self.grids:
            available = [k.describe() for k in self.grid_keys(key.model_fingerprint)]
            raise MissingGridError(key.describe(), available, train_schedule_command(key, model))
        return self.grids[key]


def _claims_grid(path: Path) -> bool:
    """Whether the JSON file at `path` is a learned grid: it says so, or (unreadable) it is named
    like one; anything else is read as a predictor card."""
    if path.name.startswith(GRID_FILE_PREFIX):
        return True
    try:
        return is_grid_file(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def sigma_pair(
    sigma_cur: float | Tensor, sigma_next: float | Tensor, batch: int, like: Tensor
) -> tuple[Tensor, Tensor]:
    """The two sigmas of an interval as (B,) float64 tensors on `like`'s device."""

    def expand(value: float | Tensor) -> Tensor:
        tensor = torch.as_tensor(value, dtype=torch.float64, device=like.device)
        return tensor.expand(batch) if tensor.dim() == 0 else tensor.to(torch.float64)

    return expand(sigma_cur), expand(sigma_next)


def log_interpolate(sigma_cur: float, sigma_next: float, r: Tensor) -> Tensor:
    """s = sigma_next^r sigma_cur^(1 - r), per sample (B,), float64."""
    return torch.exp(r * math.log(sigma_next) + (1.0 - r) * math.log(sigma_cur))


__all__ = [
    "AMEDPredictor",
    "Prediction",
    "PredictorCard",
    "PredictorConfig",
    "PredictorKey",
    "PredictorLoadError",
    "PredictorStore",
    "TrainedGrid",
    "load_predictor",
    "log_interpolate",
    "new_card",
    "predictor_key",
    "read_card",
    "save_predictor",
    "sigma_pair",
    "sinusoidal",
    "train_command",
]
