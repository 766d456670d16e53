"""The one error family of the benchmark harness; the CLI maps it (and the solver core's
SolverError) to a message and exit status 2 in one place."""

from __future__ import annotations


class BenchError(Exception):
    """Bad benchmark input: a missing or malformed results file, an option out of range."""
