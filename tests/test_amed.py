"""AMED: predictor bounds, the neutral predictor equal to DPM-Solver-2, data-free training on the
exact Gaussian mixture (a trained plugin beats its base at the same NFE), artifacts and their
lookup errors. The AMED solvers also run the shared solver suite (test_solvers_shared.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import shlex
from pathlib import Path

import pytest
import torch

import solvers
from models.analytic import GaussianMixtureDenoiser, reference_solution
from solvers import MissingPredictorError
from solvers.amed import (
    IntervalUpdate,
    PredictorCard,
    PredictorConfig,
    PredictorLoadError,
    PredictorStore,
    TrainingSettings,
    load_predictor,
    new_predictor,
    save_predictor,
    train_predictor,
)
from solvers.schedules import build_sigmas
from tests.conftest import REPOSITORY, committed_rows

SHAPE = (8,)


def _noise(seeds):
    return solvers.make_noise(list(seeds), SHAPE, dtype=torch.float64)


def _sigmas(model: GaussianMixtureDenoiser, steps: int) -> torch.Tensor:
    return build_sigmas(
        "polynomial", steps, sigma_min=model.sigma_min, sigma_max=model.sigma_max, sigma_levels=None, params={}
    )


@pytest.mark.parametrize("feature_shape", [(7, 7), None])
def test_predictor_outputs_stay_within_their_bounds(feature_shape):
    config = PredictorConfig(feature_shape=feature_shape, dc=0.01, da=0.2)
    predictor = new_predictor(config, seed=0)
    with torch.no_grad():
        for parameter in predictor.parameters():
            parameter.normal_(0.0, 30.0)  # saturate the heads
    feature = torch.randn(64, 7, 7) * 100 if feature_shape else None
    sigma_cur = torch.logspace(-2, 2, 64, dtype=torch.float64)
    out = predictor(feature, sigma_cur, sigma_cur * 0.3)
    assert bool(((out.r >= 0) & (out.r <= 1)).all())
    assert bool(((out.c >= 1 - 0.01) & (out.c <= 1 + 0.01)).all())
    assert bool(((out.a >= 1 - 0.2) & (out.a <= 1 + 0.2)).all())
    assert out.r.shape == out.c.shape == out.a.shape == (64,)
    table = new_predictor(PredictorConfig(), seed=0)
    assert sum(p.numel() for p in table.parameters()) < sum(p.numel() for p in new_predictor(config, 0).parameters())


@pytest.mark.parametrize("afs", [False, True])
def test_neutral_predictor_is_dpm_solver_2(gmm, afs):
    """A fresh predictor gives r = 1/2, c = a = 1: AMED-Solver is then DPM-Solver-2 (and so is the
    plugin on the dpm_solver_2 base)."""
    predictor = new_predictor(PredictorConfig(), seed=0).double()
    noise = solvers.make_noise(list(range(6)), (2, 2, 2), dtype=torch.float64)
    reference = solvers.sample(gmm, noise, solver="dpm_solver_2", steps=5, afs=afs)
    amed = solvers.sample(gmm, noise, solver="amed", steps=5, afs=afs, predictor=predictor)
    plugin = solvers.sample(
        gmm, noise, solver="amed_plugin", steps=5, afs=afs, predictor=predictor, solver_params={"base": "dpm_solver_2"}
    )
    assert amed.nfe == reference.nfe == 10 - afs
    torch.testing.assert_close(amed.images, reference.images, atol=1e-12, rtol=0)
    torch.testing.assert_close(plugin.images, reference.images, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    ("base", "max_order", "teacher", "substeps"),
    [
        ("ipndm", 4, "ipndm", 2),
        ("ipndm_v", 4, "ipndm_v", 2),
        ("euler", None, "euler", 2),
        ("dpm_solver_2", None, "heun", 1),
    ],
)
def test_trained_plugin_beats_its_base_on_the_exact_model(base, max_order, teacher, substeps):
    """Data-free training on the Gaussian mixture (table mode, NFE 5 with AFS): the plugin's error
    against the exact ODE solution falls below its base solver's at the same NFE.

    Not for the dpmpp_2m base: plain DPM-Solver++(2M) hits a lucky error cancellation at 6 steps
    here (RMSE 0.033, against 0.086 at 9 steps), while the plugin's 3 coarse intervals give 0.14
    even with a 24-step Heun teacher."""
    model = GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)
    steps = 3
    predictor = new_predictor(PredictorConfig(), seed=0).double()
    teacher_params = {"max_order": 4} if teacher.startswith("ipndm") else {}
    base_params = {"max_order": max_order} if base.startswith("ipndm") else {}
    summary = train_predictor(
        predictor,
        update=IntervalUpdate(base, max_order or 1),
        sigmas=_sigmas(model, steps),
        teacher_sigmas=_sigmas(model, (substeps + 1) * steps),
        afs=True,
        make_batch=lambda seeds: (model, _noise(seeds)),
        settings=TrainingSettings(
            trajectories=1000, batch_size=100, teacher=teacher, teacher_substeps=substeps, teacher_params=teacher_params
        ),
    )
    assert sum(summary.final_loss) < sum(summary.first_loss)
    test = _noise(range(10**7, 10**7 + 200))
    exact = reference_solution(model, test * model.sigma_max, model.sigma_max, model.sigma_min)[0]
    params = {"base": base} | ({"max_order": max_order} if max_order else {})
    plugin = solvers.sample(
        model, test, solver="amed_plugin", steps=steps, afs=True, solver_params=params, predictor=predictor
    )
    base_steps = solvers.SOLVERS.get(base).require_steps_for_nfe(5, True)
    plain = solvers.sample(model, test, solver=base, steps=base_steps, afs=True, solver_params=base_params)
    assert plugin.nfe == plain.nfe == 5

    def rmse(images):
        return float((images - exact).pow(2).mean().sqrt())

    assert rmse(plugin.images) < 0.9 * rmse(plain.images)


def test_trajectory_objective_trains_through_the_history():
    """The whole-trajectory objective (losses summed, gradients through the multistep history, one
    Adam step per batch) lowers the loss on the mixture; single-step students are refused."""
    model = GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)
    steps = 3

    def train(update: IntervalUpdate, trajectories: int):
        return train_predictor(
            new_predictor(PredictorConfig(), seed=0).double(),
            update=update,
            sigmas=_sigmas(model, steps),
            teacher_sigmas=_sigmas(model, 3 * steps),
            afs=True,
            make_batch=lambda seeds: (model, _noise(seeds)),
            settings=TrainingSettings(
                trajectories=trajectories, batch_size=50, teacher="ipndm", teacher_substeps=2, objective="trajectory"
            ),
        )

    summary = train(IntervalUpdate("ipndm", 2), 500)
    assert summary.batches == 10
    assert sum(summary.final_loss) < 0.9 * sum(summary.first_loss)
    with pytest.raises(ValueError, match="multistep"):
        train(IntervalUpdate("euler"), 50)


def _card(predictor_config: PredictorConfig, **overrides) -> PredictorCard:
    fields = {
        "model": "gmm",
        "model_fingerprint": "f" * 64,
        "solver": "amed_plugin",
        "base": "ipndm",
        "base_max_order": 4,
        "nfe": 5,
        "steps": 3,
        "schedule": "polynomial",
        "schedule_params": {"rho": 7.0},
        "sigma_min": 0.002,
        "sigma_max": 80.0,
        "afs": True,
        "guidance": 1.0,
        "config": predictor_config,
    }
    return PredictorCard(**{**fields, **overrides})


def test_artifact_roundtrip_and_lookup_errors(tmp_path: Path, gmm):
    config = PredictorConfig()
    predictor = new_predictor(config, seed=3)
    with torch.no_grad():
        predictor.head_r.bias.fill_(0.4)
    card = _card(config)
    save_predictor(predictor, card, tmp_path / "gmm-plugin-nfe5")
    store = PredictorStore([tmp_path])
    found = store.find(card.key(), "gmm")
    noise = solvers.make_noise(list(range(4)), (2, 2, 2), dtype=torch.float64)
    run = dict(solver="amed_plugin", steps=3, afs=True, solver_params={"base": "ipndm", "max_order": 4})
    torch.testing.assert_close(
        solvers.sample(gmm, noise, predictor=found.double(), **run).images,
        solvers.sample(gmm, noise, predictor=predictor.double(), **run).images,
    )
    for field, value in (
        ("model_fingerprint", "0" * 64),
        ("nfe", 7),
        ("schedule", "logsnr"),
        ("guidance", 2.0),
        ("afs", False),
    ):
        key = _card(config, **{field: value}).key()
        with pytest.raises(MissingPredictorError) as error:
            store.find(key, "gmm")
        text = str(error.value)
        assert "sampler-amed train --model gmm --solver amed_plugin --base ipndm" in error.value.train_command
        assert f"--nfe {key.nfe}" in error.value.train_command
        if field != "model_fingerprint":  # what exists for this model is listed
            assert error.value.available == [card.key().describe()]
        assert "no trained predictor" in text

    (tmp_path / "gmm-plugin-nfe5.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(PredictorLoadError, match="gmm-plugin-nfe5.safetensors"):
        PredictorStore([tmp_path]).find(card.key(), "gmm")
    (tmp_path / "broken.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(PredictorLoadError, match="broken.json"):
        load_predictor(tmp_path / "broken.json")
    assert any("broken.json" in problem for problem in PredictorStore([tmp_path]).problems)


@pytest.mark.parametrize(
    ("base", "plain", "params"),
    [
        ("euler", "euler", {}),
        ("ipndm", "ipndm", {"max_order": 4}),
        ("ipndm_v", "ipndm_v", {"max_order": 4}),
        ("ipndm_v", "ipndm_v", {"max_order": 3}),
        ("dpmpp_2m", "dpmpp_2m", {"max_order": 2}),
        ("dpmpp_2m", "dpmpp_3m", {"max_order": 3}),
    ],
)
@pytest.mark.parametrize("afs", [False, True])
def test_neutral_plugin_is_its_base_on_the_merged_grid(gmm, base, plain, params, afs):
    """With r = 1/2, c = a = 1 the plugin is its base solver run on {sigma_0, s_0, sigma_1, s_1, ...},
    s_i = sqrt(sigma_i sigma_{i+1}) (multistep bases keeping the intermediate points in their history)."""
    predictor = new_predictor(PredictorConfig(), seed=0).double()
    noise = solvers.make_noise(list(range(5)), (2, 2, 2), dtype=torch.float64)
    coarse = _sigmas(gmm, 4).tolist()
    merged = [v for a, b in itertools.pairwise(coarse) for v in (a, (a * b) ** 0.5)] + [coarse[-1]]
    plugin = solvers.sample(
        gmm, noise, solver="amed_plugin", steps=4, afs=afs, predictor=predictor, solver_params={"base": base, **params}
    )
    plain_params = {"lower_order_final": False} if "dpmpp" in plain else dict(params)
    reference = solvers.sample(
        gmm,
        noise,
        solver=plain,
        steps=8,
        afs=afs,
        schedule="custom",
        schedule_params={"sigmas": merged},
        solver_params=plain_params,
    )
    assert plugin.nfe == reference.nfe == 8 - afs
    torch.testing.assert_close(plugin.images, reference.images, atol=1e-10, rtol=0)


def test_train_command_writes_an_artifact_that_sampling_and_the_sweep_use(tmp_path: Path, capsys, report_docs: Path):
    """`sampler-amed train` on the shipped model (a tiny configuration) writes weights and a card;
    the store finds it by key, and a sweep row with amed_plugin uses it (and records its cost)."""
    from bench.__main__ import main as bench_main
    from bench.amed import main as amed_main

    out = tmp_path / "predictors"
    args = ["train", "--model", "mnist", "--solver", "amed_plugin", "--nfe", "3", "--trajectories", "8"]
    assert amed_main([*args, "--batch-size", "4", "--threads", "1", "--out", str(out), "--quiet"]) == 0
    (card_path,) = out.glob("*.json")
    card = PredictorCard.model_validate_json(card_path.read_text())
    assert (card.solver, card.base, card.nfe, card.steps, card.afs) == ("amed_plugin", "ipndm", 3, 2, True)
    assert card.config.feature_shape == (7, 7)  # the mnist U-Net's 7 x 7 bottleneck
    assert card.training["batches"] == 2
    assert len(card.training["final_loss_per_interval"]) == 2
    store = PredictorStore([out])
    assert store.has(card.key())

    sweep = ["fd-vs-nfe", "--solvers", "amed_plugin", "--nfe", "3", "--afs", "--num-samples", "16"]
    sweep += ["--batch-size", "16", "--reference-steps", "4", "--reference-check", "4", "--bootstrap", "0"]
    sweep += ["--device", "cpu", "--grid", "0", "--predictor-dir", str(out), "--out", str(tmp_path / "sweep")]
    with pytest.warns(UserWarning, match="feature dimensions"):
        assert bench_main(sweep) == 0
    (row,) = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert row["nfe"] == 3
    assert row["predictor"] == card.key().describe()
    assert row["predictor_trajectories"] == 8
    assert (
        row["predictor_sha256"]
        == hashlib.sha256(store.cards[card.key()].with_suffix(".safetensors").read_bytes()).hexdigest()
    )
    assert (row["solver"], row["base"]) == ("amed_plugin", "ipndm")
    assert row["rmse_ref"] > 0

    # the report puts the row among the other settings, with its predictor's training cost
    results = tmp_path / "results" / "fd-vs-nfe-amed"
    results.mkdir(parents=True)
    (results / "results.json").write_text((tmp_path / "sweep" / "results.json").read_text())
    assert bench_main(["report", "--results", str(results.parent), "--docs", str(report_docs)]) == 0
    text = (report_docs / "benchmarks.md").read_text()
    assert "| amed_plugin (ipndm, order 4), polynomial, AFS |" in text
    assert "| amed_plugin (ipndm, order 4), polynomial, AFS, NFE 3 | 8 |" in text

    capsys.readouterr()
    assert bench_main([*sweep[:4], "11", *sweep[5:]]) == 2  # no predictor for NFE 11 anywhere
    assert "sampler-amed train --model mnist --solver amed_plugin --base ipndm" in capsys.readouterr().err

    # training noises are never a benchmark's: a sweep refuses to score a predictor on its own
    assert card.training["first_noise_seed"] == 2**40
    assert bench_main([*sweep, "--seed-base", str(2**40 + 4)]) == 2
    assert "trained on noise seeds 1099511627776..1099511627783, which overlap" in capsys.readouterr().err


def test_train_command_refuses_the_trajectory_objective_for_single_step_students(tmp_path: Path, capsys):
    from bench.amed import main as amed_main

    args = ["train", "--model", "mnist", "--solver", "amed", "--nfe", "3", "--objective", "trajectory"]
    assert amed_main([*args, "--trajectories", "2", "--out", str(tmp_path)]) == 2
    assert "--objective trajectory: only for multistep students" in capsys.readouterr().err
    assert amed_main(["train", "--nfe", "3", "--trajectories", "-1", "--out", str(tmp_path)]) == 2
    assert "--trajectories -1: expected 0 (the untrained predictor) or more" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_ablation_command_trains_scores_and_reports_its_variants(tmp_path: Path, report_docs: Path):
    """`bench amed-ablation` (tiny): a trained variant and a training-free one become rows with the
    sweep's schema plus variant, question and final loss; the report renders them as a table."""
    from bench.__main__ import main as bench_main

    out = tmp_path / "results" / "amed-ablation-tiny"
    args = [
        "amed-ablation",
        "--variants",
        "plugin-v2,plugin-untrained,ipndm2",
        "--num-samples",
        "16",
        "--trajectories",
        "4",
    ]
    args += ["--batch-size", "16", "--reference-steps", "4", "--reference-check", "4", "--bootstrap", "0"]
    args += ["--device", "cpu", "--work", str(tmp_path / "work"), "--cache", str(tmp_path / "cache"), "--out", str(out)]
    with pytest.warns(UserWarning, match="feature dimensions"):
        assert bench_main(args) == 0
    trained, untrained, plain = json.loads((out / "results.json").read_text())["rows"]
    assert (trained["variant"], trained["solver"], trained["base"], trained["nfe"]) == (
        "plugin-v2",
        "amed_plugin",
        "ipndm_v",
        5,
    )
    assert trained["predictor_trajectories"] == 4
    assert trained["final_loss"] > 0
    assert "solver=amed_plugin base=ipndm_v max_order=2 nfe=5" in trained["predictor"]
    assert (untrained["predictor_trajectories"], untrained["final_loss"]) == (0, None)
    assert (plain["variant"], plain["solver"], plain["final_loss"]) == ("ipndm2", "ipndm", None)
    assert trained["rmse_ref"] > 0
    assert plain["rmse_ref"] > 0
    assert "plugin-v2" in (out / "results.csv").read_text()
    assert bench_main(["amed-ablation", "--variants", "nope", "--out", str(out)]) == 2

    (tmp_path / "results" / "fd-vs-nfe-tiny").mkdir()
    (tmp_path / "results" / "fd-vs-nfe-tiny" / "results.json").write_text((out / "results.json").read_text())
    assert bench_main(["report", "--results", str(tmp_path / "results"), "--docs", str(report_docs)]) == 0
    text = (report_docs / "amed.md").read_text()
    assert "| plugin-v2 | base: variable-step iPNDM order 2 | 5 |" in text
    assert "| ipndm2 | training-free: iPNDM order 2 | 5 |" in text


