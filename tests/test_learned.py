"""Learned schedules: GITS and LD3 grids on the exact Gaussian mixture beat the polynomial grid for
the same solver and NFE against the exact ODE solution; the artifact is found by key and refused
when the key is wrong or the file is corrupt; the CLI, the sweep and the service use it."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

import models
import solvers
from bench.amed import HAND_DESIGNED
from models.analytic import GaussianMixtureDenoiser, reference_solution
from solvers import InvalidParameterError, MissingPredictorError
from solvers.amed import PredictorStore, read_card
from solvers.errors import MissingGridError
from solvers.learned import (
    ANY_METHOD,
    GRID_FILE_PREFIX,
    RANKING_FILE,
    GridCard,
    GridLoadError,
    grid_key,
    read_grid,
    read_ranking,
    save_grid,
    save_ranking,
)
from solvers.learned.gits import GITSSettings, dynamic_program, train_gits
from solvers.learned.ld3 import LD3Settings, grid_of, logits_of, train_ld3
from solvers.learned.student import Student, Teacher
from tests.conftest import REPOSITORY, committed_rows

SHAPE = (8,)
TRAIN = range(2**41, 2**41 + 100)
SELECT = range(2**42, 2**42 + 64)


def _noise(seeds):
    return solvers.make_noise(list(seeds), SHAPE, dtype=torch.float64)


def _card(model, solver: str, params: dict, method: str, nfe: int, afs: bool, sigmas: torch.Tensor) -> GridCard:
    spec = solvers.SOLVERS.get(solver)
    return GridCard(
        model="gmm",
        model_fingerprint="gmm-smooth-8-3-0",
        solver=solver,
        solver_params=spec.parse_params(params).model_dump(),
        method=method,
        nfe=nfe,
        steps=len(sigmas) - 1,
        afs=afs,
        guidance=1.0,
        sigmas=sigmas.tolist(),
    )


def _key(solver: str, params: dict, method: str, nfe: int, afs: bool = False):
    return grid_key(
        model_fingerprint="gmm-smooth-8-3-0",
        solver=solver,
        solver_params=solvers.SOLVERS.get(solver).parse_params(params).model_dump(),
        method=method,
        nfe=nfe,
        afs=afs,
        guidance=1.0,
    )


@pytest.mark.parametrize("method", ["gits", "ld3"])
@pytest.mark.parametrize(
    ("solver", "params"), [("ipndm", {"max_order": 2}), ("unipc", {}), ("dpmpp_2m", {}), ("euler", {})]
)
def test_learned_grid_beats_the_polynomial_grid_on_the_exact_model(tmp_path: Path, method, solver, params):
    """Trained on the mixture, stored, found by key, sampled along: the learned grid's error against
    the exact solution (DOP853) is well below the polynomial (rho 7) grid's, same solver, same NFE."""
    model = GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)
    nfe = 4
    student = Student.of(solver, params, afs=False)

    def make_batch(seeds):
        return model, _noise(seeds)

    if method == "gits":
        settings = GITSSettings(candidates=32, trajectories=16, selection=64)
        result = train_gits(
            student, nfe, make_batch, settings=settings, training_seeds=TRAIN[:16], selection_seeds=SELECT
        )
    else:
        ld3 = LD3Settings(trajectories=100, epochs=6, teacher=Teacher(steps=64))
        result = train_ld3(student, nfe, make_batch, settings=ld3, training_seeds=TRAIN, selection_seeds=SELECT)
    save_grid(_card(model, solver, params, method, nfe, False, result.sigmas), tmp_path / "grid.json")
    grid = PredictorStore([tmp_path]).find_grid(_key(solver, params, method, nfe), "gmm")

    test = _noise(range(10**7, 10**7 + 200))
    exact = reference_solution(model, test * model.sigma_max, model.sigma_max, model.sigma_min)[0]
    steps = student.steps_for(nfe)
    plain = solvers.sample(model, test, solver=solver, steps=steps, solver_params=params)
    learned = solvers.sample(
        model, test, solver=solver, steps=steps, solver_params=params, schedule="learned", grid=grid
    )
    assert learned.nfe == plain.nfe == nfe
    torch.testing.assert_close(learned.sigmas, result.sigmas, rtol=0, atol=0)

    def rmse(images):
        return float((images - exact).pow(2).mean().sqrt())

    assert rmse(learned.images) < 0.7 * rmse(plain.images), (rmse(learned.images), rmse(plain.images))


SHIPPED = REPOSITORY / "models" / "builtin"


def test_every_shipped_ld3_grid_beat_its_starting_grid_under_the_current_defaults():
    """An LD3 grid ships only when its held-out RMSE beat the grid it started from (epoch 0 of the
    card), and it is keyed by its solver's current parameters with defaults filled in: a grid trained
    under a default that has since changed would never be found, and this fails first."""
    cards = [read_grid(path) for path in sorted(SHIPPED.glob("*/amed/grid-*.json"))]
    assert len([card for card in cards if card.method == "ld3"]) >= 10
    for card in cards:
        name = card.key().describe()
        resolved = solvers.SOLVERS.get(card.solver).parse_params(card.solver_params).model_dump()
        assert card.solver_params == resolved, name
        if card.method == "ld3":
            start = card.training["held_out_rmse_per_epoch"][0]
            assert card.training["loss"] < start, name


def test_every_shipped_seed_selection_names_the_grid_it_kept():
    """Where a shipped grid was chosen among seeds (select-grid), its sigmas and seed are the chosen
    candidate's and that candidate scored lowest on the held-out noises (a wrong file copied into
    the folder fails here). On mnist every LD3 grid was chosen so, among two or more seeds (an AMED
    plugin's as a pair with the predictor trained on it, by `select`)."""
    chosen = 0
    for path in sorted(SHIPPED.glob("*/amed/grid-*.json")):
        card = read_grid(path)
        record = card.training.get("seed_selection")
        name = card.key().describe()
        if record is None:
            assert card.model != "mnist" or card.method != "ld3", name
            continue
        candidates = record["candidates"]
        assert len(candidates) >= 2, name
        scores = [candidate["held_out_rmse"] for candidate in candidates]
        kept = candidates[scores.index(min(scores))]
        assert (kept["seed"], kept["sigmas"]) == (card.training["seed"], card.sigmas), name
        assert record["chosen_seed"] == card.training["seed"], name
        chosen += 1
    assert chosen >= 28


