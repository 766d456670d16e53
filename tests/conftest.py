"""Shared fixtures: the exact Gaussian-mixture model and the registered solvers."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator
from pathlib import Path

# No network at test time: hub ids must resolve from the local cache only. Set before anything
# imports huggingface_hub, which reads it once.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

import solvers
from models.analytic import GaussianMixtureDenoiser

# The tests run tiny tensors: one intra-op thread is as fast and does not collapse when the
# 2-core CI machine is busy (a cross-check file went from 3.5 s to 182 s under contention).
torch.set_num_threads(1)

TRAINING_FREE = [spec.name for spec in solvers.list_solvers() if not spec.needs_predictor]

REPOSITORY = Path(__file__).resolve().parents[1]


def committed_rows() -> Iterator[dict[str, str]]:
    """Every row of every committed bench/results/*/results.csv, with its folder's name as `file`."""
    for path in sorted((REPOSITORY / "bench" / "results").glob("*/results.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                yield {**row, "file": path.parent.name}


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A test that runs a command's main() in-process (sampler-service, bench) gets the JSON log
    handler on pytest's captured stderr, which is closed after the test: put the root logger back so
    later tests do not log into a closed file."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    logging.captureWarnings(False)
    root.handlers[:], root.level = saved[0], saved[1]


@pytest.fixture(scope="session")
def gmm() -> GaussianMixtureDenoiser:
    """A smooth 8-dimensional mixture on sigma in [0.002, 80] (samples of shape (B, 2, 2, 2))."""
    return GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)


@pytest.fixture(scope="session")
def gmm_small() -> GaussianMixtureDenoiser:
    """A 4-dimensional mixture, cheap enough for the step-by-step counting tests."""
    return GaussianMixtureDenoiser.smooth(dim=4, components=2, seed=1)


@pytest.fixture(scope="session")
def tiny_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight StableDiffusionPipeline ("sd") and StableDiffusionXLPipeline ("sdxl")
    folders, saved once per session with save_pretrained; copy one before damaging it."""
    from models.tiny_pipelines import TINY_KINDS, save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def flow_pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight StableDiffusion3Pipeline ("sd3", "sd3-no-t5") and FluxPipeline ("flux":
    guidance-distilled, "flux-cfg": true CFG) folders, saved once per session; copy one before
    damaging it."""
    from models.tiny_pipelines import FLOW_KINDS, save_tiny_pipeline

    root = tmp_path_factory.mktemp("flow-pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind) for kind in FLOW_KINDS}


@pytest.fixture
def report_docs(tmp_path):
    """A docs folder whose generated sections are empty, for `bench report --docs` on test results."""
    from bench import report

    folder = tmp_path / "docs"
    folder.mkdir()
    for section in (report.SWEEP, report.ABLATIONS):
        (folder / section.file).write_text(f"{section.start}\n{section.end}\n")
    return folder
