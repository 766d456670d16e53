"""Run metadata: git state of a real repository made here."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root, check=True, capture_output=True
    )


def test_dirty_counts_code_but_not_result_outputs(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    _git(tmp_path, "add", "code.py")
    _git(tmp_path, "commit", "-q", "-m", "first")

    state = provenance.git_state(tmp_path)
    assert state is not None
    assert not state["dirty"]
    assert len(state["revision"]) == 40

    results = tmp_path / "bench" / "results" / "run"
    results.mkdir(parents=True)
    for name in ("rows.csv", "rows.json", "plot.png"):
        (results / name).write_text("1\n")
    state = provenance.git_state(tmp_path)
    assert state is not None
    assert not state["dirty"], state
    assert state["output_count"] == 3
    assert len(state["status"]) == 3

    (results / "helper.py").write_text("y = 2\n")  # code, even under results/
    state = provenance.git_state(tmp_path)
    assert state is not None
    assert state["dirty"]
    assert state["untracked_count"] == 4
    (results / "helper.py").unlink()

    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "results")
    (results / "rows.csv").write_text("2\n")  # a result rewritten by a later run
    state = provenance.git_state(tmp_path)
    assert state is not None
    assert not state["dirty"]
    assert state["changed_count"] == 1

    (tmp_path / "code.py").write_text("x = 2\n")
    state = provenance.git_state(tmp_path)
    assert state is not None
    assert state["dirty"]
    assert state["changed_count"] == 2