def test_random_heads_start_near_but_not_at_the_midpoint():
    """`init="random"` (the training default, as the official code initialises): r varies with the
    input around 1/2; the neutral start gives exactly 1/2; an unknown init is refused by name."""
    config = PredictorConfig(feature_shape=(7, 7))
    feature = torch.randn(32, 7, 7)
    sigma_cur = torch.logspace(-1, 2, 32, dtype=torch.float64)
    with torch.no_grad():
        neutral = new_predictor(config, seed=0)(feature, sigma_cur, sigma_cur * 0.5)
        random = new_predictor(config, seed=0, init="random")(feature, sigma_cur, sigma_cur * 0.5)
        other = new_predictor(config, seed=1, init="random")(feature, sigma_cur, sigma_cur * 0.5)
    assert bool((neutral.r == 0.5).all())
    assert bool((neutral.c == 1.0).all())
    assert float(random.r.std()) > 0.01
    assert bool(((random.r > 0.1) & (random.r < 0.9)).all())
    assert not torch.equal(random.r, other.r)  # a seed draws its own start
    with pytest.raises(ValueError, match="init='zero' is not one of: random, neutral"):
        new_predictor(config, seed=0, init="zero")


def test_train_command_keeps_the_best_seed_on_held_out_noise(tmp_path: Path, capsys):
    """`--seeds 0,1`: both are trained, scored against a teacher on held-out noises (2**43 + k), and
    the better one is written, the same weights a single-seed run of it gives; the card records
    every seed's score. `select` over seeds trained apart chooses the same. A repeated or malformed
    seed list is refused by argparse."""
    from safetensors.torch import load_file

    from bench.amed import main as amed_main

    args = ["train", "--model", "mnist", "--solver", "amed", "--nfe", "3", "--trajectories", "4", "--batch-size", "2"]
    args += ["--selection", "4", "--selection-teacher-steps", "4", "--threads", "1", "--quiet"]
    assert amed_main([*args, "--seeds", "0,1", "--out", str(tmp_path / "both")]) == 0
    (card_path,) = (tmp_path / "both").glob("*.json")
    card = PredictorCard.model_validate_json(card_path.read_text())
    picked = card.training["selection"]
    assert picked["seeds"] == [0, 1]
    assert picked["first_noise_seed"] == 2**43
    assert picked["noises"] == 4
    scores = picked["held_out_rmse"]
    assert scores[0] != scores[1]
    best = picked["chosen_seed"]
    assert best == [0, 1][scores.index(min(scores))]
    assert card.training["seed"] == best
    assert card.training["init"] == "random"
    assert card.training["first_noise_seed"] == 2**40 + best * 1_000_003

    assert amed_main([*args, "--seed", str(best), "--out", str(tmp_path / "one")]) == 0
    alone = load_file(str(tmp_path / "one" / card_path.with_suffix(".safetensors").name))
    kept = load_file(str(card_path.with_suffix(".safetensors")))
    assert all(torch.equal(alone[name], kept[name]) for name in kept)

    # trained apart (one folder per seed) and selected afterwards: the same choice and record
    other = 1 - best
    assert amed_main([*args, "--seed", str(other), "--out", str(tmp_path / "other")]) == 0
    select = ["select", str(tmp_path / "one"), str(tmp_path / "other"), "--selection", "4"]
    capsys.readouterr()
    assert amed_main([*select, "--selection-teacher-steps", "4", "--out", str(tmp_path / "picked")]) == 0
    # the printed line names each folder, which tells apart candidates trained with the same seed
    assert f"keeping {tmp_path / 'one'} (seed {best})" in capsys.readouterr().err
    picked_card = PredictorCard.model_validate_json((tmp_path / "picked" / card_path.name).read_text())
    assert picked_card.training["selection"]["chosen_seed"] == best
    assert sorted(picked_card.training["selection"]["held_out_rmse"]) == sorted(scores)
    assert [c["seed"] for c in picked_card.training["selection"]["candidates"]] == [best, other]
    assert amed_main(["select", str(tmp_path / "one"), str(tmp_path / "one"), "--out", str(tmp_path / "x")]) == 2
    assert "a candidate folder is given twice" in capsys.readouterr().err

    capsys.readouterr()
    for bad in ("0,0", "0,x"):
        with pytest.raises(SystemExit):
            amed_main([*args, "--seeds", bad, "--out", str(tmp_path / "bad")])
        assert f"--seeds: '{bad}': expected" in capsys.readouterr().err


