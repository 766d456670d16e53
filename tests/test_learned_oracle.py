"""The oracle bound of grid learning (`sampler-amed oracle-grid`): LD3 fitted to a benchmark's own
noises and reference."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import solvers
from bench.amed import fit_oracle_grid
from models.analytic import GaussianMixtureDenoiser, reference_solution
from solvers.learned.ld3 import LD3Settings, train_ld3
from solvers.learned.student import Student, Teacher, rmse

SHAPE = (8,)


def _noise(seeds):
    return solvers.make_noise(list(seeds), SHAPE, dtype=torch.float64)


def test_the_oracle_grid_beats_a_grid_learned_elsewhere_on_the_benchmark_it_fits():
    """On the exact mixture, with the exact solution of 200 benchmark noises as the reference: LD3
    trained on other noises (the shipped recipe) lowers the benchmark's error; the oracle, fitted to
    those 200 noises and started from that grid, lowers it clearly further, and its reported score
    is the benchmark's own (re-sampled along the grid with solvers.sample). Fitted to the wrong
    targets (the reference shifted by one sample) it finds nothing, which is what this would catch."""
    model = GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)
    nfe, student = 4, Student.of("unipc", {}, afs=False)
    steps = student.steps_for(nfe)
    benchmark = list(range(200))
    noise = _noise(benchmark)
    exact = reference_solution(model, noise * model.sigma_max, model.sigma_max, model.sigma_min)[0]

    def make_batch(seeds):
        return model, _noise(seeds)

    def score(sigmas: torch.Tensor) -> float:
        images = solvers.sample(model, noise, solver="unipc", steps=steps, schedule="learned", grid=sigmas).images
        return rmse(images, exact)

    elsewhere = train_ld3(
        student,
        nfe,
        make_batch,
        settings=LD3Settings(trajectories=50, epochs=4, teacher=Teacher(steps=64)),
        training_seeds=range(2**41, 2**41 + 50),
        selection_seeds=range(2**42, 2**42 + 64),
    ).sigmas
    polynomial = solvers.build_sigmas("polynomial", steps, sigma_min=model.sigma_min, sigma_max=model.sigma_max)
    settings = LD3Settings(batch_size=25, epochs=3, fd_scheme="forward")
    oracle = fit_oracle_grid(student, nfe, make_batch, benchmark, exact, elsewhere, settings)
    assert oracle.held_out_rmse[oracle.best_epoch] == pytest.approx(score(oracle.sigmas), rel=1e-9)
    assert oracle.held_out_rmse[0] == pytest.approx(score(elsewhere), rel=1e-9)
    assert score(elsewhere) < 0.8 * score(polynomial), (score(elsewhere), score(polynomial))
    assert score(oracle.sigmas) < 0.9 * score(elsewhere), (score(oracle.sigmas), score(elsewhere))

    wrong = fit_oracle_grid(student, nfe, make_batch, benchmark, exact.roll(1, 0), elsewhere, settings)
    assert score(wrong.sigmas) > 0.97 * score(elsewhere)


@pytest.mark.slow
def test_oracle_grid_scores_as_the_sweep_and_never_computes_its_reference(tmp_path: Path, capsys):
    """On `mnist`: a tiny sweep row on the shipped DEIS LD3 grid, then `oracle-grid` on that sweep's
    cache: its starting score is the row's rmse_ref (same seeds, labels, chunks and reference), the
    oracle's is no worse; on a cache without the reference it stops, naming the missing file, and
    computes nothing."""
    from bench.__main__ import main as bench_main
    from bench.amed import main as amed_main

    cache = tmp_path / "cache"
    sweep = ["fd-vs-nfe", "--solvers", "deis", "--nfe", "5", "--afs", "--schedule", "learned"]
    sweep += ["--schedule-params", '{"method": "ld3"}', "--num-samples", "6", "--batch-size", "4"]
    sweep += ["--reference-steps", "6", "--reference-check", "2", "--bootstrap", "0", "--device", "cpu"]
    sweep += ["--grid", "0", "--cache", str(cache), "--out", str(tmp_path / "sweep")]
    with pytest.warns(UserWarning, match="feature dimensions"):
        assert bench_main(sweep) == 0
    (row,) = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    before = sorted(cache.iterdir())

    oracle = ["oracle-grid", "--solvers", "deis", "--nfe", "5", "--afs", "--num-samples", "6", "--chunk", "4"]
    oracle += ["--reference-steps", "6", "--init", "shipped", "--batch-size", "3", "--device", "cpu"]
    oracle += ["--threads", "1", "--out", str(tmp_path / "oracle")]
    assert amed_main([*oracle, "--sweep-cache", str(cache)]) == 0
    (result,) = csv.DictReader((tmp_path / "oracle" / "results.csv").open())
    assert float(result["init_rmse"]) == pytest.approx(row["rmse_ref"], rel=1e-6)
    assert float(result["oracle_rmse"]) <= float(result["init_rmse"]) * (1 + 1e-6)
    assert result["init"] == "shipped"
    assert len(result["sigmas"].split()) == 7
    assert sorted(cache.iterdir()) == before  # read, not written

    # the direct search: the same start and score; its objective is the first 4 noises' error
    search = [*oracle, "--optimizer", "nelder-mead", "--search-samples", "4", "--max-evals", "4"]
    assert amed_main([*search, "--sweep-cache", str(cache), "--out", str(tmp_path / "search")]) == 0
    (found,) = csv.DictReader((tmp_path / "search" / "results.csv").open())
    assert float(found["init_rmse"]) == pytest.approx(row["rmse_ref"], rel=1e-6)
    assert float(found["search_rmse"]) <= float(found["search_init_rmse"])
    assert int(found["evaluations"]) <= 4
    assert found["optimizer"] == "nelder-mead"
    assert sorted(cache.iterdir()) == before
    assert amed_main([*search, "--search-samples", "7", "--sweep-cache", str(cache)]) == 2
    assert "--search-samples=7 is out of range: expected 0..6" in capsys.readouterr().err

    capsys.readouterr()
    assert amed_main([*oracle, "--reference-steps", "7", "--sweep-cache", str(cache)]) == 2
    error = capsys.readouterr().err
    assert "no reference chunk 0" in error
    assert str(cache) in error
    assert sorted(cache.iterdir()) == before
