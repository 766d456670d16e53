"""Fixtures of the speed benchmarks, and the run's provenance in pytest-benchmark's JSON report."""

from __future__ import annotations

from typing import Any

import pytest

import provenance
from bench.speed.allocator import pin_glibc_heap


@pytest.fixture(scope="session")
def allocator() -> str:
    """Pins the heap thresholds once per session (see allocator.py); the description goes into extra_info."""
    return pin_glibc_heap()


def pytest_benchmark_update_json(config: Any, benchmarks: Any, output_json: dict[str, Any]) -> None:
    output_json["provenance"] = provenance.collect()