def test_every_committed_predictor_row_names_the_weights_it_was_scored_with():
    """Each committed fd-vs-nfe row with an AMED predictor records the SHA-256 of the weights that
    scored it, and those are the weights the row's command finds now (the model's shipped folder
    behind any `--predictor-dir`): a predictor retrained after its row was run fails this until the
    row is re-run. The ablations train their own predictors and are left out."""
    stores: dict[tuple[str, ...], dict[str, Path]] = {}
    checked = 0
    for row in committed_rows():
        if not row.get("predictor") or " fd-vs-nfe " not in (row.get("command") or ""):
            continue
        where = f"{row['file']}: {row['solver']} NFE {row['nfe']}"
        argv = shlex.split(row["command"])
        folders = (
            *(argv[i + 1] for i, arg in enumerate(argv) if arg == "--predictor-dir"),
            f"models/builtin/{row['model']}/amed",
        )
        if folders not in stores:
            store = PredictorStore([REPOSITORY / folder for folder in folders if (REPOSITORY / folder).is_dir()])
            stores[folders] = {key.describe(): card for key, card in store.cards.items()}
        card = stores[folders].get(row["predictor"])
        assert card is not None, f"{where}: its predictor is no longer in {folders}"
        weights = hashlib.sha256(card.with_suffix(".safetensors").read_bytes()).hexdigest()
        assert row.get("predictor_sha256") == weights, f"{where}: scored with other weights than {card.name}: re-run it"
        checked += 1
    assert checked >= 40
