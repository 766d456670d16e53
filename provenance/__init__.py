"""Run metadata stored beside every committed result, and the writers of result files.

`collect()` answers "where did these numbers come from": the exact command line, the git
revision and whether the tree was dirty, a UTC timestamp, the device (CPU model and cores, CUDA
device if any) and the versions of Python and the numeric libraries. Results are written as CSV
(a header row, then one row per record) and as JSON {"meta": ..., "rows": [...]}.

A top-level package of its own: the bench, the training scripts in models/ and the speed benchmarks
all record runs with it, and it depends on none of our packages (nor they on it at run time: the
service never imports it). Only the standard library at import time; torch is imported inside
`collect()` for the device.
"""

from __future__ import annotations

import csv
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]

# Distribution names whose versions go into every result (those installed).
LIBRARIES = ("torch", "numpy", "scipy", "diffusers", "pydantic", "pytest-benchmark")

# Thread-pool variables that change timings (DEIS's per-run quadrature runs 3x slower beside
# torch's threads when OpenBLAS has its own pool); recorded when set, never used as configuration.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")

# More `git status` lines than this are summarised by their counts.
_MAX_STATUS_LINES = 50


def collect(options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metadata of the current run.

    Args:
        options: the parsed command options (argparse's namespace as a dict), recorded as given.
    Returns:
        a JSON-ready dict: command, argv, cwd, options, git, timestamp_utc, device, versions.
    """
    argv = list(getattr(sys, "orig_argv", sys.argv))  # orig_argv keeps "python -m bench ..."
    return {
        "command": shlex.join(argv),
        "argv": argv,
        "cwd": os.getcwd(),
        "options": _jsonable(dict(options)) if options is not None else None,
        "git": git_state(REPO_ROOT),
        "timestamp_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_info(),
        "versions": versions(),
    }


def git_state(root: Path) -> dict[str, Any] | None:
    """Revision and branch of the work tree at `root`, and whether it differs from the revision:
    `dirty` counts untracked files too (new code that is not committed changes results as much
    as edited code does; ignored files do not count), except result files (.csv, .json, .png under
    a folder named `results`), new or rewritten: those are other runs' outputs, or this run's own
    from before, and change no number. They are still listed in `status`. None where git is
    unavailable."""
    revision = _git(root, "rev-parse", "HEAD")
    if revision is None:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=all") or ""
    lines = [line for line in status.splitlines() if line]
    outputs = [line for line in lines if _is_output(line)]
    return {
        "revision": revision,
        "branch": _git(root, "rev-parse", "--abbrev-ref", "HEAD"),
        "dirty": len(outputs) < len(lines),
        "changed_count": sum(not line.startswith("??") for line in lines),
        "untracked_count": sum(line.startswith("??") for line in lines),
        "output_count": len(outputs),
        "status": lines[:_MAX_STATUS_LINES],  # git status --porcelain: "XY path"
    }


def _is_output(status_line: str) -> bool:
    """A result file (.csv, .json, .png under a folder named `results`), new or rewritten."""
    path = PurePosixPath(status_line[3:].split(" -> ")[-1].strip('"'))
    return "results" in path.parts[:-1] and path.suffix in {".csv", ".json", ".png"}


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def device_info() -> dict[str, Any]:
    """CPU model, core counts, torch threads, OS; CUDA device names where CUDA is available."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "thread_variables": {name: os.environ[name] for name in THREAD_VARIABLES if name in os.environ},
    }
    try:
        import torch
    except ImportError:
        return info
    info["torch_threads"] = torch.get_num_threads()
    info["cuda_version"] = torch.version.cuda
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        info["cuda_devices"] = []
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions() -> dict[str, str]:
    """Python and the installed versions of LIBRARIES (read from package metadata, so that
    recording them does not import diffusers)."""
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def shown_path(path: Path) -> str:
    """`path` relative to the working directory (the repository root in the committed commands)
    where it lies below it, else as it is: how a results row names a file it used."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write `rows` with a header. None is an empty cell, booleans are true/false, floats keep
    their shortest exact form. `columns` fixes the order (default: the first row's keys)."""
    if columns is None:
        columns = list(rows[0]) if rows else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(column)) for column in columns])
    return path


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_json(path: Path, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], **tables: Any) -> Path:
    """Write {"meta": meta, "rows": rows, **tables} (NaN becomes null), pretty-printed."""
    document = {"meta": meta, "rows": list(rows), **tables}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(_jsonable(document), handle, indent=1, allow_nan=False)
        handle.write("\n")
    return path


def _jsonable(value: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, tuples -> lists, Paths -> str."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)
