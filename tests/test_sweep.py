"""The quality-versus-NFE sweep end to end on the shipped model (tiny: two solvers, two NFE values,
256 samples, a 16-step reference), its cache (resume recomputes nothing; a new solver computes only
its rows), and the in-domain Frechet distance on real MNIST features."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import torch

from bench.__main__ import main as bench_main
from bench.frechet import FeatureStats, frechet_distance
from bench.mnist_quality import MnistScorer
from bench.sweep import COLUMNS, SweepConfig, balanced_labels, run_sweep
from models.mnist.classifier import load_classifier

TINY = {
    "model": "mnist",
    "nfe": [4, 5],
    "num_samples": 256,
    "reference_steps": 16,
    "reference_check": 32,
    "bootstrap": 20,
    "device": "cpu",
    "batch_size": 256,
}


@pytest.fixture(scope="module")
def scorer() -> MnistScorer:
    return MnistScorer(load_classifier())


def test_tiny_sweep_resumes_and_extends(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    rows = run_sweep(SweepConfig(solvers=["euler", "dpmpp_2m"], **TINY), tmp_path / "run", cache)
    assert [(r["solver"], r["nfe"], r["cached"]) for r in rows] == [
        ("euler", 4, False),
        ("euler", 5, False),
        ("dpmpp_2m", 4, False),
        ("dpmpp_2m", 5, False),
    ]
    for row in rows:
        assert row["reachable"]
        assert row["steps"] == row["nfe"]
        assert row["network_evals"] == row["nfe"]  # guidance 1: one evaluation per call
        assert row["fd_indomain"] > row["fd_indomain_floor"] > 0
        assert row["fd_ci_low"] <= row["fd_ci_high"]
        assert 0.0 < row["rmse_ref"] < 2.0
        assert 0.0 <= row["class_acc"] <= 1.0
    assert (tmp_path / "run" / "fd-vs-nfe.png").stat().st_size > 1000
    with open(tmp_path / "run" / "results.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        assert len(list(reader)) == 4
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]
    # a 16-step reference is only 8x below the errors here; the 128-step default is far below
    assert 0 < meta["reference_check_rmse"] < min(r["rmse_ref"] for r in rows) / 5

    again = run_sweep(SweepConfig(solvers=["euler", "dpmpp_2m"], **TINY), tmp_path / "run", cache)
    assert all(r["cached"] for r in again)
    assert [r["fd_indomain"] for r in again] == [r["fd_indomain"] for r in rows]

    extended = run_sweep(SweepConfig(solvers=["euler", "dpmpp_2m", "heun"], **TINY), tmp_path / "run", cache)
    assert [(r["solver"], r["cached"]) for r in extended] == [
        ("euler", True),
        ("euler", True),
        ("dpmpp_2m", True),
        ("dpmpp_2m", True),
        ("heun", False),
        ("heun", False),
    ]
    heun_five = next(r for r in extended if r["solver"] == "heun" and r["nfe"] == 5)
    assert heun_five["reachable"] is False  # heun spends 2 per step: 5 is never rounded to 4 or 6
    assert heun_five["steps"] is None


def test_cli_rejects_unknown_solver(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["fd-vs-nfe", "--solvers", "rk4", "--out", str(tmp_path)]) == 2
    assert "unknown solver 'rk4'" in capsys.readouterr().err


def test_balanced_seeded_labels() -> None:
    labels = balanced_labels(1000, 10, seed=3)
    assert torch.bincount(labels).tolist() == [100] * 10
    assert torch.equal(labels, balanced_labels(1000, 10, seed=3))
    assert not torch.equal(labels, balanced_labels(1000, 10, seed=4))


def test_frechet_distance_on_mnist_features(scorer: MnistScorer) -> None:
    features = scorer.test_features
    halves = frechet_distance(FeatureStats.of(features[:5000]), FeatureStats.of(features[5000:]))
    itself = frechet_distance(scorer.test_stats, scorer.test_stats)
    noise = scorer.features(torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    noisy = frechet_distance(FeatureStats.of(noise), scorer.test_stats)
    assert itself == pytest.approx(0.0, abs=1e-6)
    assert halves < 0.05 * noisy
    assert halves > 0


def test_fewer_samples_than_dimensions_warns_not_nan(tmp_path: Path) -> None:
    config = SweepConfig(solvers=["euler"], **{**TINY, "nfe": [3], "num_samples": 64, "reference_check": 8})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (row,) = run_sweep(config, tmp_path / "small")
    assert any("feature dimensions" in str(w.message) for w in caught)
    assert row["fd_indomain"] == row["fd_indomain"]  # not NaN