def test_every_shipped_predictor_on_a_learned_grid_records_that_grid():
    """A predictor trained on a learned grid is served only with that grid: every shipped one
    records it, and the store serves it (it drops one whose grid stored under the key has other
    sigmas), so a grid retrained or re-chosen without its predictor fails here."""
    checked = 0
    for folder in sorted(SHIPPED.glob("*/amed")):
        store = PredictorStore([folder])
        on_grids = [path for path in folder.glob("*.json") if "-learned-" in path.name]
        for path in on_grids:
            card = read_card(path)
            assert card.grid is not None, path.name
            assert store.cards.get(card.key()) == path, store.problems
            grid_path, grid = store.grids[card.grid_key()]
            assert (grid_path.name, grid.sigmas) == (card.grid.file, card.grid.sigmas), path.name
            checked += 1
    assert checked >= 4


def _committed_rows(card: GridCard, schedule: str, grid_file: Path | None = None) -> list[dict[str, str]]:
    """The N = 1,000 rows under bench/results/ for this grid's model, solver, NFE and AFS on
    `schedule` (on `learned`, those scored with `grid_file`)."""
    found = []
    for row in committed_rows():
        if (row.get("model"), row.get("solver"), row.get("schedule"), row.get("num_samples")) != (
            card.model,
            card.solver,
            schedule,
            "1000",
        ):
            continue
        if int(row["nfe"]) != card.nfe or row.get("afs") != str(card.afs).lower():
            continue
        if grid_file is None or row.get("grid") == grid_file.relative_to(REPOSITORY).as_posix():
            found.append(row)
    return found


def _hand_designed_start(training: dict) -> str:
    """The schedule a grid's training started from, through any grids it continued (`--init-grid`).
    GITS starts from no grid (its record has no `init`): it is held to `time_uniform`, the
    hand-designed schedule every learned grid here is compared with."""
    while training.get("init") == "grid":
        training = training["init_grid_training"]
    return training.get("init", "time_uniform")


def test_every_shipped_solver_grid_keeps_its_starting_fd():
    """A learned grid for a training-free solver ships with its committed N = 1,000 row, and that
    row's FD is not above the 90% interval of its starting grid's row. Held-out RMSE alone let
    through a DEIS grid on mnist-flow at NFE 3 with FD 8.57 against its start's 0.89 [0.23, 1.95]
    (its card is kept in bench/results/mnist-flow-ld3-unshipped/). AMED-Plugin grids are left out:
    their start is the plugin with another predictor (docs/amed.md compares them)."""
    checked = 0
    for path in sorted(SHIPPED.glob("*/amed/grid-*.json")):
        card = read_grid(path)
        if card.solver == "amed_plugin":
            continue
        name = card.key().describe()
        learned = _committed_rows(card, "learned", path)
        start = _committed_rows(card, _hand_designed_start(card.training))
        assert [len(learned), len(start)] == [1, 1], f"{name}: rows {[r['file'] for r in learned + start]}"
        fd, ceiling = float(learned[0]["fd_indomain"]), float(start[0]["fd_ci_high"])
        assert fd <= ceiling, f"{name}: FD {fd:.2f} ({learned[0]['file']}) above its start's interval, {ceiling:.2f}"
        checked += 1
    assert checked >= 60


def test_every_shipped_gits_grid_beat_the_hand_designed_schedules_on_fresh_noise():
    """GITS has no starting grid to beat on its selection noises, so a GITS grid ships only when a
    committed compare-schedules run (fresh noises, disjoint from its training, its selection and
    every benchmark) scored it below every hand-designed schedule for the same solver and NFE."""
    rows = [row for row in committed_rows() if "rmse_teacher" in row and row.get("model")]
    checked = 0
    for path in sorted(SHIPPED.glob("*/amed/grid-gits-*.json")):
        card = read_grid(path)
        name = card.key().describe()
        shown = path.relative_to(REPOSITORY).as_posix()
        learned = [row for row in rows if row.get("grid") == shown]
        assert learned, f"{name}: no committed compare-schedules row scored {shown}"
        for row in learned:
            hand = [
                float(other["rmse_teacher"])
                for other in rows
                if other["file"] == row["file"]
                and (other["model"], other["solver"], other["solver_params"], other["nfe"], other["afs"])
                == (row["model"], row["solver"], row["solver_params"], row["nfe"], row["afs"])
                and other["schedule"] in HAND_DESIGNED
            ]
            assert len(hand) == len(HAND_DESIGNED), f"{name}: {row['file']}"
            assert float(row["rmse_teacher"]) < min(hand), f"{name}: {row['file']}"
        checked += 1
    assert checked >= 20


def test_every_committed_learned_row_names_the_grid_it_was_scored_with():
    """Each committed row on a `learned` schedule names its grid file, which is still in the
    repository, and carries that file's sigmas: a grid retrained after its row was run fails this
    until the row is re-run."""
    checked = 0
    for row in committed_rows():
        if row.get("schedule") != "learned":
            continue
        where = f"{row['file']}: {row['solver']} NFE {row['nfe']}"
        assert row.get("grid"), f"{where} does not name its grid: re-run it"
        card = read_grid(REPOSITORY / row["grid"])
        assert json.loads(row["grid_sigmas"]) == pytest.approx(card.sigmas, rel=1e-12), f"{where}: {row['grid']}"
        checked += 1
    assert checked >= 50


def test_every_shipped_ranking_is_current_and_agrees_with_compare_schedules():
    """A model folder's ranking (which method a request naming none gets) is not stale: the store
    reads it without a problem, every key with grids of two methods is in it, and each score equals
    the committed compare-schedules row of that grid (the same protocol), so the grid it picks is the
    one those rows scored lower."""
    rows = [row for row in committed_rows() if "rmse_teacher" in row and row.get("grid")]
    checked = 0
    for folder in sorted(SHIPPED.glob("*/amed")):
        store = PredictorStore([folder])
        assert not store.problems, store.problems
        # the keys rank-grids ranks: grids of both methods, a plain solver (a plugin's are not ranked)
        groups = {key.any_method() for key in store.grids if key.method == "gits"}
        groups &= {key.any_method() for key in store.grids if key.method == "ld3"}
        groups = {key for key in groups if not solvers.SOLVERS.get(key.solver).needs_predictor}
        path = folder / RANKING_FILE
        if not path.exists():
            assert not groups, f"{folder}: grids of both methods and no ranking (sampler-amed rank-grids)"
            continue
        ranked = read_ranking(path)
        assert groups == set(store.rankings), f"{path}: rerun sampler-amed rank-grids"
        for entry in ranked.entries:
            for grid in entry.grids:
                shown = (path.parent / grid.file).relative_to(REPOSITORY).as_posix()
                scored = [float(row["rmse_teacher"]) for row in rows if row["grid"] == shown]
                assert scored, f"{shown}: no committed compare-schedules row"
                assert grid.rmse == pytest.approx(scored[-1], rel=1e-4), shown
            checked += 1
    assert checked >= 20


