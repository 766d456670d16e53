"""torch's thread pools for the server: how many threads fit this host, applied once at start-up.

torch's default intra-op pool has one thread per core it sees, and its OpenMP workers spin at each
parallel region's barrier. A small model's forward is thousands of tiny regions, so when another
process holds a core (a shared host, a container's CPU quota below its visible cores) every region
waits a scheduler slice for the descheduled worker: a 20-step sample took 16 s with torch's
default threads on a busy 2-core host and 0.5 s with one thread. The default here counts the CPUs
this process may really use (its affinity mask and its cgroup quota), leaves half of them to the
event loop, the request threads and the neighbours, and caps the pool at 8 (little of a small
batch's forward parallelises further).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("sampler_service.threads")

MAX_DEFAULT_THREADS = 8
CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`),
    or None without a quota (or a readable cgroup)."""
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, lowered to the cgroup quota (rounded up), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def default_intra_op(cpus: int) -> int:
    """Half the usable CPUs, 1..MAX_DEFAULT_THREADS."""
    return max(1, min(MAX_DEFAULT_THREADS, cpus // 2))


@dataclass(frozen=True)
class Applied:
    intra_op: int
    inter_op: int
    cpus: int


def apply_threads(intra_op: int | None, inter_op: int | None, root: Path = CGROUP_ROOT) -> Applied:
    """Set torch's intra-op and inter-op pools and return what is in force. Unset intra-op: the
    host's default, never above what torch chose itself (so OMP_NUM_THREADS=1 stays 1); unset
    inter-op: 1 (one forward at a time per model; nothing of ours forks torch work).

    The inter-op pool can only be sized before torch first uses it; in a process that already
    has (a test, an embedding application), it keeps its size and a warning says so.
    """
    cpus = available_cpus(root)
    intra = intra_op if intra_op is not None else min(torch.get_num_threads(), default_intra_op(cpus))
    inter = inter_op if inter_op is not None else 1
    torch.set_num_threads(intra)
    if torch.get_num_interop_threads() != inter:
        try:
            torch.set_num_interop_threads(inter)
        except RuntimeError:
            log.warning(
                "torch's inter-op pool is already running with %d threads; threads.inter_op=%d applies only at "
                "process start",
                torch.get_num_interop_threads(),
                inter,
            )
    return Applied(torch.get_num_threads(), torch.get_num_interop_threads(), cpus)


__all__ = ["Applied", "apply_threads", "available_cpus", "cgroup_cpu_quota", "default_intra_op"]
