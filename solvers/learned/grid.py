"""The learned-grid artifact: a stored sigma grid for one model, solver (with its parameters),
NFE, AFS, guidance and training method, and the one key that finds it.

A grid is a JSON file (`GridCard`): what it was trained for, the sigmas themselves (float64 in
JSON round-trip exactly) and how it was trained (command, revision, teacher, seeds, losses,
cost). It is validated when read (steps + 1 strictly decreasing positive sigmas, the key's
fields complete), so a corrupt or hand-edited file is refused naming the file. The key is built
by `grid_key` and nothing else; `GridCard.key()` and every caller go through it.

Where one key has grids of several methods, a ranking (`GridRanking`, one `learned-ranking.json`
per folder, written by `sampler-amed rank-grids`) records each one's held-out error, so that a
request naming no method gets the better grid. A ranked entry holds the sigmas it scored, so a
grid retrained after the ranking does not inherit its rank.

The store that finds grids is the AMED predictor store (solvers/amed/predictor.py): one folder,
one listing, one lookup for every trained artifact of a model.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import pydantic

from ..errors import SolverError

GRID_VERSION = 1
ARTIFACT = "learned_grid"
GRID_FILE_PREFIX = "grid-"
# Noise seeds of grid training start here, and those of held-out selection (picking among
# candidate grids) at GRID_SELECTION_SEED_BASE: both far above every benchmark's seeds and apart
# from the AMED predictors' range (2**40 + seed * 1000003 + k).
GRID_TRAINING_SEED_BASE = 2**41
GRID_SELECTION_SEED_BASE = 2**42
RANKING_ARTIFACT = "learned_grid_ranking"
RANKING_FILE = "learned-ranking.json"
# What a request naming no method gets where a key has grids of several methods and no ranking:
# LD3, the method whose grids beat the hand-designed schedules on both shipped models.
UNRANKED_METHOD = "ld3"
ANY_METHOD = ""
"""The method of a key that names none (`GridKey.any_method`): the store picks one."""


class GridLoadError(SolverError):
    """A learned-grid file that cannot be used: the message names the file and the problem."""


class GridCard(pydantic.BaseModel):
    """A learned grid and what it was trained for (the whole artifact: one JSON file)."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    artifact: Literal["learned_grid"] = "learned_grid"
    version: int = GRID_VERSION
    model: str
    model_fingerprint: str
    solver: str
    solver_params: dict[str, Any] = pydantic.Field(default_factory=dict)
    """Complete (defaults included): `Params.model_dump()`."""
    method: Literal["gits", "ld3"]
    nfe: int = pydantic.Field(ge=1)
    steps: int = pydantic.Field(ge=1)
    afs: bool
    guidance: float
    sigmas: list[float]
    training: dict[str, Any] = pydantic.Field(default_factory=dict)

    @pydantic.model_validator(mode="after")
    def _check_sigmas(self) -> GridCard:
        values = self.sigmas
        if len(values) != self.steps + 1:
            raise ValueError(f"sigmas has {len(values)} values for steps={self.steps}: expected {self.steps + 1}")
        if not all(math.isfinite(v) for v in values) or values[-1] <= 0:
            raise ValueError("sigmas must be finite and > 0")
        if any(b >= a for a, b in itertools.pairwise(values)):
            raise ValueError("sigmas must be strictly decreasing")
        return self

    def key(self) -> GridKey:
        return grid_key(
            model_fingerprint=self.model_fingerprint,
            solver=self.solver,
            solver_params=self.solver_params,
            method=self.method,
            nfe=self.nfe,
            afs=self.afs,
            guidance=self.guidance,
        )


@dataclass(frozen=True)
class GridKey:
    """What must match between a request and a learned grid."""

    model_fingerprint: str
    solver: str
    solver_params: str  # canonical JSON
    method: str
    nfe: int
    afs: bool
    guidance: float

    def any_method(self) -> GridKey:
        """This key naming no method: what a ranking entry and a request without one are filed under."""
        return dataclasses.replace(self, method=ANY_METHOD)

    def describe(self) -> str:
        return (
            f"model {self.model_fingerprint[:12]} learned grid method={self.method or 'any'} solver={self.solver} "
            f"{self.solver_params} nfe={self.nfe} afs={self.afs} guidance={self.guidance:g}"
        )

    def file_stem(self) -> str:
        """The default artifact name (unique per key within one model's folder)."""
        params = json.loads(self.solver_params)
        tail = "".join(f"-{k}{v}" for k, v in sorted(params.items()) if v is not None)
        afs = "afs" if self.afs else "noafs"
        return f"{GRID_FILE_PREFIX}{self.method}-{self.solver}{tail}-nfe{self.nfe}-{afs}-w{self.guidance:g}"


def grid_key(
    *,
    model_fingerprint: str,
    solver: str,
    solver_params: dict[str, Any],
    method: str,
    nfe: int,
    afs: bool,
    guidance: float,
) -> GridKey:
    """The key of a request or a card (solver_params complete, defaults included)."""
    return GridKey(
        model_fingerprint=model_fingerprint,
        solver=solver,
        solver_params=json.dumps(solver_params, sort_keys=True, separators=(",", ":")),
        method=method,
        nfe=int(nfe),
        afs=bool(afs),
        guidance=float(guidance),
    )


