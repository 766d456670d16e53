"""The quality-versus-NFE sweep end to end on the shipped model (tiny: two solvers, two NFE values,
256 samples, a 16-step reference), its cache (resume recomputes nothing, an interrupted row only its
missing chunk; a new solver computes only its rows), two processes under `accelerate launch` equal to
one, FID without weights, `bench report`, and the in-domain Frechet distance on real MNIST features."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
import torch

import solvers
from bench import report
from bench.__main__ import main as bench_main
from bench.frechet import FeatureStats, frechet_distance
from bench.mnist_quality import MnistScorer, quantise
from bench.sweep import COLUMNS, SingleProcess, SweepConfig, balanced_labels, plan_row, prepare, run_sweep
from models.mnist.classifier import load_classifier

TINY = {
    "model": "mnist",
    "nfe": [4, 5],
    "num_samples": 256,
    "reference_steps": 16,
    "reference_check": 32,
    "bootstrap": 20,
    "device": "cpu",
    "batch_size": 128,  # two chunks
}


@pytest.fixture(scope="module")
def scorer() -> MnistScorer:
    return MnistScorer(load_classifier())


def _row_key(cache: Path, solver: str, nfe: int, params: dict[str, Any] | None = None) -> str:
    config = SweepConfig(solvers=[solver], solver_params={solver: params or {}}, **TINY)
    return plan_row(prepare(config, cache, SingleProcess()), solver, nfe).key


def test_tiny_sweep_resumes_and_extends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, report_docs: Path) -> None:
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
        assert math.isfinite(row["fd_indomain"])  # at N = 256 a good row can beat the floor
        assert row["fd_indomain"] > 0
        assert row["fd_indomain_floor"] > 0
        assert row["fd_ci_low"] <= row["fd_indomain"] <= row["fd_ci_high"]
        assert 0.0 < row["rmse_ref"] < 2.0
        assert 0.0 <= row["class_acc"] <= 1.0
        assert row["processes"] == 1
    for name in ("fd-vs-nfe.png", "samples-nfe4.png", "samples-nfe5.png"):
        assert (tmp_path / "run" / name).stat().st_size > 1000
    with open(tmp_path / "run" / "results.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == COLUMNS
        assert len(list(reader)) == 4
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]
    # a 16-step reference is only 8x below the errors here; the 128-step default is far below
    assert 0 < meta["reference_check_rmse"] < min(r["rmse_ref"] for r in rows) / 5
    # the reference's own scores: near the better rows' (at NFE 4-5 they are close to converged)
    low, high = meta["reference_fd_ci"]
    assert low <= meta["reference_fd_indomain"] <= high
    assert meta["reference_fd_indomain"] < max(r["fd_indomain"] for r in rows)
    assert meta["reference_class_acc"] > 0.9

    # FID asked for without weights: the column stays empty, the reason is recorded, the rest completes
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    with pytest.warns(UserWarning, match="pt_inception-2015-12-05"):
        again = run_sweep(SweepConfig(solvers=["euler", "dpmpp_2m"], fid=True, **TINY), tmp_path / "run", cache)
    assert all(r["cached"] for r in again)
    assert [r["fd_indomain"] for r in again] == [r["fd_indomain"] for r in rows]
    assert all(r["fid"] is None for r in again)
    assert "--fid-weights" in json.loads((tmp_path / "run" / "results.json").read_text())["meta"]["fid_note"]

    # an interrupted row: only its missing chunk is computed again, with the same result
    (chunk,) = cache.glob(f"row-{_row_key(cache, 'dpmpp_2m', 5)}-c1.safetensors")
    chunk.unlink()
    resumed = run_sweep(SweepConfig(solvers=["euler", "dpmpp_2m"], **TINY), tmp_path / "run", cache)
    assert [r["cached"] for r in resumed] == [True, True, True, False]
    assert resumed[3]["fd_indomain"] == pytest.approx(rows[3]["fd_indomain"], rel=1e-9)

    # the docs section regenerated from these results
    results = tmp_path / "results"
    (results / "fd-vs-nfe-tiny").mkdir(parents=True)
    (results / "fd-vs-nfe-tiny" / "results.json").write_text((tmp_path / "run" / "results.json").read_text())
    page = report_docs / report.SWEEP.file
    page.write_text(f"intro\n{report.SWEEP.start}\nold\n{report.SWEEP.end}\noutro\n")
    report_args = ["report", "--results", str(results), "--docs", str(report_docs)]
    assert bench_main([*report_args, "--check"]) == 1
    assert bench_main(report_args) == 0
    text = page.read_text()
    assert text.startswith("intro\n")
    assert text.endswith("outro\n")
    assert "old" not in text
    assert "| euler |" in text
    assert "| dpmpp_2m |" in text
    assert "**" in text
    assert bench_main([*report_args, "--check"]) == 0

    # rows with AFS get their own table and plot; the plain tables keep the plain rows
    with_afs = run_sweep(SweepConfig(solvers=["euler"], afs=True, **TINY), tmp_path / "run-afs", cache)
    assert [(r["nfe"], r["steps"], r["afs"]) for r in with_afs] == [(4, 5, True), (5, 6, True)]
    (results / "fd-vs-nfe-tiny-afs").mkdir()
    (results / "fd-vs-nfe-tiny-afs" / "results.json").write_text((tmp_path / "run-afs" / "results.json").read_text())
    assert bench_main([*report_args, "--check"]) == 1
    assert bench_main(report_args) == 0
    text = page.read_text()
    plain, afs_part = text.split("Other settings")
    assert "| euler |" in plain
    assert "| euler, polynomial, AFS |" in afs_part
    assert f"{rows[0]['fd_indomain']:.3g}" in plain
    assert f"{with_afs[0]['fd_indomain']:.3g}" in afs_part
    assert (results / "fd-vs-nfe-other.png").stat().st_size > 1000

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

    # Rows are keyed by the parameters the solver runs with: {} and the defaults spelled out are one
    # row, and a changed default (here lower_order_final) is a new row, never the old one's numbers.
    spec = solvers.SOLVERS.get("dpmpp_2m")
    spelled = spec.params().model_dump(mode="json")
    assert _row_key(cache, "dpmpp_2m", 5, spelled) == _row_key(cache, "dpmpp_2m", 5)
    changed = pydantic.create_model("ChangedDefault", __base__=spec.params, lower_order_final=(bool, False))
    monkeypatch.setitem(solvers.SOLVERS._entries, "dpmpp_2m", dataclasses.replace(spec, params=changed))
    assert _row_key(cache, "dpmpp_2m", 5) == _row_key(cache, "dpmpp_2m", 5, {"lower_order_final": False})
    assert _row_key(cache, "dpmpp_2m", 5) != _row_key(cache, "dpmpp_2m", 5, spelled)


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
    # Scoring must not change the features it computes statistics of (an in-place ReLU in the
    # classifier's head once did, and inflated every generated set's distance).
    blurred = torch.nn.functional.avg_pool2d(scorer.test_images[:1000], 3, stride=1, padding=1)
    direct = frechet_distance(FeatureStats.of(scorer.features(quantise(blurred))), scorer.test_stats)
    assert scorer.frechet_to_test(scorer.score(blurred)) == pytest.approx(direct, rel=1e-9)
    features = scorer.test_features[:10].clone()
    with torch.inference_mode():
        scorer.classifier.classify(features)
    assert torch.equal(features, scorer.test_features[:10])


def test_fewer_samples_than_dimensions_warns_not_nan(tmp_path: Path) -> None:
    config = SweepConfig(solvers=["euler"], **{**TINY, "nfe": [3], "num_samples": 64, "reference_check": 8})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (row,) = run_sweep(config, tmp_path / "small")
    assert any("feature dimensions" in str(w.message) for w in caught)
    assert row["fd_indomain"] == row["fd_indomain"]  # not NaN


def test_a_sweep_without_a_reference_scores_the_images_only(tmp_path: Path) -> None:
    """`reference_steps=0` (FD at a large N for the rows' own cost): no reference is computed or
    cached, `rmse_ref` stays empty, the image metrics are there; 1 step is refused by name."""
    config = SweepConfig(solvers=["euler"], **{**TINY, "nfe": [3], "num_samples": 160, "reference_steps": 0})
    (row,) = run_sweep(config, tmp_path / "out")
    assert (row["rmse_ref"], row["reference"]) == (None, "none")
    assert row["fd_indomain"] > 0
    assert row["fd_indomain_floor"] > 0
    assert row["class_acc"] > 0.5
    assert not list((tmp_path / "out" / "cache").glob("reference-*"))
    assert (tmp_path / "out" / "samples-nfe3.png").is_file()
    with pytest.raises(pydantic.ValidationError, match="reference_steps=1 is out of range: expected 0"):
        SweepConfig(solvers=["euler"], **{**TINY, "reference_steps": 1})


def test_two_processes_equal_one(tmp_path: Path) -> None:
    """`accelerate launch` with two CPU processes (chunks sharded, statistics gathered through the
    cache) gives the single-process numbers: batches are composed the same way."""
    args = ["--solvers", "dpmpp_2m", "--nfe", "4", "--num-samples", "160", "--batch-size", "80"]
    args += ["--reference-steps", "8", "--reference-check", "16", "--bootstrap", "10", "--device", "cpu", "--grid", "0"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    subprocess.run(
        [*launch, "-m", "bench", "fd-vs-nfe", *args, "--threads", "1", "--out", str(tmp_path / "two")],
        check=True,
        timeout=300,
    )
    assert bench_main(["fd-vs-nfe", *args, "--threads", "1", "--out", str(tmp_path / "one")]) == 0
    (two,) = json.loads((tmp_path / "two" / "results.json").read_text())["rows"]
    (one,) = json.loads((tmp_path / "one" / "results.json").read_text())["rows"]
    assert (one["processes"], two["processes"]) == (1, 2)
    for metric in ("fd_indomain", "fd_ci_low", "fd_ci_high", "rmse_ref", "class_acc"):
        assert two[metric] == pytest.approx(one[metric], rel=1e-6), metric
    assert two["nfe"] == one["nfe"] == 4


def test_fid_weights_are_checked_before_loading(tmp_path: Path) -> None:
    from bench import fid

    impostor = tmp_path / fid.WEIGHTS_NAME
    impostor.write_bytes(b"not the Inception weights")
    with pytest.raises(fid.FidWeightsRejected, match="SHA-256 .* does not start with 6726825d"):
        fid.load_verified_state(impostor)
    with pytest.raises(fid.FidUnavailable, match="no such file"):
        fid.locate_weights(tmp_path / "missing.pth")
    rejected = bench_main(
        ["fd-vs-nfe", "--solvers", "euler", "--fid", "--fid-weights", str(impostor), "--out", str(tmp_path)]
    )
    assert rejected == 2


def test_fid_statistics_files_need_no_pickle(tmp_path: Path) -> None:
    from bench import fid

    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(3), sigma=np.eye(3))
    stats = fid.load_stats(path)
    assert stats.mean.shape == (3,)
    assert stats.cov.shape == (3, 3)
    grey = fid.to_unit_rgb(torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3))
    assert grey.shape == (1, 3, 1, 3)
    assert grey[0, :, 0] == pytest.approx(torch.tensor([[0.0, 128 / 255, 1.0]] * 3))  # 8-bit levels, as served


def test_bootstrap_interval_covers_the_expected_distance() -> None:
    """Over repeated draws of N samples from one Gaussian, the 90% interval contains the mean
    Frechet distance at that N at least about 90% of the time, near the floor (where the plain
    percentile interval, pushed up by the repeats in each resample, covers it under 40% of the time
    and the corrected one is conservative) and well above it."""
    from bench.frechet import FeatureStats, frechet_distance
    from bench.sweep import bootstrap_interval

    rng = np.random.default_rng(0)
    dim, count, draws = 6, 300, 100
    reference = FeatureStats.of(rng.normal(size=(20_000, dim)))
    for shift in (0.05, 0.5):
        sets = [torch.from_numpy(rng.normal(size=(count, dim)) + shift) for _ in range(draws)]
        expected = float(np.mean([frechet_distance(FeatureStats.of(s.numpy()), reference) for s in sets]))
        intervals = [bootstrap_interval(s, reference, resamples=100) for s in sets]
        coverage = np.mean([low <= expected <= high for low, high in intervals])
        assert coverage >= 0.8, (shift, coverage)


def test_report_keeps_each_models_rows_in_its_own_tables() -> None:
    """Sweeps of two models in one tier (the committed `mnist` and `mnist-flow` runs) are reported in
    two blocks: `mnist`'s tables are the same with or without the other model's rows beside them."""
    root = Path(__file__).resolve().parents[1]
    rows, commands = report.load_rows(root / "bench" / "results")
    assert {"mnist", "mnist-flow"} <= {r["model"] for r in rows}

    def mnist_block(text: str) -> str:
        block = text.split("**Tier cpu**: model `mnist` (", 1)[1]
        return block.split("**Tier", 1)[0].split("![quality versus NFE]", 1)[0]

    args = (commands, root / "bench" / "results", root / "docs")
    both = report.render_sweep(rows, *args)
    alone = report.render_sweep([r for r in rows if r["model"] == "mnist"], *args)
    assert mnist_block(both) == mnist_block(alone)
    assert "**Tier cpu**: model `mnist-flow` (" in both


def test_report_keeps_rows_of_another_sample_count_or_reference_apart() -> None:
    """`mnist-flow` has rows at N = 250 (a 32-step reference) and at N = 1000 (the default one): one
    block each, headed by its own N, so no table mixes rows that are not comparable (AMED at NFE 3
    was measured in both: each block shows its own figure)."""
    root = Path(__file__).resolve().parents[1]
    rows, commands = report.load_rows(root / "bench" / "results")
    flow = [r for r in rows if r["model"] == "mnist-flow"]
    text = report.render_sweep(flow, commands, root / "bench" / "results", root / "docs")
    blocks = {
        int(block.split("N = ", 1)[1].split(" ", 1)[0]): block
        for block in text.split("**Tier cpu**: model `mnist-flow` (")[1:]
    }
    assert set(blocks) == {r["num_samples"] for r in flow} >= {250, 1000}
    amed3 = {r["num_samples"]: f"{r['fd_indomain']:.3g}" for r in flow if r["solver"] == "amed" and r["nfe"] == 3}
    assert amed3[250] != amed3[1000]
    for count, figure in amed3.items():
        cell = re.compile(rf"\| (\*\*)?{re.escape(figure)}(\*\*)? \|")
        assert cell.search(blocks[count])
        assert not cell.search(blocks[1000 if count == 250 else 250])