def test_rank_grids_picks_the_grid_a_request_naming_no_method_gets(tmp_path: Path, capsys):
    """Two grids for one key (GITS and LD3): `sampler-amed rank-grids` scores them exactly as
    compare-schedules does and writes the ranking; the store then resolves a key naming no method
    to the lower one, and to the other when the ranking says so; a ranking whose grid has changed
    since, or a corrupt one, is ignored with a problem naming the file (falling back to LD3); Plan
    over gRPC and a sweep row step along the ranked grid."""
    from bench.__main__ import main as bench_main
    from bench.amed import main as amed_main

    model = models.load("mnist", device="cpu")
    folder = tmp_path / "grids"
    for method, schedule in (("gits", "polynomial"), ("ld3", "time_uniform")):
        sigmas = solvers.build_sigmas(schedule, 3, sigma_min=model.sigma_min, sigma_max=model.sigma_max)
        card = _card(model, "ipndm", {"max_order": 2}, method, 3, False, sigmas)
        save_grid(
            card.model_copy(update={"model": "mnist", "model_fingerprint": model.fingerprint}),
            folder / f"{method}.json",
        )
    protocol = ["--model", "mnist", "--dir", str(folder), "--num", "4", "--teacher-steps", "8", "--threads", "1"]
    ranking_path = folder / RANKING_FILE
    assert amed_main(["rank-grids", *protocol, "--out", str(ranking_path)]) == 0
    compared = ["compare-schedules", *protocol, "--solvers", 'ipndm:{"max_order":2}', "--nfe", "3"]
    assert amed_main([*compared, "--out", str(tmp_path / "compared")]) == 0
    scores = {
        row["schedule"]: row["rmse_teacher"]
        for row in json.loads((tmp_path / "compared" / "results.json").read_text())["rows"]
    }
    (entry,) = read_ranking(ranking_path).entries
    assert {grid.method: grid.rmse for grid in entry.grids} == {
        "gits": scores["learned-gits"],
        "ld3": scores["learned-ld3"],
    }
    best = entry.grids[0].method
    other = entry.grids[1].method
    assert scores[f"learned-{best}"] < scores[f"learned-{other}"]
    unnamed = grid_key(
        model_fingerprint=model.fingerprint,
        solver="ipndm",
        solver_params=solvers.SOLVERS.get("ipndm").parse_params({"max_order": 2}).model_dump(),
        method=ANY_METHOD,
        nfe=3,
        afs=False,
        guidance=1.0,
    )
    store = PredictorStore([folder])
    assert not store.problems
    assert store.resolve_grid(unnamed).method == best
    assert store.resolve_grid(dataclasses.replace(unnamed, method=other)).method == other  # named: kept
    capsys.readouterr()
    assert amed_main(["list", "--dir", str(folder)]) == 0
    assert f"unnamed method -> {best}" in capsys.readouterr().out

    # the same two grids ranked the other way round (scores swapped, lowest still first)
    swapped = [grid.model_copy(update={"rmse": entry.grids[i].rmse}) for i, grid in enumerate(entry.grids[::-1])]
    reversed_entry = entry.model_copy(update={"grids": swapped})
    ranking = read_ranking(ranking_path)
    save_ranking(ranking.model_copy(update={"entries": [reversed_entry]}), ranking_path)
    assert PredictorStore([folder]).resolve_grid(unnamed).method == other

    save_ranking(ranking, ranking_path)
    _service_plans_on_the_ranked_grid(folder, best, read_grid(folder / f"{best}.json").sigmas)
    sweep = ["fd-vs-nfe", "--solvers", "ipndm", "--solver-params", '{"ipndm": {"max_order": 2}}', "--nfe", "3"]
    sweep += ["--schedule", "learned", "--num-samples", "4", "--batch-size", "4", "--reference-steps", "4"]
    sweep += ["--reference-check", "4", "--bootstrap", "0", "--device", "cpu", "--grid", "0"]
    sweep += ["--predictor-dir", str(folder), "--out", str(tmp_path / "sweep")]
    with pytest.warns(UserWarning, match="feature dimensions"):
        assert bench_main(sweep) == 0
    (row,) = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert row["grid"].endswith(f"{best}.json")
    assert row["grid_method"] == best

    changed = read_grid(folder / "gits.json")
    save_grid(
        changed.model_copy(update={"sigmas": [changed.sigmas[0], *(v * 0.9 for v in changed.sigmas[1:])]}),
        folder / "gits.json",
    )
    stale = PredictorStore([folder])
    (problem,) = stale.problems
    assert str(ranking_path) in problem
    assert "rerun sampler-amed rank-grids" in problem
    assert stale.resolve_grid(unnamed).method == "ld3"  # unranked: LD3
    ranking_path.write_text('{"artifact": "learned_grid_ranking", "entries": [}', encoding="utf-8")
    (problem,) = PredictorStore([folder]).problems
    assert problem.startswith(f"{ranking_path}: not a valid learned-grid ranking")


def _service_plans_on_the_ranked_grid(folder: Path, method: str, sigmas: list[float]) -> None:
    from tests.test_service import request

    with _serving_mnist_with(folder) as running:
        plan = running.stub.Plan(request(solver="ipndm", nfe=3, schedule="learned", solver_params={"max_order": 2}))
        assert f"learned grid method={method} solver=ipndm" in plan.predictor.key
        assert plan.predictor.available
        assert list(plan.sigmas) == pytest.approx(sigmas, rel=1e-12)