def is_grid_file(payload: Any) -> bool:
    """Whether a parsed JSON artifact claims to be a learned grid (the store dispatches on it)."""
    return isinstance(payload, dict) and payload.get("artifact") == ARTIFACT


def read_grid(path: Path) -> GridCard:
    """The validated grid card at `path`.

    Raises:
        GridLoadError: unreadable, not JSON, or not a valid grid; the message names the file.
    """
    return _read(GridCard, path, "learned grid")


class RankedGrid(pydantic.BaseModel):
    """One grid of a ranking entry: its method, file, the sigmas scored and their held-out RMSE."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    method: Literal["gits", "ld3"]
    file: str
    sigmas: list[float]
    rmse: Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]


class RankingEntry(pydantic.BaseModel):
    """The grids of one key (all but the method) on one held-out protocol, lowest RMSE first."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    solver: str
    solver_params: dict[str, Any]
    """Complete (defaults included), as in a grid card."""
    nfe: int = pydantic.Field(ge=1)
    afs: bool
    guidance: float
    grids: list[RankedGrid] = pydantic.Field(min_length=2)

    @pydantic.model_validator(mode="after")
    def _check_grids(self) -> RankingEntry:
        methods = [grid.method for grid in self.grids]
        if len(set(methods)) != len(methods):
            raise ValueError(f"grids name a method twice: {methods}")
        if [grid.rmse for grid in self.grids] != sorted(grid.rmse for grid in self.grids):
            raise ValueError("grids must be ordered by rmse, lowest first")
        return self


class GridRanking(pydantic.BaseModel):
    """The ranking file of one model's folder: which method's grid is better, key by key."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    artifact: Literal["learned_grid_ranking"] = "learned_grid_ranking"
    version: int = GRID_VERSION
    model: str
    model_fingerprint: str
    protocol: dict[str, Any]
    """How the grids were scored: teacher, noise seeds (disjoint from training and benchmarks)."""
    entries: list[RankingEntry]
    provenance: dict[str, Any] = pydantic.Field(default_factory=dict)

    def key(self, entry: RankingEntry) -> GridKey:
        """The key `entry` is filed under: its grids' key, naming no method."""
        return grid_key(
            model_fingerprint=self.model_fingerprint,
            solver=entry.solver,
            solver_params=entry.solver_params,
            method=ANY_METHOD,
            nfe=entry.nfe,
            afs=entry.afs,
            guidance=entry.guidance,
        )


def is_ranking_file(path: Path) -> bool:
    """Whether the file at `path` is a folder's grid ranking (by its name: the store reads it)."""
    return path.name == RANKING_FILE


def read_ranking(path: Path) -> GridRanking:
    """The validated ranking at `path`.

    Raises:
        GridLoadError: unreadable, not JSON, or not a valid ranking; the message names the file.
    """
    return _read(GridRanking, path, "learned-grid ranking")


Artifact = TypeVar("Artifact", GridCard, GridRanking)


def _read(kind: type[Artifact], path: Path, what: str) -> Artifact:
    try:
        return kind.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, pydantic.ValidationError) as error:
        text = str(error).strip().splitlines()
        detail = "; ".join(line.strip() for line in text[1:3]) if len(text) > 1 else (text[0] if text else "")
        raise GridLoadError(f"{path}: not a valid {what} ({detail})") from None


def save_grid(card: GridCard, path: Path) -> Path:
    return _write(card, path)


def save_ranking(ranking: GridRanking, path: Path) -> Path:
    return _write(ranking, path)


def _write(artifact: GridCard | GridRanking, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(artifact.model_dump_json(indent=1) + "\n", encoding="utf-8")
    return path


def train_schedule_command(key: GridKey, model: str) -> str:
    """The command that trains the grid `key` describes."""
    params = json.loads(key.solver_params)
    parts = ["sampler-amed", "train-schedule", "--method", key.method, "--model", model, "--solver", key.solver]
    if params not in ({},):
        parts += ["--solver-params", f"'{key.solver_params}'"]
    parts += ["--nfe", str(key.nfe), "--guidance", f"{key.guidance:g}", "--afs" if key.afs else "--no-afs"]
    return " ".join(parts)


__all__ = [
    "ANY_METHOD",
    "ARTIFACT",
    "GRID_FILE_PREFIX",
    "GRID_SELECTION_SEED_BASE",
    "GRID_TRAINING_SEED_BASE",
    "RANKING_ARTIFACT",
    "RANKING_FILE",
    "UNRANKED_METHOD",
    "GridCard",
    "GridKey",
    "GridLoadError",
    "GridRanking",
    "RankedGrid",
    "RankingEntry",
    "grid_key",
    "is_grid_file",
    "is_ranking_file",
    "read_grid",
    "read_ranking",
    "save_grid",
    "save_ranking",
    "train_schedule_command",
]
