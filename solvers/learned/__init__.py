"""Learned time schedules: sigma grids trained for one model, solver, NFE, AFS and guidance.

- `grid`: the artifact (a validated JSON card holding the sigmas) and its key, and the ranking
  that picks between methods for a request naming none;
- `gits`: GITS (Chen et al., ICML 2024): dynamic programming over a fine grid on the local error
  of the given solver along a few teacher trajectories;
- `ld3`: LD3 (Tong et al., ICLR 2025): the sigmas trained against a teacher with the soft
  per-sample surrogate loss.

The `learned` schedule (schedules.py) steps along a grid the caller looked up in the store.
"""

from .grid import (
    ANY_METHOD,
    GRID_FILE_PREFIX,
    GRID_SELECTION_SEED_BASE,
    GRID_TRAINING_SEED_BASE,
    RANKING_FILE,
    UNRANKED_METHOD,
    GridCard,
    GridKey,
    GridLoadError,
    GridRanking,
    RankedGrid,
    RankingEntry,
    grid_key,
    read_grid,
    read_ranking,
    save_grid,
    save_ranking,
    train_schedule_command,
)

__all__ = [
    "ANY_METHOD",
    "GRID_FILE_PREFIX",
    "GRID_SELECTION_SEED_BASE",
    "GRID_TRAINING_SEED_BASE",
    "RANKING_FILE",
    "UNRANKED_METHOD",
    "GridCard",
    "GridKey",
    "GridLoadError",
    "GridRanking",
    "RankedGrid",
    "RankingEntry",
    "grid_key",
    "read_grid",
    "read_ranking",
    "save_grid",
    "save_ranking",
    "train_schedule_command",
]