def test_ld3_through_a_plugin_predictor_learns_the_grid_that_predictor_needs():
    """The joint option's mechanism: LD3 run through a given (here deliberately skewed, r ~ 0.12)
    AMED-Plugin predictor finds a grid on which that predictor lands well closer to the exact
    solution than on the grid learned with the neutral predictor (r = 1/2), same budget and start.
    Fails if the student ignores the predictor it is given."""
    from solvers.amed import PredictorConfig, new_predictor

    model = GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)
    params = {"base": "ipndm", "max_order": 2}
    skewed = new_predictor(PredictorConfig(), 0).double()
    with torch.no_grad():
        skewed.head_r.bias.fill_(-2.0)
    skewed.requires_grad_(False)
    neutral = new_predictor(PredictorConfig(), 0).double()
    ld3 = LD3Settings(trajectories=100, epochs=6, teacher=Teacher(steps=64))

    def grid(predictor):
        student = Student.of("amed_plugin", params, afs=True, predictor=predictor)
        make_batch = lambda seeds: (model, _noise(seeds))  # noqa: E731
        return train_ld3(student, 5, make_batch, settings=ld3, training_seeds=TRAIN, selection_seeds=SELECT).sigmas

    test = _noise(range(10**7, 10**7 + 200))
    exact = reference_solution(model, test * model.sigma_max, model.sigma_max, model.sigma_min)[0]

    def rmse(sigmas):
        out = solvers.sample(
            model,
            test,
            solver="amed_plugin",
            steps=3,
            afs=True,
            solver_params=params,
            predictor=skewed,
            schedule="learned",
            grid=sigmas,
        )
        return float((out.images - exact).pow(2).mean().sqrt())

    through, plain = rmse(grid(skewed)), rmse(grid(neutral))
    assert through < 0.8 * plain, (through, plain)


def test_dynamic_program_finds_the_cheapest_path():
    """On a cost where every interval costs its length squared, the cheapest S-interval path over
    an equally spaced candidate grid is the equal split (and coeff 1 weighs every interval alike)."""
    points = 13
    index = torch.arange(points, dtype=torch.float64)
    cost = (index[None, :] - index[:, None]) ** 2
    cost[torch.tril(torch.ones(points, points, dtype=torch.bool))] = float("inf")
    path, value = dynamic_program(cost, 4, 1.0)
    assert path == [0, 3, 6, 9, 12]
    assert value == 4 * 9
    with pytest.raises(InvalidParameterError, match="steps=13"):
        dynamic_program(cost, 13, 1.0)


def test_ld3_parameterisation_round_trips_and_stays_decreasing():
    sigmas = solvers.build_sigmas("polynomial", 6, sigma_min=0.002, sigma_max=80.0)
    torch.testing.assert_close(grid_of(logits_of(sigmas), 0.002, 80.0), sigmas, rtol=1e-12, atol=0)
    wild = grid_of(torch.tensor([30.0, -30.0, 0.0, 5.0, -5.0, 1.0], dtype=torch.float64), 0.002, 80.0)
    assert bool((wild[1:] < wild[:-1]).all())
    assert (wild[0].item(), wild[-1].item()) == (80.0, 0.002)


def test_a_grid_with_the_wrong_key_is_refused(tmp_path: Path, gmm):
    """The store finds a grid only under its full key (solver, parameters, method, NFE, AFS,
    guidance, model): anything else is a MissingGridError listing what exists and the command
    that trains the missing grid; a grid of the wrong length is refused by the schedule."""
    sigmas = solvers.build_sigmas("logsnr", 4, sigma_min=0.002, sigma_max=80.0)
    save_grid(_card(gmm, "ipndm", {"max_order": 2}, "gits", 4, False, sigmas), tmp_path / "a.json")
    store = PredictorStore([tmp_path])
    assert store.has_grid(_key("ipndm", {"max_order": 2}, "gits", 4))
    for wrong in (
        _key("ipndm", {"max_order": 3}, "gits", 4),
        _key("ipndm", {"max_order": 2}, "ld3", 4),
        _key("ipndm", {"max_order": 2}, "gits", 5),
        _key("ipndm", {"max_order": 2}, "gits", 4, afs=True),
        _key("unipc", {}, "gits", 4),
    ):
        with pytest.raises(MissingGridError) as caught:
            store.find_grid(wrong, "gmm")
        assert isinstance(caught.value, MissingPredictorError)  # the service maps both alike
        text = str(caught.value)
        assert text.startswith("no learned grid for")
        assert "available: model gmm-smooth-8 learned grid method=gits solver=ipndm" in text
        assert f"sampler-amed train-schedule --method {wrong.method} --model gmm --solver {wrong.solver}" in text
        assert f"--nfe {wrong.nfe}" in text
    noise = _noise(range(3))
    with pytest.raises(InvalidParameterError, match="learned grid of 5 sigmas"):
        solvers.sample(gmm, noise, solver="ipndm", steps=5, schedule="learned", grid=sigmas)
    with pytest.raises(InvalidParameterError, match="a stored grid"):
        solvers.sample(gmm, noise, solver="ipndm", steps=4, schedule="learned")
    outside = sigmas * 2  # above the model's sigma_max
    with pytest.raises(InvalidParameterError, match="inside the model's range"):
        solvers.sample(gmm, noise, solver="ipndm", steps=4, schedule="learned", grid=outside)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"artifact": "learned_grid", "model": "gmm"', "not a valid learned grid"),
        ("sigmas", None),
        ("steps", "expected 5"),
        ("increasing", "strictly decreasing"),
    ],
)
def test_a_corrupt_grid_file_is_refused_naming_the_file(tmp_path: Path, gmm, content, problem):
    sigmas = solvers.build_sigmas("logsnr", 4, sigma_min=0.002, sigma_max=80.0)
    card = json.loads(_card(gmm, "ipndm", {}, "gits", 4, False, sigmas).model_dump_json())
    path = tmp_path / "grid-bad.json"
    if content == "sigmas":
        card["sigmas"] = "not a list"
        text = json.dumps(card)
    elif content == "steps":
        card["sigmas"] = card["sigmas"][:-1]
        text = json.dumps(card)
    elif content == "increasing":
        card["sigmas"] = card["sigmas"][::-1]
        text = json.dumps(card)
    else:
        text = content
    path.write_text(text)
    with pytest.raises(GridLoadError) as caught:
        read_grid(path)
    assert str(path) in str(caught.value)
    if problem:
        assert problem in str(caught.value)
    store = PredictorStore([tmp_path])  # the store skips it and says why, naming the file
    assert not store.grids
    (reported,) = store.problems
    assert reported.startswith(f"{path}: not a valid learned grid")


