"""`python -m bench accuracy` end to end on a small mixture: files written, orders as declared."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from bench.__main__ import main
from bench.sweep import COLUMNS


def test_accuracy_command_writes_tables(tmp_path, capsys):
    assert main(["accuracy", "--out", str(tmp_path), "--dim", "4", "--batch", "8"]) == 0
    printed = capsys.readouterr().out
    assert "dpmpp_3m" in printed
    with open(tmp_path / "accuracy-gmm.csv") as handle:
        rows = list(csv.DictReader(handle))
    heun_odd = [r for r in rows if r["solver"] == "heun" and r["variant"] == "heun" and r["nfe"] == "5"]
    assert heun_odd
    assert heun_odd[0]["reachable"] == "false"
    assert heun_odd[0]["rmse"] == ""
    reachable = [r for r in rows if r["reachable"] == "true"]
    assert all(float(r["rmse"]) > 0 for r in reachable)
    with open(tmp_path / "accuracy-gmm-order.csv") as handle:
        orders = {r["variant"]: r for r in csv.DictReader(handle)}
    for name in ("euler", "heun", "dpmpp_3m", "unipc", "deis"):
        row = orders[name]
        assert float(row["order_exact_start"]) == pytest.approx(float(row["declared_order"]), abs=0.3)
    with open(tmp_path / "accuracy-gmm-schema.csv") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames or ()) == COLUMNS  # the sweep's shared schema
        shared = list(reader)
    assert [(r["solver"], r["nfe"], r["rmse_ref"]) for r in shared] == [
        (r["variant"], r["nfe"], r["rmse"]) for r in rows
    ]
    assert {r["tier"] for r in shared} == {"analytic"}
    meta = json.loads((tmp_path / "accuracy-gmm.json").read_text())["meta"]
    assert "git" in json.dumps(meta)
    assert "torch" in json.dumps(meta)


def test_bad_option_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as err:
        main(["accuracy", "--dim", "0"])
    assert err.value.code == 2
    assert "--dim" in capsys.readouterr().err


def test_batch_invariance_in_float64(tmp_path):
    """A seed sampled alone and inside a batch is the same image up to float64 rounding."""
    args = ["batch-invariance", "--dtypes", "float64", "--seeds", "4", "--batch", "2", "--steps", "3"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "batch-invariance.json").read_text())["rows"]
    assert row["seeds"] == 4
    assert row["max_abs_diff"] < 1e-9
    assert row["share_pixels_over_one_level"] == 0.0


def test_reference_trajectory_passes_through_the_exact_states():
    """step-error's reference (Heun, substeps per solver interval) agrees with a DOP853 solve at every
    sigma of a coarse grid on the analytic mixture."""
    import solvers
    from bench.step_error import reference_through
    from models.analytic import GaussianMixtureDenoiser, reference_solution

    model = GaussianMixtureDenoiser.smooth(dim=8)
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = solvers.build_sigmas("polynomial", 5, sigma_min=0.02, sigma_max=80.0)
    exact = torch.stack(reference_solution(model, noise * 80.0, 80.0, grid[1:].tolist()))
    coarse, fine = (reference_through(model, noise, grid, substeps=k) for k in (8, 32))
    assert fine.sigmas == pytest.approx(grid[1:].tolist(), rel=1e-12)
    assert (fine.states - exact).abs().max() < 1.5e-3
    # second order: 4x the substeps, about 16x closer
    assert (coarse.states - exact).abs().max() > 10 * (fine.states - exact).abs().max()


def test_step_error_command_on_mnist(tmp_path, capsys, report_docs):
    args = ["step-error", "--solvers", "euler,dpmpp_2m,heun", "--nfe", "3,6", "--num-samples", "4"]
    assert main([*args, "--substeps", "8", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "warning" not in printed  # the reference is 10x below every run's errors
    assert "heun cannot spend exactly NFE 3" in printed  # listed, never rounded
    with open(tmp_path / "step-error.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert not [r for r in rows if r["solver"] == "heun" and r["nfe"] == "3"]
    for solver, nfe, steps in (("euler", 3, 3), ("euler", 6, 6), ("dpmpp_2m", 6, 6), ("heun", 6, 3)):
        line = [r for r in rows if r["solver"] == solver and int(r["nfe"]) == nfe]
        assert [int(r["step"]) for r in line] == list(range(1, steps + 1))
        assert all(int(r["steps"]) == steps for r in line)
        sigmas = [float(r["sigma"]) for r in line]
        assert sigmas == sorted(sigmas, reverse=True)
        assert all(float(r["rmse"]) > 0 for r in line)

    def final(solver: str, nfe: int) -> float:
        return float([r for r in rows if r["solver"] == solver and int(r["nfe"]) == nfe][-1]["rmse"])

    assert final("euler", 6) < final("euler", 3)  # more steps, closer to the exact solution
    assert final("dpmpp_2m", 6) < final("euler", 6)
    assert (tmp_path / "step-error.png").stat().st_size > 1000
    meta = json.loads((tmp_path / "step-error.json").read_text())["meta"]
    assert 0 < meta["reference_check_rmse"] < final("dpmpp_2m", 6) / 10
    assert all(0 < float(r["reference_check_rmse"]) <= meta["reference_check_rmse"] for r in rows)

    # `bench report` redraws the plot from the JSON (without sweep rows there are no tables to link it from)
    results = tmp_path / "results"
    (results / "step-error-small").mkdir(parents=True)
    (results / "step-error-small" / "step-error.json").write_text((tmp_path / "step-error.json").read_text())
    assert main(["report", "--results", str(results), "--docs", str(report_docs)]) == 0
    assert (results / "step-error-small" / "step-error.png").stat().st_size > 1000
    assert "No sweep results" in (report_docs / "benchmarks.md").read_text()
    assert "No AMED ablation results" in (report_docs / "amed.md").read_text()


def test_serve_load_command_small_run(tmp_path, capsys):
    """serve-load starts a real server process, drives it with concurrent clients and writes its table."""
    args = ["serve-load", "--clients", "1", "3", "--requests", "2", "--steps", "2", "--repeats", "1"]
    assert main([*args, "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "SERVING" in capsys.readouterr().out
    with open(tmp_path / "serve-load.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["clients"], r["requests"]) for r in rows] == [("1", "2"), ("3", "6")]
    for row in rows:
        assert float(row["served_images_per_s"]) > 0
        assert float(row["latency_p99_s"]) >= float(row["latency_p50_s"]) > 0
        # the server's own timing is part of what the client waited for; an empty RPC is cheaper still
        assert float(row["server_sampling_p50_s"]) <= float(row["server_total_p50_s"]) < float(row["latency_p50_s"])
        assert 0 < float(row["rpc_floor_p50_s"]) < float(row["latency_p50_s"])
    assert float(rows[0]["mean_batch_rows"]) == 1.0  # a lone client is never batched with anyone
    assert rows[0]["latency_ratio"] != ""
    assert rows[1]["latency_ratio"] == ""
    meta = json.loads((tmp_path / "serve-load.json").read_text())["meta"]
    assert meta["seconds_to_serving"] > 0


@pytest.mark.slow
def test_serve_mixed_command_small_run(tmp_path):
    """serve-mixed starts one server per batching mode and gives both the same drawn requests."""
    args = ["serve-mixed", "--skip", "forward", "lone", "long", "--clients", "1", "--requests", "1", "--rounds", "1"]
    assert main([*args, "--max-batch-size", "16", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "serve-mixed.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["scenario"], r["mode"], r["clients"]) for r in rows] == [
        ("mixed", "step", "1"),
        ("mixed", "request", "1"),
    ]
    assert rows[0]["images"] == rows[1]["images"]  # the same load
    for row in rows:
        assert float(row["images_per_s"]) > 0
        assert 1 <= float(row["mean_rows_per_forward"]) <= 16
    assert float(rows[0]["ratio"]) > 0


def test_serve_mixed_tiny_sd_load_is_mnist_load_with_prompts(tmp_path):
    """serve-mixed --model tiny-sd: the same draws as mnist's with a prompt per label, a models
    config the servers load, and the forward-cost denoiser over prompt rows."""
    import models
    from bench import serve_mixed
    from models.config import read_models_config

    mnist = serve_mixed.mixed_requests(3, 1, 4)
    text = serve_mixed.mixed_requests(3, 1, 4, "tiny-sd")
    for a, b in zip(mnist, text, strict=True):
        assert b["prompt"] == [serve_mixed.PROMPTS[label % len(serve_mixed.PROMPTS)] for label in a.pop("labels")]
        assert {**a, "model": "tiny-sd"} == {k: v for k, v in b.items() if k != "prompt"}
    source, config = serve_mixed.model_source("tiny-sd", tmp_path)
    assert config is not None
    assert [entry.name for entry in read_models_config(config).models] == ["tiny-sd"]
    model = models.load(source, device="cpu")
    with torch.inference_mode():
        denoiser = serve_mixed._rows_denoiser(model, 3)
        out = denoiser(torch.randn(3, *model.sample_shape), torch.full((3,), 5.0))
    assert out.shape == (3, *model.sample_shape)
    assert serve_mixed.model_source("mnist", tmp_path) == ("mnist", None)


def test_docs_results_sections_are_current(monkeypatch):
    """The generated tables of docs/benchmarks.md and docs/amed.md are what `python -m bench report`
    makes of the committed bench/results."""
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the links and paths are relative to the root
    assert main(["report", "--check"]) == 0, "run `python -m bench report` and commit docs/"


@pytest.mark.slow
def test_serve_startup_times_a_real_server(tmp_path):
    assert main(["serve-startup", "--runs", "1", "--no-warmup", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "serve-startup.json").read_text())["rows"]
    assert 0 < row["reported_s"] < row["process_to_serving_s"]  # the server's clock starts after the interpreter


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
def test_t2i_speed_writes_its_rows(tmp_path, capsys, tiny_pipelines):
    argv = ["t2i-speed", "--model", str(tiny_pipelines["sd"]), "--rounds", "1", "--steps", "2", "--batch", "2"]
    assert main([*argv, "--width", "48", "--compare-diffusers", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "sampling / (NFE x forward)" in printed
    assert "ours / diffusers' pipeline loop" in printed
    with open(tmp_path / "t2i-speed.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert (row["pipeline"], row["latent_shape"], row["nfe"]) == ("StableDiffusionPipeline", "4x8x12", "2")
    for column in ("sampling_over_nfe_forwards", "text_encoding_ms", "vae_decoding_ms", "ours_over_diffusers_loop"):
        assert float(row[column]) > 0
    meta = json.loads((tmp_path / "t2i-speed.json").read_text())["meta"]
    assert meta["command"]
    assert main(["t2i-speed", "--model", "mnist", "--rounds", "1", "--out", str(tmp_path)]) == 2
    assert "expected a text-to-image pipeline" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", ["train", "train-schedule", "compare-schedules", "score-grids", "select", "select-grid", "list"]
)
def test_sampler_amed_help_renders(command, capsys):
    """argparse formats help with %: a stray % in a help string makes --help a traceback."""
    from bench.amed import main as amed_main

    with pytest.raises(SystemExit) as done:
        amed_main([command, "--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_afs_probe_on_the_flow_model(tmp_path, capsys):
    """At sigma_max = 999 the flow model's D is about the class-mean image (MNIST's mean pixel is
    -0.74 in [-1, 1]), which AFS's stand-in (about 0) misses by its whole RMS."""
    out = tmp_path / "probe"
    assert main(["afs-probe", "--models", "mnist-flow", "--nfe", "5", "--num-samples", "20", "--out", str(out)]) == 0
    (row,) = json.loads((out / "afs-probe.json").read_text())["rows"]
    assert row["sigma_0"] == pytest.approx(999.0, rel=1e-9)
    assert -0.85 < row["denoised_mean"] < -0.6
    assert row["afs_error_rms"] == pytest.approx(row["denoised_rms"], rel=1e-2)
    assert row["first_state_error_rms"] == pytest.approx((1 - row["sigma_1"] / 999.0) * row["afs_error_rms"], rel=1e-6)
    assert "mnist-flow NFE 5" in capsys.readouterr().out