def test_gits_cost_command_writes_the_matrix_its_dp_path_is_taken_from(tmp_path: Path):
    """`sampler-amed gits-cost` writes every candidate interval's cost and the DP path of those very
    costs (docs/amed.md uses it to say where GITS's cost lies on mnist and mnist-flow)."""
    from bench.amed import main as amed_main

    args = ["gits-cost", "--model", "mnist", "--candidates", "6", "--trajectories", "2", "--intervals", "3"]
    assert amed_main([*args, "--threads", "1", "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "results.json").read_text())
    rows = document["rows"]
    assert len(rows) == 6 * 7 // 2
    cost = torch.full((7, 7), float("inf"), dtype=torch.float64)
    for row in rows:
        assert row["cost"] >= 0
        assert row["sigma_from"] > row["sigma_to"]
        cost[row["i"], row["j"]] = row["cost"]
    path, value = dynamic_program(cost, 3, 1.0)
    dp = document["meta"]["dp"]
    assert (dp["path"], dp["cost"]) == (path, pytest.approx(value, rel=1e-12))
    assert dp["cost"] == pytest.approx(sum(cost[a, b].item() for a, b in itertools.pairwise(path)))
    assert dp["sigmas"][0] == rows[0]["sigma_from"]
    assert len(path) == 4


def test_train_schedule_command_lists_and_the_sweep_and_service_use_the_grid(tmp_path: Path, capsys):
    """`sampler-amed train-schedule` on the shipped model (a tiny GITS run) writes a grid card with
    its seeds, teacher, losses and cost; `list` shows it; a sweep row on the learned schedule steps
    along it; Plan over gRPC resolves it, and a missing one is refused with the training command."""
    from bench.__main__ import main as bench_main
    from bench.amed import main as amed_main

    out = tmp_path / "grids"
    args = ["train-schedule", "--method", "gits", "--model", "mnist", "--solver", "ipndm"]
    args += ["--solver-params", '{"max_order": 2}', "--nfe", "3", "--candidates", "6", "--trajectories", "2"]
    assert amed_main([*args, "--selection", "2", "--threads", "1", "--out", str(out), "--quiet"]) == 0
    (path,) = out.glob("*.json")
    assert path.name == "grid-gits-ipndm-max_order2-nfe3-noafs-w1.json"
    card = read_grid(path)
    assert (card.solver, card.method, card.nfe, card.steps, card.afs) == ("ipndm", "gits", 3, 3, False)
    assert card.training["first_noise_seed"] == 2**41
    assert card.training["selection_first_noise_seed"] == 2**42
    assert card.training["teacher"] == "heun"
    assert card.training["network_evals"] > 0
    assert card.training["loss"] > 0
    assert card.training["command"]  # the argv of the process that trained it
    capsys.readouterr()
    assert amed_main(["list", "--dir", str(out)]) == 0
    assert "learned grid method=gits solver=ipndm" in capsys.readouterr().out

    sweep = ["fd-vs-nfe", "--solvers", "ipndm", "--solver-params", '{"ipndm": {"max_order": 2}}', "--nfe", "3"]
    sweep += ["--schedule", "learned", "--schedule-params", '{"method": "gits"}', "--num-samples", "16"]
    sweep += ["--batch-size", "16", "--reference-steps", "4", "--reference-check", "4", "--bootstrap", "0"]
    sweep += ["--device", "cpu", "--grid", "0", "--predictor-dir", str(out), "--out", str(tmp_path / "sweep")]
    with pytest.warns(UserWarning, match="feature dimensions"):
        assert bench_main(sweep) == 0
    (row,) = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert (row["schedule"], row["nfe"], row["steps"]) == ("learned", 3, 3)
    assert row["rmse_ref"] > 0
    assert row["grid"].endswith(path.name)
    assert json.loads(row["grid_sigmas"]) == card.sigmas
    capsys.readouterr()
    assert bench_main([*sweep[:6], "4", *sweep[7:]]) == 2
    assert "sampler-amed train-schedule --method gits --model mnist --solver ipndm" in capsys.readouterr().err
    assert bench_main([*sweep, "--seed-base", str(2**41)]) == 2  # its training noises are not a benchmark's
    assert "which overlap" in capsys.readouterr().err

    _service_resolves_the_grid(out, card)


def test_select_grid_keeps_the_seed_that_scores_best_on_held_out_noise(tmp_path: Path, capsys):
    """Grids of one key trained apart (one seed each, tiny LD3) are scored on the predictors'
    held-out noises (2**43 + k) against a Heun judge; the lowest is written with every candidate's
    score. score-grids on the same noises and judge (its offset moved to 2**43) gives the same
    scores. A sweep steps along the kept grid and refuses the noises that chose it."""
    from bench.amed import main as amed_main

    args = ["train-schedule", "--method", "ld3", "--model", "mnist", "--solver", "unipc", "--nfe", "3", "--afs"]
    args += ["--init", "polynomial", "--trajectories", "8", "--batch-size", "4", "--epochs", "1"]
    args += ["--selection", "4", "--teacher-steps", "8", "--threads", "1", "--quiet"]
    for seed in (0, 1):
        assert amed_main([*args, "--seed", str(seed), "--out", str(tmp_path / f"s{seed}")]) == 0
    (first,), (second,) = (list((tmp_path / f"s{seed}").glob("grid-*.json")) for seed in (0, 1))
    cards = [read_grid(first), read_grid(second)]
    assert cards[0].sigmas != cards[1].sigmas

    judge = ["--selection", "4", "--selection-teacher-steps", "4", "--threads", "1"]
    capsys.readouterr()
    assert amed_main(["select-grid", str(tmp_path / "s0"), str(second), *judge, "--out", str(tmp_path / "kept")]) == 0
    picked = read_grid(tmp_path / "kept" / first.name)
    record = picked.training["seed_selection"]
    assert picked.training["selection"] == 4  # the noises that chose its epoch, kept
    scores = record["held_out_rmse"]
    assert (record["seeds"], record["first_noise_seed"], record["noises"]) == ([0, 1], 2**43, 4)
    assert scores[0] != scores[1]
    best = scores.index(min(scores))
    assert record["chosen_seed"] == best
    assert picked.sigmas == cards[best].sigmas
    assert picked.training["seed"] == best
    assert [c["sigmas"] for c in record["candidates"]] == [card.sigmas for card in cards]
    assert f"keeping {[first, second][best]} (seed {best})" in capsys.readouterr().err
    assert PredictorStore([tmp_path / "kept"]).grid_keys(picked.model_fingerprint) == [picked.key()]

    # a sweep on the kept grid scores it, and refuses noises that chose it among the seeds
    from bench.__main__ import main as bench_main

    sweep = ["fd-vs-nfe", "--solvers", "unipc", "--nfe", "3", "--afs", "--schedule", "learned", "--num-samples", "8"]
    sweep += ["--batch-size", "8", "--reference-steps", "4", "--reference-check", "4", "--bootstrap", "0"]
    sweep += ["--device", "cpu", "--grid", "0", "--predictor-dir", str(tmp_path / "kept")]
    with pytest.warns(UserWarning, match="feature dimensions"):
        assert bench_main([*sweep, "--out", str(tmp_path / "sweep")]) == 0
    (row,) = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert json.loads(row["grid_sigmas"]) == picked.sigmas
    capsys.readouterr()
    assert bench_main([*sweep, "--seed-base", str(2**43 + 3), "--out", str(tmp_path / "sweep2")]) == 2
    assert f"trained on noise seeds {2**43}..{2**43 + 3}, which overlap" in capsys.readouterr().err

    score = ["score-grids", f"s0={first}", f"s1={second}", "--num", "4", "--teacher-steps", "4"]
    assert amed_main([*score, "--seed-offset", str(2**42), "--out", str(tmp_path / "score")]) == 0
    rows = json.loads((tmp_path / "score" / "results.json").read_text())["rows"]
    assert [row["rmse_teacher"] for row in rows] == pytest.approx(scores, rel=1e-6)

    out = ["--out", str(tmp_path / "x")]
    nfe4 = [*args[: args.index("--nfe") + 1], "4", *args[args.index("--nfe") + 2 :]]
    assert amed_main([*nfe4, "--out", str(tmp_path / "s4")]) == 0
    capsys.readouterr()
    assert amed_main(["select-grid", str(first), str(tmp_path / "s4"), *judge, *out]) == 2
    err = capsys.readouterr().err
    assert "nfe=4 afs=True guidance=1, not model" in err
    assert "nfe=3 afs=True" in err
    assert amed_main(["select-grid", str(first), str(tmp_path / "s0"), *judge, *out]) == 2
    assert "a candidate grid is given twice" in capsys.readouterr().err
    assert amed_main(["select-grid", str(tmp_path), str(first), *judge, *out]) == 2
    assert f"{tmp_path}: expected one grid card" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert amed_main(["select-grid", str(first), str(tmp_path / "broken.json"), *judge, *out]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_select_keeps_the_best_grid_and_predictor_pair(tmp_path: Path, capsys):
    """AMED-Plugin grids of one key trained apart (one seed each, tiny LD3), a predictor trained on
    each (its card records the grid): `select` runs every predictor on its own grid, keeps the
    pair that scores lowest on the held-out noises and writes both, the grid with the record of the
    choice. score-grids with each predictor on its grid, on the same noises and judge, gives the
    same scores. A predictor beside a grid other than its own is refused by `select`, and dropped
    by the store (a sweep then gets the missing-predictor error)."""
    from bench.__main__ import main as bench_main
    from bench.amed import main as amed_main

    plugin = ["--model", "mnist", "--solver", "amed_plugin", "--nfe", "3", "--afs", "--threads", "1", "--quiet"]
    grid_args = ["train-schedule", "--method", "ld3", *plugin, "--solver-params", '{"base": "ipndm", "max_order": 2}']
    grid_args += ["--init", "polynomial", "--trajectories", "8", "--batch-size", "4", "--epochs", "1"]
    grid_args += ["--selection", "4", "--teacher-steps", "8"]
    train = ["train", *plugin, "--base", "ipndm", "--base-max-order", "2", "--schedule", "learned"]
    train += ["--schedule-params", '{"method": "ld3"}', "--trajectories", "4", "--batch-size", "4"]
    folders = [tmp_path / f"s{seed}" for seed in (0, 1)]
    for seed, folder in enumerate(folders):
        assert amed_main([*grid_args, "--seed", str(seed), "--out", str(folder)]) == 0
        assert amed_main([*train, "--seed", str(seed), "--grid-dir", str(folder), "--out", str(folder)]) == 0
    grids = [next(folder.glob("grid-*.json")) for folder in folders]
    preds = [next(p for p in folder.glob("amed_plugin-*.json")) for folder in folders]
    cards = [read_grid(path) for path in grids]
    assert cards[0].sigmas != cards[1].sigmas
    for pred, grid, card in zip(preds, grids, cards, strict=True):
        trained_on = read_card(pred).grid
        assert trained_on is not None
        assert (trained_on.file, trained_on.method, trained_on.sigmas) == (grid.name, "ld3", card.sigmas)

    judge = ["--selection", "4", "--selection-teacher-steps", "4", "--threads", "1"]
    kept = tmp_path / "kept"
    capsys.readouterr()
    assert amed_main(["select", *map(str, folders), *judge, "--out", str(kept)]) == 0
    assert "kept its grid" in capsys.readouterr().err
    (kept_pred,) = kept.glob("amed_plugin-*.json")
    (kept_grid,) = kept.glob("grid-*.json")
    predictor, grid = read_card(kept_pred), read_grid(kept_grid)
    scores = predictor.training["selection"]["held_out_rmse"]
    assert scores[0] != scores[1]
    best = scores.index(min(scores))
    assert predictor.training["seed"] == grid.training["seed"] == best
    assert predictor.grid is not None
    assert predictor.grid.sigmas == grid.sigmas == cards[best].sigmas
    assert (kept_pred.with_suffix(".safetensors")).read_bytes() == preds[best].with_suffix(".safetensors").read_bytes()
    record = grid.training["seed_selection"]
    assert (record["chosen_seed"], record["held_out_rmse"], record["first_noise_seed"]) == (best, scores, 2**43)
    assert [c["sigmas"] for c in record["candidates"]] == [card.sigmas for card in cards]
    assert [c["grid"]["seed"] for c in predictor.training["selection"]["candidates"]] == [0, 1]
    for seed in (0, 1):  # the same score from score-grids, each predictor on its own grid
        score = ["score-grids", f"s{seed}={grids[seed]}", "--predictor", str(preds[seed]), "--num", "4"]
        out = tmp_path / f"score{seed}"
        assert amed_main([*score, "--teacher-steps", "4", "--seed-offset", str(2**42), "--out", str(out)]) == 0
        (row,) = json.loads((out / "results.json").read_text())["rows"]
        assert row["rmse_teacher"] == pytest.approx(scores[seed], rel=1e-6)
    store = PredictorStore([kept])
    assert store.keys() == [predictor.key()]
    assert store.problems == []
    again = tmp_path / "again"  # the kept pair given again: the record of the first choice is kept too
    assert amed_main(["select", str(kept), str(folders[1 - best]), *judge, "--out", str(again)]) == 0
    (again_pred,), (again_grid,) = again.glob("amed_plugin-*.json"), again.glob("grid-*.json")
    assert read_card(again_pred).training["earlier_selection"] == [predictor.training["selection"]]
    assert read_grid(again_grid).training["earlier_seed_selection"] == [record]

    # a predictor beside a grid it was not trained on: refused by select, dropped by the store
    other = 1 - best
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for path in (kept_pred, kept_pred.with_suffix(".safetensors"), grids[other]):
        (mixed / path.name).write_bytes(path.read_bytes())
    assert amed_main(["select", str(mixed), str(folders[other]), *judge, "--out", str(tmp_path / "x")]) == 2
    assert f"was trained on the grid {grids[best].name}, not on {mixed / grids[other].name}" in capsys.readouterr().err
    store = PredictorStore([mixed])
    assert store.keys() == []
    (problem,) = store.problems
    assert f"{mixed / kept_pred.name}: predictor for" in problem
    assert f"in {grids[other].name} has other sigmas" in problem
    sweep = ["fd-vs-nfe", "--solvers", "amed_plugin", "--solver-params", '{"amed_plugin": {"max_order": 2}}']
    sweep += ["--nfe", "3", "--afs", "--schedule", "learned", "--schedule-params", '{"method": "ld3"}']
    sweep += ["--num-samples", "8", "--batch-size", "8", "--reference-steps", "4", "--reference-check", "4"]
    sweep += ["--bootstrap", "0", "--device", "cpu", "--grid", "0", "--predictor-dir", str(mixed)]
    assert bench_main([*sweep, "--out", str(tmp_path / "sweep")]) == 2
    assert "sampler-amed train --model mnist --solver amed_plugin" in capsys.readouterr().err

    (folders[0] / f"{GRID_FILE_PREFIX}extra.json").write_text(grids[1].read_text())
    assert amed_main(["select", *map(str, folders), *judge, "--out", str(tmp_path / "x")]) == 2
    assert f"{folders[0]}: expected at most one grid card" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_shared_teacher_cache_is_written_whole_and_read_back(tmp_path: Path):
    """Two trainings with one `--teacher-cache`: the first writes its teacher solves (staged and
    renamed into place, so a process sharing the cache never reads half a file), the second reads
    them instead of solving again (the files are not rewritten) and learns the same grid."""
    from bench.amed import main as amed_main

    cache = tmp_path / "teacher"
    args = ["train-schedule", "--method", "gits", "--model", "mnist", "--solver", "ipndm", "--nfe", "3"]
    args += ["--candidates", "6", "--trajectories", "2", "--selection", "2", "--threads", "1", "--quiet"]
    args += ["--teacher-cache", str(cache)]
    assert amed_main([*args, "--out", str(tmp_path / "first")]) == 0
    written = {path.name: path.stat() for path in cache.iterdir()}
    assert written
    assert all(name.startswith("teacher-") and name.endswith(".safetensors") for name in written)
    assert amed_main([*args, "--out", str(tmp_path / "second")]) == 0
    again = {path.name: path.stat() for path in cache.iterdir()}
    assert again.keys() == written.keys()
    assert all(
        (again[name].st_ino, again[name].st_mtime_ns) == (s.st_ino, s.st_mtime_ns) for name, s in written.items()
    )
    (first,), (second,) = (list((tmp_path / name).glob("*.json")) for name in ("first", "second"))
    assert read_grid(second).sigmas == read_grid(first).sigmas


@contextlib.contextmanager
def _serving_mnist_with(folder: Path) -> Iterator[Any]:
    """A real server on loopback serving the session's loaded `mnist` with the artifacts in `folder`."""
    from sampler_service.jobs import ServedModel
    from sampler_service.settings import load_settings
    from tests.test_service import SERVED, RunningServer

    served = SERVED.get(load_settings(None, port=0, device="cpu"))["mnist"]
    mine = {"mnist": ServedModel("mnist", served.model, served.description, predictors=PredictorStore([folder]))}
    running = RunningServer(served=mine, warmup=False)
    try:
        yield running
    finally:
        running.stop()


def _service_resolves_the_grid(folder: Path, card: GridCard) -> None:
    from tests.test_service import request, rpc_error

    with _serving_mnist_with(folder) as running:
        params = {"solver": "ipndm", "nfe": 3, "schedule": "learned"}
        plan = running.stub.Plan(request(**params, solver_params={"max_order": 2}, schedule_params={"method": "gits"}))
        assert list(plan.sigmas) == pytest.approx(card.sigmas, rel=1e-12)
        assert plan.predictor.required
        assert plan.predictor.available
        assert "learned grid method=gits solver=ipndm" in plan.predictor.key
        result = running.stub.GenerateUnary(
            request(**params, solver_params={"max_order": 2}, schedule_params={"method": "gits"}, seeds=[1])
        )
        assert list(result.plan.sigmas) == pytest.approx(card.sigmas, rel=1e-12)
        missing = request(**params, solver_params={"max_order": 2}, schedule_params={"method": "ld3"})
        plan = running.stub.Plan(missing)
        assert plan.predictor.required
        assert not plan.predictor.available
        assert "sampler-amed train-schedule --method ld3 --model mnist --solver ipndm" in plan.predictor.train_command
        error = rpc_error(lambda: running.stub.GenerateUnary(missing))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "learned grid method=ld3 solver=ipndm" in error.details()
        assert "train-schedule --method ld3" in error.details()
        unnamed = running.stub.Plan(request(**params, solver_params={"max_order": 2}))  # the only method stored
        assert "learned grid method=gits solver=ipndm" in unnamed.predictor.key
        assert unnamed.predictor.available
        assert list(unnamed.sigmas) == pytest.approx(card.sigmas, rel=1e-12)


def test_amed_plugin_trains_and_samples_on_a_learned_grid(tmp_path: Path, capsys):
    """AMED on a learned grid (tiny): the plugin's grid is learned with the neutral predictor, its
    predictor is then trained on that grid (`train --schedule learned`), and a sweep row of the
    plugin on the learned schedule finds both by key."""
    from bench.__main__ import main as bench_main
    from bench.amed import main as amed_main

    out = tmp_path / "artifacts"
    plugin = ["--solver", "amed_plugin", "--nfe", "3", "--afs", "--threads", "1", "--out", str(out), "--quiet"]
    args = ["train-schedule", "--method", "gits", "--model", "mnist", "--solver-params", '{"base": "ipndm"}']
    assert amed_main([*args, *plugin, "--candidates", "5", "--trajectories", "2", "--selection", "2"]) == 0
    (grid_path,) = out.glob("grid-*.json")
    grid = read_grid(grid_path)
    assert (grid.solver, grid.solver_params["base"], grid.steps) == ("amed_plugin", "ipndm", 2)
    train = ["train", "--model", "mnist", "--schedule", "learned", "--schedule-params", '{"method": "gits"}']
    assert amed_main([*train, *plugin, "--trajectories", "4", "--batch-size", "4", "--grid-dir", str(out)]) == 0
    store = PredictorStore([out])
    (key,) = store.keys()
    assert (key.schedule, key.schedule_params, key.nfe) == ("learned", '{"method":"gits"}', 3)
    assert (key.sigma_max, key.sigma_min) == (grid.sigmas[0], grid.sigmas[-1])

    # seeds trained apart on the grid, then `select --grid-dir`: the scores `train --seeds` gives
    tiny = [*train, *plugin[:-3], "--trajectories", "4", "--batch-size", "4", "--grid-dir", str(out)]
    judge = ["--selection", "2", "--selection-teacher-steps", "4"]
    assert amed_main([*tiny, *judge, "--seeds", "0,1", "--out", str(tmp_path / "both"), "--quiet"]) == 0
    for seed in (0, 1):
        assert amed_main([*tiny, "--seed", str(seed), "--out", str(tmp_path / f"s{seed}"), "--quiet"]) == 0
    select = ["select", str(tmp_path / "s0"), str(tmp_path / "s1"), *judge, "--out", str(tmp_path / "picked")]
    assert amed_main([*select, "--grid-dir", str(out)]) == 0
    ((both_path,), (picked_path,)) = ((tmp_path / d).glob("*.json") for d in ("both", "picked"))
    both, picked = (read_card(p).training["selection"] for p in (both_path, picked_path))
    assert picked["held_out_rmse"] == both["held_out_rmse"]
    assert picked["chosen_seed"] == both["chosen_seed"]
    capsys.readouterr()
    assert amed_main(select) == 2  # without the grid: refused with the command that trains it
    assert "train-schedule --method gits" in capsys.readouterr().err

    # the joint option: LD3 from that grid through the trained predictor (one epoch, tiny)
    (card_path,) = store.cards.values()
    joint = ["train-schedule", "--method", "ld3", "--model", "mnist", "--solver-params", '{"base": "ipndm"}']
    joint += ["--trajectories", "2", "--batch-size", "2", "--epochs", "1", "--selection", "2", "--teacher-steps", "4"]
    through = [*joint, *plugin[:-3], "--out", str(tmp_path / "joint"), "--init-grid", str(grid_path)]
    assert amed_main([*through, "--predictor", str(card_path)]) == 0
    (joint_path,) = (tmp_path / "joint").glob("grid-*.json")
    joint_card = read_grid(joint_path)
    assert joint_card.training["through_predictor"]["card"] == card_path.name
    assert (joint_card.training["init_grid"], joint_card.training["initial_sigmas"]) == (grid_path.name, grid.sigmas)
    assert joint_card.training["init_grid_training"] == grid.training  # the training it continues, kept
    score = ["score-grids", f"sequential={grid_path}", f"joint={joint_path}", "--predictor", str(card_path)]
    assert amed_main([*score, "--num", "2", "--teacher-steps", "4", "--out", str(tmp_path / "score")]) == 0
    scored = json.loads((tmp_path / "score" / "results.json").read_text())["rows"]
    assert [(r["label"], r["method"], r["through_predictor"]) for r in scored] == [
        ("sequential", "gits", False),
        ("joint", "ld3", True),
    ]
    assert all(r["rmse_teacher"] > 0 and r["predictor"] == card_path.name for r in scored)
    wrong = [*through[: through.index("--nfe") + 1], "5", *through[through.index("--nfe") + 2 :]]
    capsys.readouterr()
    assert amed_main([*wrong, "--predictor", str(card_path)]) == 2
    assert f"--predictor {card_path}: nfe=3, expected 5" in capsys.readouterr().err

    sweep = ["fd-vs-nfe", "--solvers", "amed_plugin", "--nfe", "3", "--afs", "--schedule", "learned"]
    sweep += ["--schedule-params", '{"method": "gits"}', "--num-samples", "16", "--batch-size", "16"]
    sweep += ["--reference-steps", "4", "--reference-check", "4", "--bootstrap", "0", "--device", "cpu", "--grid", "0"]
    sweep += ["--predictor-dir", str(out), "--out", str(tmp_path / "sweep")]
    with pytest.warns(UserWarning, match="feature dimensions"):
        assert bench_main(sweep) == 0
    (row,) = json.loads((tmp_path / "sweep" / "results.json").read_text())["rows"]
    assert (row["schedule"], row["solver"], row["predictor_trajectories"]) == ("learned", "amed_plugin", 4)
    assert row["rmse_ref"] > 0
