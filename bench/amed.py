"""`sampler-amed`: train and list AMED predictors for a model (the loop itself is solvers/amed).

    sampler-amed train --model mnist --solver amed_plugin --base ipndm --nfe 5 --schedule polynomial --afs
    sampler-amed train --model mnist --solver amed --nfe 5 --schedule time_uniform --afs
    sampler-amed train-schedule --method gits --model mnist --solver ipndm --solver-params '{"max_order": 2}' --nfe 5
    sampler-amed train-schedule --method ld3 --model mnist --solver unipc --nfe 4 --afs
    sampler-amed list --model mnist

Recipes (the paper's): AMED-Solver with a Heun teacher and M = 1 substep between student points;
the plugin with its own base solver as teacher and M = 2 (`--teacher`, `--teacher-substeps`
override). The teacher runs the same schedule with (M + 1) S steps from the same noise, without
AFS. The budget is the official code's: 10,112 trajectories at 128 per Adam step (79 steps per
interval), heads initialised at random (r near, not exactly, 1/2). Trajectory k uses noise seed
`2**40 + seed * 1000003 + k` (never a benchmark's seed) and, for a class-conditional model, label
k mod 10. With several `--seeds`, each is trained and the one with the lowest RMSE against a
Heun-64 teacher on held-out noises `2**43 + k` (disjoint from training, grids and benchmarks) is
kept; the card records every seed's score.

Artifacts go to `--out` (default: the model's own `amed/` folder for built-in models, which the
service reads): `<name>.safetensors` and `<name>.json` (the card: model and fingerprint, solver,
base, NFE, schedule with its parameters and sigma range, AFS, guidance, training settings, loss
per interval, wall time, device, provenance).

`train-schedule` learns a `learned` schedule's grid (solvers/learned): GITS or LD3 for one
solver with its parameters, NFE, AFS and guidance. Its noises are disjoint from the predictors'
and every benchmark's: training trajectory k uses seed `2**41 + seed * 1000003 + k`, held-out
selection (which GITS coefficient, which LD3 epoch) `2**42 + seed * 1000003 + k`. It writes
`grid-<method>-<solver>...json` (the sigmas and a card: command, revision, teacher, seeds,
losses, cost) beside the predictors; `select-grid` keeps the best of one key's grids trained apart
(one per `--seed`) on the predictors' held-out noises. An AMED plugin's grid is learned with the untrained
(neutral, r = 1/2) predictor; train its predictor on the grid afterwards with
`train --schedule learned --schedule-params '{"method": "gits"}'`. Where one key has grids of both
methods, `rank-grids` scores them on held-out noise and writes the folder's ranking, which picks
the grid for a request that names no method.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import models
import provenance
import solvers
from solvers.amed import (
    BASES,
    HEAD_INITS,
    MULTISTEP,
    RECIPE_BATCH_SIZE,
    RECIPE_TRAJECTORIES,
    SELECTION_SEED_BASE,
    AMEDPluginParams,
    AMEDPredictor,
    IntervalUpdate,
    PredictorCard,
    PredictorConfig,
    PredictorStore,
    TrainedGrid,
    TrainingSettings,
    TrainingSummary,
    load_predictor,
    new_card,
    new_predictor,
    predictor_key,
    read_card,
    save_predictor,
    train_predictor,
)
from solvers.errors import MissingGridError
from solvers.learned import (
    ANY_METHOD,
    GRID_FILE_PREFIX,
    GRID_SELECTION_SEED_BASE,
    GRID_TRAINING_SEED_BASE,
    RANKING_FILE,
    GridCard,
    GridKey,
    GridLoadError,
    GridRanking,
    RankedGrid,
    RankingEntry,
    grid_key,
    read_grid,
    save_grid,
    save_ranking,
)
from solvers.learned.gits import (
    GITSSettings,
    candidate_grid,
    cost_matrix,
    dynamic_program,
    teacher_trajectories,
    train_gits,
)
from solvers.learned.ld3 import LD3Result, LD3Settings, train_ld3
from solvers.learned.search import OPTIMIZERS, SearchSettings, search_grid
from solvers.learned.student import Student, Teacher, rmse

from .errors import BenchError

DEFAULT_TEACHER = {base: base for base in BASES}  # the plugin's recipe: its own base as teacher


def predictor_folder(model: models.Model, source: str) -> Path:
    """Where a model's predictors live by default: `<model folder>/amed/`."""
    return models.loading.find_files(source).root / "amed"


def artifact_name(card: PredictorCard) -> str:
    base = f"-{card.base}{card.base_max_order or ''}" if card.base else ""
    afs = "afs" if card.afs else "noafs"
    return f"{card.solver}{base}-nfe{card.nfe}-{card.schedule}-{afs}-w{card.guidance:g}"


def _teacher(args: argparse.Namespace, plugin: AMEDPluginParams | None) -> tuple[str, dict[str, Any], int]:
    if plugin is None:
        name, substeps = args.teacher or "heun", 1
    else:
        name = args.teacher or DEFAULT_TEACHER[plugin.base]
        if args.teacher is None and plugin.base == "dpmpp_2m" and plugin.order_limit() == 3:
            name = "dpmpp_3m"
        substeps = 2
    params: dict[str, Any] = {}
    if plugin is not None and plugin.base in ("ipndm", "ipndm_v") and name == plugin.base:
        params = {"max_order": plugin.order_limit()}
    return name, params, args.teacher_substeps if args.teacher_substeps is not None else substeps


def _conditioning(
    model: models.Model, prompts: Sequence[str], guidance: float
) -> Callable[[Sequence[int]], solvers.Denoiser]:
    """The training denoiser of a batch of seeds: seed % classes as the label of a class-conditional
    model (the null class excluded), prompts[seed % len(prompts)] for a text-to-image one."""
    if isinstance(model, models.TextToImageModel):
        return lambda seeds: model.conditioned([prompts[seed % len(prompts)] for seed in seeds], None, guidance)
    class_model = model
    class_model.unet.requires_grad_(False)
    classes = class_model.null_class if class_model.null_class is not None else class_model.num_class_embeds

    def conditioned(seeds: Sequence[int]) -> solvers.Denoiser:
        if classes is None:
            return class_model.conditioned()
        labels = torch.tensor([seed % classes for seed in seeds], device=class_model.device)
        return class_model.conditioned(labels, guidance)

    return conditioned


def _start(args: argparse.Namespace) -> tuple[dict[str, Any], models.Model]:
    """A command's start: torch's threads, the run's provenance (taken first: the code and tree this
    run executes) and the model, a load error as a BenchError."""
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = provenance.collect({k: v for k, v in vars(args).items() if k != "handler"})
    try:
        model = models.load(args.model, device=args.device)
    except models.ModelError as error:
        raise BenchError(str(error)) from None
    return meta, model


def train(args: argparse.Namespace) -> int:
    if args.trajectories < 0:
        raise BenchError(f"--trajectories {args.trajectories}: expected 0 (the untrained predictor) or more")
    if args.batch_size < 1:
        raise BenchError(f"--batch-size {args.batch_size}: expected 1 or more")
    meta, model = _start(args)
    if isinstance(model, models.TextToImageModel):
        if not args.prompt:
            raise BenchError(f"--model {args.model} is text-to-image: give training prompts with --prompt (repeatable)")
    elif args.prompt:
        raise BenchError(f"--prompt: model {args.model} is class-conditional (it trains on its labels)")
    spec = solvers.SOLVERS.get(args.solver)
    if not spec.needs_predictor:
        raise BenchError(f"--solver {args.solver}: expected amed or amed_plugin")
    params = spec.parse_params(
        {"base": args.base, "max_order": args.base_max_order} if args.solver == "amed_plugin" else {}
    )
    plugin = params if isinstance(params, AMEDPluginParams) else None
    steps = spec.require_steps_for_nfe(args.nfe, args.afs, params)
    if args.objective == "trajectory" and (plugin is None or plugin.base not in MULTISTEP):
        raise BenchError(
            f"--objective trajectory: only for multistep students (--solver amed_plugin --base {', '.join(MULTISTEP)})"
        )
    teacher, teacher_params, substeps = _teacher(args, plugin)
    schedule_spec = solvers.SCHEDULES.get(args.schedule)
    schedule_params = schedule_spec.parse_params(args.schedule_params)

    def grid(count: int) -> torch.Tensor:
        return solvers.build_sigmas(
            args.schedule,
            count,
            sigma_min=model.sigma_min,
            sigma_max=model.sigma_max,
            sigma_levels=model.sigma_levels,
            params=schedule_params,
        )

    # The student's run as sampling will run it: its grid and the predictor's key come from this plan
    # (a learned coarse grid: the teacher subdivides each interval geometrically).
    plan, found = _student_plan(
        model,
        args.model,
        args.grid_dir,
        solver=args.solver,
        params=params,
        steps=steps,
        schedule=args.schedule,
        schedule_params=schedule_params,
        nfe=args.nfe,
        afs=args.afs,
        guidance=args.guidance,
    )
    sigmas = plan.sigmas
    teacher_sigmas = subdivide(sigmas, substeps + 1) if found is not None else grid((substeps + 1) * steps)
    conditioned = _conditioning(model, args.prompt, args.guidance)

    feature_shape = None
    if not args.table:
        probe = conditioned([0])
        if not isinstance(probe, solvers.FeatureDenoiser):
            raise BenchError(f"--model {args.model} gives no bottleneck feature: train a table predictor (--table)")
        with torch.no_grad():
            x = torch.zeros(1, *model.sample_shape, device=model.device)
            _, feature = probe.denoise_with_feature(x, torch.full((1,), sigmas[1].item(), device=model.device))
        feature_shape = (int(feature.shape[1]), int(feature.shape[2]))
    config = PredictorConfig(feature_shape=feature_shape, dc=args.dc, da=args.da)
    init = "neutral" if args.trajectories == 0 else args.init  # 0 trajectories: the untrained baseline

    def make_batch(seeds: Sequence[int]) -> tuple[solvers.Denoiser, torch.Tensor]:
        return conditioned(seeds), solvers.make_noise(seeds, model.sample_shape, device=model.device)

    def train_seed(seed: int) -> tuple[AMEDPredictor, TrainingSettings, TrainingSummary]:
        predictor = new_predictor(config, seed, init=init).to(model.device)
        settings = TrainingSettings(
            trajectories=args.trajectories,
            batch_size=args.batch_size,
            lr=args.lr,
            teacher=teacher,
            teacher_params=teacher_params,
            teacher_substeps=substeps,
            seed=seed,
            init=init,
            objective=args.objective,
        )
        batches = -(-args.trajectories // args.batch_size)
        bar = tqdm(total=batches, desc=f"{args.solver} NFE {args.nfe} seed {seed}", unit="batch", disable=args.quiet)

        def on_batch(_index: int, losses: list[float]) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses):.4g}")

        try:
            summary = train_predictor(
                predictor,
                update=IntervalUpdate.of(args.solver, params),
                sigmas=sigmas,
                teacher_sigmas=teacher_sigmas,
                afs=args.afs,
                make_batch=make_batch,
                settings=settings,
                on_batch=on_batch,
            )
        except ValueError as error:
            raise BenchError(f"--schedule {args.schedule}: {error}") from None
        finally:
            bar.close()
        return predictor, settings, summary

    runs = [train_seed(seed) for seed in args.seeds]
    chosen = 0
    selection: dict[str, Any] = {}
    if len(runs) > 1:  # keep the best on held-out noise (disjoint from training, grids and benchmarks)
        chosen, selection = _select(
            args,
            model,
            conditioned,
            [Student(spec, params, args.afs, predictor) for predictor, _, _ in runs],
            [sigmas] * len(runs),
            args.seeds,
            [summary.wall_seconds for _, _, summary in runs],
        )
    predictor, settings, summary = runs[chosen]
    card = new_card(
        plan,
        model=model.name,
        model_fingerprint=model.fingerprint,
        guidance=args.guidance,
        config=config,
        grid=_trained_on(found),
        training={
            **settings.as_dict(),
            **summary.as_dict(),
            **selection,
            "parameters": sum(p.numel() for p in predictor.parameters()),
            "command": meta["command"],
            "git": meta.get("git"),
            "versions": meta.get("versions"),
            "host": meta.get("device"),
        },
    )
    expected = predictor_key(plan, model_fingerprint=model.fingerprint, guidance=args.guidance)
    assert card.key() == expected  # what the service will look up
    out = args.out if args.out is not None else predictor_folder(model, args.model)
    weights, card_path = save_predictor(predictor, card, out / artifact_name(card))
    loss = ", ".join(f"{v:.4g}" for v in summary.final_loss)
    print(
        f"trained {card_path.stem}: loss per interval {loss} (first batch "
        f"{', '.join(f'{v:.4g}' for v in summary.first_loss)}), {summary.trajectories} trajectories, "
        f"{summary.wall_seconds:.1f} s on {summary.device}; wrote {weights} and {card_path}",
        file=sys.stderr,
    )
    return 0


def _student_plan(
    model: models.Model,
    source: str,
    grid_dirs: Sequence[Path],
    *,
    solver: str,
    params: solvers.Params,
    steps: int,
    schedule: str,
    schedule_params: solvers.Params,
    nfe: int,
    afs: bool,
    guidance: float,
    grid_file: Path | None = None,
) -> tuple[solvers.SamplingPlan, tuple[Path, GridCard] | None]:
    """The plan a predictor is trained and selected on, and its learned grid (None on a designed
    schedule): the card at `grid_file` when given, else the grid found by its key in `grid_dirs`,
    then the model's own folder (with no method named, the one sampling would pick: the plan's key
    then names it)."""
    learned_grid = None
    found: tuple[Path, GridCard] | None = None
    if solvers.SCHEDULES.get(schedule).needs_grid:
        store = PredictorStore([*grid_dirs, predictor_folder(model, source)])
        wanted = store.resolve_grid(
            grid_key(
                model_fingerprint=model.fingerprint,
                solver=solver,
                solver_params=params.model_dump(),
                method=schedule_params.model_dump()["method"] or ANY_METHOD,
                nfe=nfe,
                afs=afs,
                guidance=guidance,
            )
        )
        if grid_file is not None:  # a candidate's own grid (select): of the same key
            try:
                card = read_grid(grid_file)
            except GridLoadError as error:
                raise BenchError(str(error)) from None
            if card.key() != wanted:
                raise BenchError(f"{grid_file}: a grid for {card.key().describe()}, not {wanted.describe()}")
            found = (grid_file, card)
        else:
            found = store.grid_card(wanted, source)
        learned_grid = torch.tensor(found[1].sigmas, dtype=torch.float64)
        schedule_params = schedule_params.model_copy(update={"method": wanted.method})
    plan = solvers.plan(
        solver,
        steps=steps,
        schedule=schedule,
        schedule_params=schedule_params,
        solver_params=params,
        afs=afs,
        sigma_min=model.sigma_min,
        sigma_max=model.sigma_max,
        sigma_levels=model.sigma_levels,
        grid=learned_grid,
    )
    return plan, found


def _trained_on(found: tuple[Path, GridCard] | None) -> TrainedGrid | None:
    """What a predictor card records of the learned grid it was trained (or chosen) on."""
    if found is None:
        return None
    path, card = found
    return TrainedGrid(file=path.name, method=card.method, solver_params=card.solver_params, sigmas=card.sigmas)


def _select(
    args: argparse.Namespace,
    model: models.Model,
    conditioned: Callable[[Sequence[int]], solvers.Denoiser],
    students: Sequence[Student],
    sigmas: Sequence[torch.Tensor],
    seeds: Sequence[int],
    wall_seconds: Sequence[float],
    labels: Sequence[str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Which of several candidates trained apart (one per training seed: a predictor, or a grid)
    has the lowest RMSE against a Heun teacher on held-out noises `SELECTION_SEED_BASE + k`, and
    the record of it for the card. Candidate i runs `students[i]` on `sigmas[i]`; `labels` name the
    candidates in the printed line (default: their seeds)."""
    noises = list(range(SELECTION_SEED_BASE, SELECTION_SEED_BASE + args.selection))
    judge = Teacher(steps=args.selection_teacher_steps)
    denoiser = conditioned(noises)
    noise = solvers.make_noise(noises, model.sample_shape, device=model.device)
    payload = {"teacher": judge.as_dict(), "seeds": noises}
    target = _cached(
        args.teacher_cache,
        model,
        args.guidance,
        "finals",
        payload,
        lambda: [judge.final(denoiser, noise * model.sigma_max)],
    )[0]
    scores = []
    for student, grid in zip(students, sigmas, strict=True):
        with torch.no_grad():
            scores.append(rmse(student.run(denoiser, noise * grid[0].item(), grid), target))
    chosen = min(range(len(students)), key=scores.__getitem__)
    names = list(labels) if labels is not None else [f"seed {seed}" for seed in seeds]
    listed = ", ".join(f"{name}: {v:.4f}" for name, v in zip(names, scores, strict=True))
    print(f"held-out rmse against {judge.solver}-{judge.steps}: {listed}; keeping {names[chosen]}", file=sys.stderr)
    return chosen, {
        "selection": {
            "seeds": list(seeds),
            "held_out_rmse": [round(v, 6) for v in scores],
            "chosen_seed": seeds[chosen],
            "spread": [round(min(scores), 6), round(max(scores), 6)],
            "first_noise_seed": SELECTION_SEED_BASE,
            "noises": args.selection,
            "judge": judge.as_dict(),
            "wall_seconds_all_seeds": round(sum(wall_seconds), 2),
        }
    }


def _candidates_model(
    args: argparse.Namespace, command: str, noun: str, found: Sequence[tuple[Path, PredictorCard | GridCard]]
) -> models.Model:
    """`select` and `select-grid`: the model the candidates were trained for, once they are checked
    to be two or more, distinct, and of one key for that model (else BenchError naming the file)."""
    if len(found) < 2:
        raise BenchError(f"{command}: give two or more candidates")
    if len({path.resolve() for path, _ in found}) != len(found):
        raise BenchError(f"{command}: a candidate {noun} is given twice")
    first = found[0][1]
    for path, card in found[1:]:
        if card.key() != first.key():
            raise BenchError(f"{path}: trained for {card.key().describe()}, not {first.key().describe()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = models.load(args.model, device=args.device)
    except models.ModelError as error:
        raise BenchError(str(error)) from None
    if first.model_fingerprint != model.fingerprint:
        raise BenchError(f"--model {args.model}: fingerprint differs from the candidates' {first.model}")
    return model


def _candidate_plan(
    args: argparse.Namespace, model: models.Model, card: PredictorCard, grid_file: Path | None
) -> tuple[solvers.SamplingPlan, tuple[Path, GridCard] | None]:
    """The plan a predictor candidate of `select` runs on: its own grid (`grid_file`), else the
    grid `train` would find by its key (`--grid-dir`, then the model's folder); refused where that
    grid is not the one its card says it was trained on, or its key is not the card's."""
    spec = solvers.SOLVERS.get(card.solver)
    # The card keeps the plugin's order limit; a grid is keyed by the parameters it was trained with,
    # which leave max_order out when it is the base's default: both spellings are tried, in turn.
    forms = [{"base": card.base, "max_order": card.base_max_order}] if card.base else [{}]
    if card.base and spec.parse_params({"base": card.base}).order_limit() == card.base_max_order:
        forms.append({"base": card.base})
    for index, form in enumerate(forms):
        try:
            plan, found = _student_plan(
                model,
                args.model,
                args.grid_dir,
                solver=card.solver,
                params=spec.parse_params(form),
                steps=card.steps,
                schedule=card.schedule,
                schedule_params=solvers.SCHEDULES.get(card.schedule).parse_params(card.schedule_params),
                nfe=card.nfe,
                afs=card.afs,
                guidance=card.guidance,
                grid_file=grid_file,
            )
            break
        except (MissingGridError, BenchError):
            if index == len(forms) - 1:
                raise
    expected = predictor_key(plan, model_fingerprint=model.fingerprint, guidance=card.guidance)
    if card.key() != expected:  # a learned grid whose end points are not the ones it was trained on
        raise BenchError(
            f"select: the candidates are for {card.key().describe()}, the grid found gives {expected.describe()}"
        )
    if card.grid is not None and found is not None and card.grid.sigmas != found[1].sigmas:
        raise BenchError(
            f"select: the predictor for {card.key().describe()} was trained on the grid {card.grid.file}, "
            f"not on {found[0]} (other sigmas)"
        )
    return plan, found


def select(args: argparse.Namespace) -> int:
    """The best of predictors trained apart (one per seed, e.g. in parallel processes) for one key,
    chosen and recorded exactly as `train --seeds` does, written to --out. On a learned schedule a
    candidate folder may also hold the grid its predictor was trained on (one grid per grid seed,
    a predictor trained on each): every candidate runs on its own grid, and where any has one, the
    kept candidate's grid is written too, with the record of the choice (as `select-grid` keeps)."""
    found: list[tuple[Path, PredictorCard]] = []
    grid_files: list[Path | None] = []
    for folder in args.candidates:
        jsons = sorted(Path(folder).glob("*.json"))
        cards = [path for path in jsons if not path.name.startswith(GRID_FILE_PREFIX)]
        grids = [path for path in jsons if path.name.startswith(GRID_FILE_PREFIX)]
        if len(cards) != 1:
            raise BenchError(f"{folder}: expected one predictor card, found {len(cards)}")
        if len(grids) > 1:
            raise BenchError(f"{folder}: expected at most one grid card ({GRID_FILE_PREFIX}*.json), found {len(grids)}")
        found.append((cards[0], read_card(cards[0])))
        grid_files.append(grids[0] if grids else None)
    model = _candidates_model(args, "select", "folder", found)
    first = found[0][1]
    if any(grid_files) and not solvers.SCHEDULES.get(first.schedule).needs_grid:
        raise BenchError(f"select: a candidate holds a grid, but the predictors are for schedule {first.schedule}")
    planned = [_candidate_plan(args, model, card, grid) for (_, card), grid in zip(found, grid_files, strict=True)]
    seeds = [int(card.training.get("seed", 0)) for _, card in found]
    spec = solvers.SOLVERS.get(first.solver)
    students = [
        Student(spec, plan.params, first.afs, load_predictor(path, model.device)[0])
        for (path, _), (plan, _) in zip(found, planned, strict=True)
    ]
    walls = [float(card.training.get("wall_seconds", 0.0)) for _, card in found]
    conditioned = _conditioning(model, [], first.guidance)
    labels = [f"{folder} (seed {seed})" for folder, seed in zip(args.candidates, seeds, strict=True)]
    sigmas = [plan.sigmas for plan, _ in planned]
    chosen, selection = _select(args, model, conditioned, students, sigmas, seeds, walls, labels)
    record = selection["selection"]
    # candidates may differ in more than the seed (an earlier budget, another init, their grid): say how
    record["candidates"] = [
        {
            "seed": seed,
            "trajectories": card.training.get("trajectories"),
            "batch_size": card.training.get("batch_size"),
            "init": card.training.get("init", "neutral"),
            "held_out_rmse": score,
            **({"grid": {"file": str(grid[0]), "seed": grid[1].training.get("seed", 0)}} if grid else {}),
        }
        for seed, (_, card), (_, grid), score in zip(seeds, found, planned, record["held_out_rmse"], strict=True)
    ]
    path, card = found[chosen]
    kept_grid = planned[chosen][1]
    training = _recorded(card.training, "selection", record)
    best = card.model_copy(update={"grid": _trained_on(kept_grid), "training": training})
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / path.stem
    shutil.copyfile(path.with_suffix(".safetensors"), stem.with_suffix(".safetensors"))
    stem.with_suffix(".json").write_text(best.model_dump_json(indent=1) + "\n", encoding="utf-8")
    print(f"kept {labels[chosen]}: wrote {stem.with_suffix('.json')}", file=sys.stderr)
    # Grids were chosen among too: the kept one goes with its predictor. (A learned schedule, so every
    # candidate ran on a grid.)
    if any(grid_files) and kept_grid is not None:
        ran_on = [grid for _, grid in planned if grid is not None]
        written = save_grid(_grid_chosen(kept_grid[1], record, ran_on, path.name), args.out / kept_grid[0].name)
        print(f"kept its grid {kept_grid[0]}: wrote {written}", file=sys.stderr)
    return 0


def _recorded(training: dict[str, Any], name: str, record: dict[str, Any]) -> dict[str, Any]:
    """`training` with `record` under `name`; a record of an earlier choice that kept this same
    artifact (a shipped one given again as a candidate) moves to `earlier_<name>`, newest first."""
    out = {**training, name: record}
    if name in training:
        out[f"earlier_{name}"] = [training[name], *training.get(f"earlier_{name}", [])]
    return out


def _grid_chosen(
    card: GridCard,
    record: dict[str, Any],
    grids: Sequence[tuple[Path, GridCard]],
    predictor: str,
) -> GridCard:
    """`card` (the kept candidate's grid) with the `seed_selection` record of a choice among
    (grid, predictor) pairs, `grids` being each candidate's: its grid seed, file, sigmas and the
    pair's held-out score."""
    seed_selection = {
        **record,
        "seeds": [grid[1].training.get("seed", 0) for grid in grids],
        "chosen_seed": card.training.get("seed", 0),
        "predictor": predictor,
        "candidates": [
            {
                "seed": grid[1].training.get("seed", 0),
                "file": grid[0].name,
                "init": grid[1].training.get("init"),
                "trajectories": grid[1].training.get("trajectories"),
                "epochs": grid[1].training.get("epochs"),
                "own_selection_rmse": grid[1].training.get("loss"),
                "held_out_rmse": candidate["held_out_rmse"],
                "sigmas": grid[1].sigmas,
                "predictor_seed": candidate["seed"],
                "predictor_trajectories": candidate["trajectories"],
            }
            for grid, candidate in zip(grids, record["candidates"], strict=True)
        ],
    }
    return card.model_copy(update={"training": _recorded(card.training, "seed_selection", seed_selection)})


def _grid_candidate(given: Path) -> Path:
    """A grid card named directly, or the only one in a folder (one folder per seed)."""
    if given.is_dir():
        cards = sorted(given.glob(f"{GRID_FILE_PREFIX}*.json"))
        if len(cards) != 1:
            raise BenchError(f"{given}: expected one grid card ({GRID_FILE_PREFIX}*.json), found {len(cards)}")
        return cards[0]
    return given


def select_grid(args: argparse.Namespace) -> int:
    """The best of grids trained apart (one per seed) for one key, chosen on the noises and judge
    that choose among predictors' seeds (`2**43 + k`, Heun-64): no grid was trained or selected on
    them (grids use `2**41 + ...` and `2**42 + ...`), and neither was any benchmark row."""
    found: list[tuple[Path, GridCard]] = []
    for given in args.candidates:
        path = _grid_candidate(given)
        try:
            found.append((path, read_grid(path)))
        except GridLoadError as error:
            raise BenchError(str(error)) from None
    model = _candidates_model(args, "select-grid", "grid", found)
    first = found[0][1]
    student = Student.of(first.solver, first.solver_params, first.afs)
    if student.spec.needs_predictor:
        raise BenchError(
            f"select-grid: {first.solver}'s grids are scored through the predictor trained on each; "
            "train one per grid and choose with `select --grid-dir`"
        )
    seeds = [int(card.training.get("seed", 0)) for _, card in found]
    labels = [f"{path} (seed {seed})" for (path, _), seed in zip(found, seeds, strict=True)]
    judged = argparse.Namespace(**vars(args), guidance=first.guidance)
    chosen, selection = _select(
        judged,
        model,
        _conditioning(model, [], first.guidance),
        [student] * len(found),
        [torch.tensor(card.sigmas, dtype=torch.float64) for _, card in found],
        seeds,
        [float(card.training.get("wall_seconds", 0.0)) for _, card in found],
        labels,
    )
    record = selection["selection"]
    record["candidates"] = [
        {
            "seed": seed,
            "file": path.name,
            "init": card.training.get("init"),
            "trajectories": card.training.get("trajectories"),
            "epochs": card.training.get("epochs"),
            "own_selection_rmse": card.training.get("loss"),
            "held_out_rmse": score,
            "sigmas": card.sigmas,
        }
        for seed, (path, card), score in zip(seeds, found, record["held_out_rmse"], strict=True)
    ]
    path, card = found[chosen]
    # beside, not over, the training's own `selection` (how many noises chose its epoch)
    best = card.model_copy(update={"training": _recorded(card.training, "seed_selection", record)})
    written = save_grid(best, args.out / path.name)
    print(f"kept {labels[chosen]}: wrote {written}", file=sys.stderr)
    return 0


def _cached(
    cache: Path | None,
    model: models.Model,
    guidance: float,
    kind: str,
    payload: dict[str, Any],
    compute: Callable[[], Sequence[torch.Tensor]],
) -> list[torch.Tensor]:
    """Teacher solves are the same for every solver and NFE: kept in `cache` (--teacher-cache) by
    what defines them (kind, model fingerprint, guidance, payload)."""
    if cache is None:
        return list(compute())
    name = hashlib.sha256(
        json.dumps({"kind": kind, "model": model.fingerprint, "guidance": guidance, **payload}, sort_keys=True).encode()
    ).hexdigest()[:20]
    path = cache / f"teacher-{kind}-{name}.safetensors"
    if path.is_file():
        stored = load_file(str(path))
        return [stored[str(k)].to(model.device) for k in range(len(stored))]
    values = list(compute())
    cache.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: processes sharing the cache never read a half-written file.
    staged = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file({str(k): v.detach().float().cpu().contiguous() for k, v in enumerate(values)}, str(staged))
    os.replace(staged, path)
    return values


def subdivide(sigmas: torch.Tensor, parts: int) -> torch.Tensor:
    """Each interval of `sigmas` cut into `parts` equal steps in log sigma (the end points kept)."""
    log = sigmas.log()
    pieces = [
        torch.exp(log[i] + (log[i + 1] - log[i]) * torch.arange(parts, dtype=torch.float64) / parts)
        for i in range(len(sigmas) - 1)
    ]
    out = torch.cat([*pieces, sigmas[-1:]])
    out[::parts] = sigmas
    return out


def train_schedule(args: argparse.Namespace) -> int:
    meta, model = _start(args)
    conditioned = _conditioning(model, args.prompt, args.guidance)
    spec = solvers.SOLVERS.get(args.solver)
    params = spec.parse_params(args.solver_params)
    predictor, through = _grid_predictor(args, model, spec, params)
    student = Student(spec, params, args.afs, predictor)
    steps = student.steps_for(args.nfe)
    init_card = _init_grid(args, model, spec, params, steps)
    init_sigmas = None if init_card is None else torch.tensor(init_card.sigmas, dtype=torch.float64)

    def make_batch(seeds: Sequence[int]) -> tuple[solvers.Denoiser, torch.Tensor]:
        return conditioned(seeds), solvers.make_noise(seeds, model.sample_shape, device=model.device)

    offset = args.seed * 1_000_003
    first_train, first_select = GRID_TRAINING_SEED_BASE + offset, GRID_SELECTION_SEED_BASE + offset

    def say(text: str) -> None:
        if not args.quiet:
            print(f"[{args.method} {args.solver} NFE {args.nfe}] {text}", file=sys.stderr)

    def cached(kind: str, payload: dict[str, Any], compute: Any) -> list[torch.Tensor]:
        return _cached(args.teacher_cache, model, args.guidance, kind, payload, compute)

    settings: GITSSettings | LD3Settings
    if args.method == "gits":
        settings = GITSSettings(
            candidates=args.candidates,
            trajectories=args.trajectories or 32,
            substeps=args.teacher_substeps if args.teacher_substeps is not None else 1,
            teacher=args.teacher or "heun",
            selection=args.selection,
        )
        gits = settings

        def trajectories(seeds: Sequence[int], fine: torch.Tensor) -> list[torch.Tensor]:
            def compute() -> list[torch.Tensor]:
                denoiser, unit = make_batch(list(seeds))
                return teacher_trajectories(denoiser, unit * fine[0].item(), fine, gits.teacher, gits.substeps)

            payload = {"teacher": gits.teacher, "substeps": gits.substeps, "fine": fine.tolist(), "seeds": list(seeds)}
            return cached("trajectories", payload, compute)

        result: Any = train_gits(
            student,
            args.nfe,
            make_batch,
            settings=settings,
            training_seeds=range(first_train, first_train + settings.trajectories),
            selection_seeds=range(first_select, first_select + settings.selection),
            trajectories=trajectories,
            on_progress=say,
        )
    else:
        settings = LD3Settings(
            trajectories=args.trajectories or 100,
            batch_size=args.batch_size,
            epochs=args.epochs,
            lr=args.lr,
            radius=args.radius,
            init=args.init if args.init_grid is None else "grid",
            teacher=Teacher(solver=args.teacher or "heun", steps=args.teacher_steps),
            selection=args.selection,
        )
        teacher = settings.teacher

        def finals(seeds: Sequence[int]) -> torch.Tensor:
            def compute() -> list[torch.Tensor]:
                parts = []
                for start in range(0, len(seeds), 50):
                    denoiser, unit = make_batch(list(seeds[start : start + 50]))
                    parts.append(teacher.final(denoiser, unit * model.sigma_max))
                return [torch.cat(parts)]

            return cached("finals", {"teacher": teacher.as_dict(), "seeds": list(seeds)}, compute)[0]

        result = train_ld3(
            student,
            args.nfe,
            make_batch,
            settings=settings,
            training_seeds=range(first_train, first_train + settings.trajectories),
            selection_seeds=range(first_select, first_select + settings.selection),
            init_sigmas=init_sigmas,
            teacher_final=finals,
            on_progress=say,
        )
    card = GridCard(
        model=model.name,
        model_fingerprint=model.fingerprint,
        solver=spec.name,
        solver_params=params.model_dump(),
        method=args.method,
        nfe=args.nfe,
        steps=steps,
        afs=args.afs,
        guidance=args.guidance,
        sigmas=result.sigmas.tolist(),
        training={
            **settings.as_dict(),
            **result.as_dict(),
            "seed": args.seed,
            "first_noise_seed": first_train,
            "selection_first_noise_seed": first_select,
            **through,
            # a grid trained on from another keeps that one's record: the training it continues
            **(
                {"init_grid": args.init_grid.name, "init_grid_training": init_card.training}
                if init_card is not None
                else {}
            ),
            "command": meta["command"],
            "git": meta.get("git"),
            "versions": meta.get("versions"),
            "host": meta.get("device"),
            "device": str(model.device),
        },
    )
    out = args.out if args.out is not None else predictor_folder(model, args.model)
    path = save_grid(card, out / f"{card.key().file_stem()}.json")
    print(
        f"learned {path.stem}: sigmas {', '.join(f'{v:.4g}' for v in card.sigmas)}; held-out rmse "
        f"{result.as_dict()['loss']:.5f}; {result.wall_seconds:.1f} s; wrote {path}",
        file=sys.stderr,
    )
    return 0


HAND_DESIGNED = ("polynomial", "logsnr", "time_uniform")


def _grid_predictor(
    args: argparse.Namespace, model: models.Model, spec: solvers.SolverSpec[Any], params: solvers.Params
) -> tuple[AMEDPredictor | None, dict[str, Any]]:
    """The predictor a plugin's grid is learned through, and what the card says of it.

    Without --predictor: the untrained, neutral one (r = 1/2, c = a = 1), the sequential recipe's
    first half. With it (the joint option): a trained predictor, so LD3's loss runs through the
    plugin as it will sample; it must be the plugin's, for this model, NFE, AFS and guidance."""
    if args.predictor is None:
        if not spec.needs_predictor:
            return None, {}
        return new_predictor(PredictorConfig(), args.seed).to(model.device), {}
    if not spec.needs_predictor:
        raise BenchError(f"--predictor: --solver {args.solver} uses no predictor (expected amed_plugin)")
    if args.method != "ld3":
        raise BenchError("--predictor: only with --method ld3 (GITS scores local errors of the neutral step)")
    predictor, card = load_predictor(args.predictor, model.device)
    plugin = params if isinstance(params, AMEDPluginParams) else None
    wanted = {
        "solver": (card.solver, args.solver),
        "base": (card.base, plugin.base if plugin else None),
        "base_max_order": (card.base_max_order, plugin.order_limit() if plugin else None),
        "nfe": (card.nfe, args.nfe),
        "afs": (card.afs, args.afs),
        "guidance": (card.guidance, args.guidance),
        "model_fingerprint": (card.model_fingerprint, model.fingerprint),
    }
    for field, (found, expected) in wanted.items():
        if found != expected:
            raise BenchError(f"--predictor {args.predictor}: {field}={found!r}, expected {expected!r}")
    predictor.requires_grad_(False)  # fixed while the grid moves
    digest = hashlib.sha256(args.predictor.with_suffix(".safetensors").read_bytes()).hexdigest()
    return predictor, {"through_predictor": {"card": args.predictor.name, "weights_sha256": digest}}


def _init_grid(
    args: argparse.Namespace, model: models.Model, spec: solvers.SolverSpec[Any], params: solvers.Params, steps: int
) -> GridCard | None:
    """--init-grid: the stored grid (same solver, NFE and AFS) LD3 starts from (None: --init)."""
    if args.init_grid is None:
        return None
    if args.method != "ld3":
        raise BenchError("--init-grid: only with --method ld3")
    try:
        card = read_grid(args.init_grid)
    except GridLoadError as error:
        raise BenchError(str(error)) from None
    expected = grid_key(
        model_fingerprint=model.fingerprint,
        solver=spec.name,
        solver_params=params.model_dump(),
        method=card.method,
        nfe=args.nfe,
        afs=args.afs,
        guidance=args.guidance,
    )
    if card.key() != expected or card.steps != steps:
        raise BenchError(
            f"--init-grid {args.init_grid}: trained for {card.key().describe()}, not {expected.describe()}"
        )
    return card


def compare_schedules(args: argparse.Namespace) -> int:
    """RMSE against the LD3 teacher (Heun, 64 logsnr steps) of each solver on the hand-designed
    schedules and on every learned grid found for it, on noises disjoint from the grids' training and
    selection and from every benchmark (2**42 + 1000 + k by default): which method moved the number."""
    meta, model = _start(args)
    store = PredictorStore([*args.dir, predictor_folder(model, args.model)])
    seeds, denoiser, noise, teacher, target = _held_out(args, model)
    rows = []
    for name in args.solvers.split(","):
        solver, _, raw = name.partition(":")
        spec = solvers.SOLVERS.get(solver)
        params = spec.parse_params(json.loads(raw) if raw else {})
        student = Student(spec, params, args.afs)
        for nfe in args.nfe:
            steps = spec.steps_for_nfe(nfe, args.afs, params)
            if steps is None:
                continue
            files: dict[str, str] = {}
            grids = {
                schedule: solvers.build_sigmas(
                    schedule, steps, sigma_min=model.sigma_min, sigma_max=model.sigma_max, sigma_levels=None
                )
                for schedule in HAND_DESIGNED
            }
            for method in ("gits", "ld3"):
                key = grid_key(
                    model_fingerprint=model.fingerprint,
                    solver=solver,
                    solver_params=params.model_dump(),
                    method=method,
                    nfe=nfe,
                    afs=args.afs,
                    guidance=args.guidance,
                )
                if store.has_grid(key):
                    grids[f"learned-{method}"] = store.find_grid(key, args.model)
                    files[f"learned-{method}"] = provenance.shown_path(store.grids[key][0])
            for schedule, sigmas in grids.items():
                with torch.no_grad():
                    score = rmse(student.run(denoiser, noise * sigmas[0].item(), sigmas), target)
                rows.append(
                    {
                        "model": args.model,
                        "solver": solver,
                        "solver_params": json.dumps(params.model_dump(), sort_keys=True),
                        "nfe": nfe,
                        "afs": args.afs,
                        "schedule": schedule,
                        "rmse_teacher": score,
                        "sigmas": " ".join(f"{v:.4g}" for v in sigmas.tolist()),
                        "grid": files.get(schedule),
                    }
                )
                print(f"{solver} {raw} NFE {nfe} {schedule:>14}: rmse {score:.4f}", file=sys.stderr)
    meta = {**meta, "teacher": teacher.as_dict(), "seeds": [seeds[0], len(seeds)], "guidance": args.guidance}
    provenance.write_csv(args.out / "results.csv", rows)
    provenance.write_json(args.out / "results.json", meta, rows)
    return 0


def _held_out(
    args: argparse.Namespace, model: models.Model
) -> tuple[list[int], solvers.Denoiser, torch.Tensor, Teacher, torch.Tensor]:
    """The fixed scoring protocol of compare-schedules and score-grids: `--num` noises from
    2**42 + `--seed-offset` (past every grid's selection noises), the teacher's final states on them."""
    seeds = list(
        range(GRID_SELECTION_SEED_BASE + args.seed_offset, GRID_SELECTION_SEED_BASE + args.seed_offset + args.num)
    )
    denoiser = _conditioning(model, args.prompt, args.guidance)(seeds)
    noise = solvers.make_noise(seeds, model.sample_shape, device=model.device)
    teacher = Teacher(steps=args.teacher_steps)
    target = _cached(
        args.teacher_cache,
        model,
        args.guidance,
        "finals",
        {"teacher": teacher.as_dict(), "seeds": seeds},
        lambda: [teacher.final(denoiser, noise * model.sigma_max)],
    )[0]
    return seeds, denoiser, noise, teacher, target


def rank_grids(args: argparse.Namespace) -> int:
    """Score every key's grids where the store holds more than one method (compare-schedules'
    protocol) and write the ranking that picks among them for a request naming no method. A
    plugin's grids are not ranked: their score depends on the predictor trained on each."""
    meta, model = _start(args)
    folder = predictor_folder(model, args.model)
    store = PredictorStore([*args.dir, folder])
    groups: dict[GridKey, list[GridKey]] = {}
    for key in store.grid_keys(model.fingerprint):
        if key.guidance == args.guidance and not solvers.SOLVERS.get(key.solver).needs_predictor:
            groups.setdefault(key.any_method(), []).append(key)
    groups = {group: keys for group, keys in groups.items() if len(keys) > 1}
    if not groups:
        searched = ", ".join(str(path) for path in [*args.dir, folder])
        raise BenchError(f"no key has grids of more than one method to rank (searched {searched})")
    seeds, denoiser, noise, teacher, target = _held_out(args, model)
    entries = []
    for group, keys in sorted(groups.items(), key=lambda item: (item[0].solver, item[0].nfe, item[0].afs)):
        spec = solvers.SOLVERS.get(group.solver)
        params = spec.parse_params(json.loads(group.solver_params))
        ranked = []
        for key in keys:
            path, card = store.grids[key]
            sigmas = torch.tensor(card.sigmas, dtype=torch.float64)
            with torch.no_grad():
                score = rmse(Student(spec, params, card.afs).run(denoiser, noise * sigmas[0].item(), sigmas), target)
            if not math.isfinite(score):
                raise BenchError(f"{path}: its samples diverge on the held-out noises (RMSE {score}): retrain it")
            ranked.append(RankedGrid(method=card.method, file=path.name, sigmas=card.sigmas, rmse=score))
        ranked.sort(key=lambda grid: grid.rmse)
        shown = ", ".join(f"{grid.method} {grid.rmse:.4f}" for grid in ranked)
        print(f"{group.solver} {group.solver_params} NFE {group.nfe} afs={group.afs}: {shown}", file=sys.stderr)
        entries.append(
            RankingEntry(
                solver=group.solver,
                solver_params=params.model_dump(),
                nfe=group.nfe,
                afs=group.afs,
                guidance=group.guidance,
                grids=ranked,
            )
        )
    ranking = GridRanking(
        model=args.model,
        model_fingerprint=model.fingerprint,
        protocol={"teacher": teacher.as_dict(), "seeds": [seeds[0], len(seeds)], "metric": "rmse against the teacher"},
        entries=entries,
        provenance=meta,
    )
    save_ranking(ranking, args.out if args.out is not None else folder / RANKING_FILE)
    return 0


def gits_cost(args: argparse.Namespace) -> int:
    """GITS's cost matrix for one solver on one model, every candidate interval with its cost (the
    mean L2 error of one student interval from the teacher's state), and the path the dynamic
    program picks for `--intervals` at coefficient 1: where along sigma the cost lies."""
    meta, model = _start(args)
    spec = solvers.SOLVERS.get(args.solver)
    student = Student(spec, spec.parse_params(args.solver_params), False)
    settings = GITSSettings(candidates=args.candidates, trajectories=args.trajectories)
    seeds = [GRID_TRAINING_SEED_BASE + k for k in range(args.trajectories)]
    denoiser = _conditioning(model, [], 1.0)(seeds)
    fine = candidate_grid(denoiser, settings)
    unit = solvers.make_noise(seeds, model.sample_shape, device=model.device)
    states = teacher_trajectories(denoiser, unit * fine[0].item(), fine, settings.teacher, settings.substeps)
    cost, _ = cost_matrix(student, denoiser, states, fine)
    path, value = dynamic_program(cost, args.intervals, 1.0)
    rows = [
        {"i": i, "j": j, "sigma_from": float(fine[i]), "sigma_to": float(fine[j]), "cost": float(cost[i, j])}
        for i in range(len(fine))
        for j in range(i + 1, len(fine))
    ]
    sigmas = [float(fine[i]) for i in path]
    print(f"{args.model} {args.solver}: DP path {[round(v, 3) for v in sigmas]}, cost {value:.3f}")
    dp = {"path": path, "sigmas": sigmas, "cost": value}
    meta = {**meta, "settings": settings.as_dict(), "seeds": [seeds[0], len(seeds)], "dp": dp}
    provenance.write_csv(args.out / "results.csv", rows)
    provenance.write_json(args.out / "results.json", meta, rows)
    return 0


def score_grids(args: argparse.Namespace) -> int:
    """Grid files (any folder, not only the store's) scored on compare-schedules' protocol, each row
    with how its grid was trained (method, teacher, trajectories, init, cost): the ablation table.
    A plugin's grid runs with --predictor (trained) or the neutral predictor."""
    meta, model = _start(args)
    seeds, denoiser, noise, teacher, target = _held_out(args, model)
    predictor = None
    if args.predictor is not None:
        predictor = load_predictor(args.predictor, model.device)[0]
    rows = []
    for entry in args.grids:
        label, _, raw = entry.rpartition("=")
        path = Path(raw)
        try:
            card = read_grid(path)
        except GridLoadError as error:
            raise BenchError(str(error)) from None
        if card.model_fingerprint != model.fingerprint:
            raise BenchError(f"{path}: trained for model {card.model}, not --model {args.model}")
        spec = solvers.SOLVERS.get(card.solver)
        params = spec.parse_params(card.solver_params)
        used = predictor if spec.needs_predictor else None
        if spec.needs_predictor and used is None:
            used = new_predictor(PredictorConfig(), 0).to(model.device)
        sigmas = torch.tensor(card.sigmas, dtype=torch.float64)
        with torch.no_grad():
            score = rmse(Student(spec, params, card.afs, used).run(denoiser, noise * sigmas[0].item(), sigmas), target)
        training = card.training
        judge = training.get("teacher")  # LD3: the Teacher's dict; GITS: a solver name
        if not isinstance(judge, dict):  # GITS: (substeps + 1) teacher steps per candidate interval
            steps = int(training.get("candidates", 0)) * (int(training.get("substeps", 0)) + 1)
            judge = {"solver": judge, "steps": steps}
        rows.append(
            {
                "label": label or path.stem,
                "solver": card.solver,
                "solver_params": json.dumps(card.solver_params, sort_keys=True),
                "nfe": card.nfe,
                "afs": card.afs,
                "method": card.method,
                "teacher": f"{judge['solver']}-{judge['steps']}",
                "trajectories": training.get("trajectories"),
                "epochs": training.get("epochs"),
                "init": training.get("init"),
                "through_predictor": bool(training.get("through_predictor")),
                "predictor": args.predictor.name if (spec.needs_predictor and args.predictor) else None,
                "train_wall_seconds": training.get("wall_seconds"),
                "train_network_evals": training.get("network_evals"),
                "selection_rmse": training.get("loss"),
                "rmse_teacher": score,
                "sigmas": " ".join(f"{v:.4g}" for v in card.sigmas),
            }
        )
        print(f"{rows[-1]['label']:>28}: rmse {score:.4f}", file=sys.stderr)
    meta = {**meta, "teacher": teacher.as_dict(), "seeds": [seeds[0], len(seeds)], "guidance": args.guidance}
    provenance.write_csv(args.out / "results.csv", rows)
    provenance.write_json(args.out / "results.json", meta, rows)
    return 0


def fit_oracle_grid(
    student: Student,
    nfe: int,
    make_batch: Callable[[Sequence[int]], tuple[solvers.Denoiser, torch.Tensor]],
    seeds: Sequence[int],
    reference: torch.Tensor,
    init_sigmas: torch.Tensor,
    settings: LD3Settings,
    on_progress: Callable[[str], None] | None = None,
) -> LD3Result:
    """LD3 fitted to a benchmark itself: trained and selected on the very noises it is scored on,
    against the very reference it is scored against, with the pure squared error (no soft ball).

    No grid trained elsewhere can score better on that benchmark than the best this finds (up to
    the optimiser): the bound of grid learning for `student`. Its seeds overlap the benchmark's,
    so such a grid is never stored as an artifact (and the sweep would refuse it)."""
    index = {seed: k for k, seed in enumerate(seeds)}

    def targets(chosen: Sequence[int]) -> torch.Tensor:
        return reference[[index[seed] for seed in chosen]]

    fitted = replace(settings, radius=0.0, trajectories=len(seeds), selection=len(seeds))
    return train_ld3(
        student,
        nfe,
        make_batch,
        settings=fitted,
        training_seeds=seeds,
        selection_seeds=seeds,
        init_sigmas=init_sigmas,
        teacher_final=targets,
        on_progress=on_progress,
    )


def oracle_grid(args: argparse.Namespace) -> int:
    """The oracle bound of grid learning on a sweep's own noises and reference (read from its cache,
    never computed): for each solver, NFE and start, a grid fitted to the benchmark itself (LD3's
    minibatch Adam, or a direct search of the interior nodes on the first --search-samples noises),
    scored exactly as the sweep scores a row (solvers.sample per chunk, per-sample RMSE averaged)."""
    from .sweep import SweepConfig, benchmark_targets

    if args.epochs < 1 or args.batch_size < 1:
        raise BenchError(f"--epochs {args.epochs} --batch-size {args.batch_size}: expected 1 or more each")
    if not 0 <= args.search_samples <= args.num_samples:
        raise BenchError(f"--search-samples={args.search_samples} is out of range: expected 0..{args.num_samples}")
    if args.max_evals < 1 or not args.initial_step > 0:
        raise BenchError(
            f"--max-evals={args.max_evals} --initial-step={args.initial_step} is out of range: expected >= 1 and > 0"
        )
    meta, loaded = _start(args)
    model = models.class_conditional(loaded)
    config = SweepConfig(
        model=args.model,
        solvers=["euler"],
        nfe=[1],
        num_samples=args.num_samples,
        afs=args.afs,
        guidance=args.guidance,
        batch_size=args.chunk,
        seed_base=args.seed_base,
        reference_steps=args.reference_steps,
    )
    seeds, labels, reference = benchmark_targets(config, args.sweep_cache, model)
    reference = reference.to(model.device)
    position = {seed: k for k, seed in enumerate(seeds)}

    def denoiser_of(chosen: Sequence[int]) -> solvers.Denoiser:
        if labels is None:
            return model.conditioned()
        rows = torch.tensor([position[seed] for seed in chosen])
        return model.conditioned(labels[rows].to(model.device), args.guidance)

    def make_batch(chosen: Sequence[int]) -> tuple[solvers.Denoiser, torch.Tensor]:
        return denoiser_of(chosen), solvers.make_noise(list(chosen), model.sample_shape, device=model.device)

    chunks: dict[tuple[int, int], tuple[solvers.Denoiser, torch.Tensor]] = {}

    def score(spec: solvers.SolverSpec[Any], params: solvers.Params, sigmas: torch.Tensor, count: int = 0) -> float:
        """The sweep's rmse_ref of this grid: chunk by chunk, as the rows are sampled; on the first
        `count` noises only when count > 0 (a search's objective, sampled 50 at a time: on one CPU
        thread that is 25% faster than 250 and the same per-sample errors up to float rounding).
        Chunks are built once: a search scores the same ones hundreds of times."""
        errors = []
        total = count or len(seeds)
        size = min(args.chunk, 50) if count else args.chunk
        for start in range(0, total, size):
            span = (start, min(start + size, total))
            if span not in chunks:
                chunks[span] = make_batch(seeds[span[0] : span[1]])
            denoiser, noise = chunks[span]
            chunk = seeds[span[0] : span[1]]
            with torch.inference_mode():
                images = solvers.sample(
                    denoiser,
                    noise,
                    solver=spec.name,
                    steps=len(sigmas) - 1,
                    schedule="learned",
                    solver_params=params,
                    afs=args.afs,
                    grid=sigmas,
                ).images.float()
            target = reference[start : start + len(chunk)]
            errors.append((images - target).flatten(1).pow(2).mean(1).sqrt().cpu())
        return float(torch.cat(errors).mean())

    store = PredictorStore([predictor_folder(model, args.model)])
    students = []
    for name in args.solvers.split(","):
        solver, _, raw = name.partition(":")
        spec = solvers.SOLVERS.get(solver)
        students.append((raw, Student(spec, spec.parse_params(json.loads(raw) if raw else {}), args.afs)))

    def start_grid(init: str, student: Student, nfe: int) -> torch.Tensor | None:
        """The starting grid: the store's LD3 grid for this key ("shipped"; None when there is none)
        or a hand-designed schedule."""
        if init != "shipped":
            return solvers.build_sigmas(
                init, student.steps_for(nfe), sigma_min=model.sigma_min, sigma_max=model.sigma_max, sigma_levels=None
            )
        key = grid_key(
            model_fingerprint=model.fingerprint,
            solver=student.spec.name,
            solver_params=student.params.model_dump(),
            method="ld3",
            nfe=nfe,
            afs=args.afs,
            guidance=args.guidance,
        )
        return store.find_grid(key, args.model) if store.has_grid(key) else None

    meta = {
        **meta,
        "protocol": "fitted to the scored noises and reference: a bound, never a shipped grid",
        "seeds": [seeds[0], len(seeds)],
        "reference": f"heun {args.reference_steps} steps logsnr (the sweep's, read from {args.sweep_cache})",
        "guidance": args.guidance,
    }
    rows: list[dict[str, Any]] = []
    # NFE, then start, then solver: every solver's fit from the shipped grid comes before any restart
    for nfe in args.nfe:
        for init in args.init.split(","):
            for raw, student in students:
                spec, params, solver = student.spec, student.params, student.spec.name
                sigmas = start_grid(init, student, nfe)
                if sigmas is None:
                    print(f"{solver} {raw} NFE {nfe}: no shipped LD3 grid, skipped", file=sys.stderr)
                    continue
                cpu = time.process_time()
                before = score(spec, params, sigmas)
                print(f"{solver} {raw} NFE {nfe} from {init}: rmse {before:.4f}", file=sys.stderr, flush=True)
                common = {
                    "solver": solver,
                    "solver_params": json.dumps(params.model_dump(), sort_keys=True),
                    "nfe": nfe,
                    "afs": args.afs,
                    "init": init,
                    "optimizer": args.optimizer,
                    "init_rmse": before,
                }
                if args.optimizer == "adam":
                    row, found, seconds = _oracle_adam(args, student, nfe, make_batch, seeds, reference, sigmas, init)
                else:
                    count = args.search_samples or len(seeds)
                    search = search_grid(
                        partial(score, spec, params, count=count),
                        sigmas,
                        settings=SearchSettings(
                            optimizer=args.optimizer, max_evals=args.max_evals, initial_step=args.initial_step
                        ),
                        on_progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True),
                    )
                    found, seconds = search.sigmas, search.wall_seconds
                    row = {
                        "search_samples": count,
                        "search_init_rmse": search.initial_loss,
                        "search_rmse": search.loss,
                        "evaluations": search.evaluations,
                        "best_after_evals": json.dumps(search.as_dict()["best_after_evals"]),
                        "stop": search.message,
                    }
                after = score(spec, params, found)
                rows.append(
                    {
                        **common,
                        "oracle_rmse": after,
                        "target_rmse": args.target,
                        "reaches_target": after <= args.target,
                        **row,
                        "wall_seconds": round(seconds, 1),
                        "cpu_seconds": round(time.process_time() - cpu, 1),
                        "init_sigmas": " ".join(f"{v:.6g}" for v in sigmas.tolist()),
                        "sigmas": " ".join(f"{v:.6g}" for v in found.tolist()),
                    }
                )
                print(
                    f"{solver} {raw} NFE {nfe} from {init}: rmse {before:.4f} -> {after:.4f} "
                    f"({args.optimizer}, {seconds:.0f} s)",
                    file=sys.stderr,
                )
                provenance.write_csv(args.out / "results.csv", rows)  # each row as it is done
                provenance.write_json(args.out / "results.json", meta, rows)
    return 0


def _oracle_adam(
    args: argparse.Namespace,
    student: Student,
    nfe: int,
    make_batch: Callable[[Sequence[int]], tuple[solvers.Denoiser, torch.Tensor]],
    seeds: Sequence[int],
    reference: torch.Tensor,
    sigmas: torch.Tensor,
    init: str,
) -> tuple[dict[str, Any], torch.Tensor, float]:
    """oracle-grid with LD3's own optimiser (minibatch Adam, finite differences): its row's own
    columns, the grid kept and the wall time."""
    settings = LD3Settings(
        batch_size=args.batch_size,
        epochs=args.epochs,
        lr=args.lr,
        fd_scheme=args.fd_scheme,
        init=init,
        teacher=Teacher(steps=args.reference_steps, schedule="logsnr"),
    )
    result = fit_oracle_grid(
        student,
        nfe,
        make_batch,
        seeds,
        reference,
        sigmas,
        settings,
        on_progress=lambda text: print(f"  {text}", file=sys.stderr, flush=True),
    )
    row = {
        "best_epoch": result.best_epoch,
        "fit_rmse_per_epoch": " ".join(f"{v:.5f}" for v in result.held_out_rmse),
        "adam_steps": args.epochs * -(-len(seeds) // args.batch_size),
        "network_evals": result.network_evals,
    }
    return row, result.sigmas, result.wall_seconds


def list_predictors(args: argparse.Namespace) -> int:
    folders = list(args.dir)
    if args.model is not None:
        try:
            model = models.class_conditional(models.load(args.model, device="cpu"))
        except models.ModelError as error:
            raise BenchError(str(error)) from None
        folders.append(predictor_folder(model, args.model))
    store = PredictorStore(folders)
    for key, path in store.cards.items():
        print(f"{path.stem}: {key.describe()}")
    for grid, (path, card) in store.grids.items():
        print(f"{path.stem}: {grid.describe()} sigmas {', '.join(f'{v:.4g}' for v in card.sigmas)}")
    for group, (path, entry) in store.rankings.items():
        order = " < ".join(f"{ranked.method} {ranked.rmse:.4f}" for ranked in entry.grids)
        print(f"{path.stem}: {group.describe()}: {order} (held-out RMSE; unnamed method -> {entry.grids[0].method})")
    for problem in store.problems:
        print(f"unusable: {problem}", file=sys.stderr)
    return 0


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers >= 0") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r}: expected distinct integers >= 0")
    return seeds


def _held_out_arguments(command: argparse.ArgumentParser, *, guidance: str) -> None:
    """The options of `_held_out`'s scoring protocol (compare-schedules, score-grids, rank-grids)."""
    command.add_argument("--guidance", type=float, default=1.0, help=guidance)
    command.add_argument("--prompt", action="append", default=[], help="text-to-image models: prompts")
    command.add_argument("--num", type=int, default=64, help="held-out noises")
    command.add_argument(
        "--seed-offset", type=int, default=1000, help="from 2**42: past the grids' selection noises (0..63)"
    )
    command.add_argument("--teacher-steps", type=int, default=64)
    command.add_argument("--teacher-cache", type=Path, default=None)
    command.add_argument("--device", default="auto")
    command.add_argument("--threads", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sampler-amed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = commands.add_parser(
        "train", help="train one predictor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    t.add_argument("--model", default="mnist", help="any models.load source")
    t.add_argument("--solver", choices=["amed", "amed_plugin"], default="amed_plugin")
    t.add_argument("--base", choices=BASES, default="ipndm")
    t.add_argument("--base-max-order", type=int, default=None)
    t.add_argument("--nfe", type=int, required=True)
    t.add_argument("--schedule", default="polynomial")
    t.add_argument("--schedule-params", type=json.loads, default={}, help="JSON object")
    t.add_argument("--afs", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--guidance", type=float, default=1.0)
    t.add_argument(
        "--prompt", action="append", default=[], help="text-to-image models: a training prompt (repeat; seed %% count)"
    )
    t.add_argument(
        "--trajectories",
        type=int,
        default=RECIPE_TRAJECTORIES,
        help="default: the official recipe's 10112; 0 writes the untrained predictor (a baseline)",
    )
    t.add_argument("--batch-size", type=int, default=RECIPE_BATCH_SIZE, help="trajectories per Adam step")
    t.add_argument(
        "--init", choices=HEAD_INITS, default="random", help="heads: random (the official code's) or neutral (r = 1/2)"
    )
    t.add_argument("--lr", type=float, default=5e-3)
    t.add_argument("--teacher", default=None, help="default: heun (amed) or the base solver (plugin)")
    t.add_argument("--teacher-substeps", type=int, default=None, help="M; default 1 (amed) or 2 (plugin)")
    t.add_argument("--table", action="store_true", help="no bottleneck feature: a learned fixed schedule")
    t.add_argument("--dc", type=float, default=0.01)
    t.add_argument("--da", type=float, default=0.0)
    t.add_argument(
        "--seed",
        "--seeds",
        dest="seeds",
        type=_seed_list,
        default=[0],
        help="comma-separated: each is trained and the best on held-out noise (seeds from 2**43) kept",
    )
    t.add_argument("--selection", type=int, default=128, help="held-out noises that pick the best seed")
    t.add_argument("--selection-teacher-steps", type=int, default=64, help="the judge: Heun on this many logsnr steps")
    t.add_argument("--teacher-cache", type=Path, default=None, help="keep the judge's solves here")
    t.add_argument(
        "--objective",
        choices=("interval", "trajectory"),
        default="interval",
        help="interval: an Adam step per interval (the paper's); trajectory: summed losses through the history "
        "(multistep plugins)",
    )
    t.add_argument("--device", default="auto")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--out", type=Path, default=None)
    t.add_argument("--grid-dir", type=Path, action="append", default=[], help="learned grids (--schedule learned)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(handler=train)
    g = commands.add_parser(
        "train-schedule",
        help="learn a grid for the `learned` schedule (GITS or LD3)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("--method", choices=("gits", "ld3"), required=True)
    g.add_argument("--model", default="mnist", help="any models.load source")
    g.add_argument("--solver", required=True, help="any registered solver (amed_plugin: with the neutral predictor)")
    g.add_argument("--solver-params", type=json.loads, default={}, help="JSON object")
    g.add_argument("--nfe", type=int, required=True)
    g.add_argument("--afs", action=argparse.BooleanOptionalAction, default=False)
    g.add_argument("--guidance", type=float, default=1.0)
    g.add_argument("--prompt", action="append", default=[], help="text-to-image models: training prompts")
    g.add_argument("--trajectories", type=int, default=None, help="default 32 (gits) or 100 (ld3)")
    g.add_argument("--selection", type=int, default=64, help="held-out noises that pick the coefficient / epoch")
    g.add_argument("--teacher", default=None, help="default heun")
    g.add_argument("--teacher-substeps", type=int, default=None, help="gits: teacher steps per candidate interval - 1")
    g.add_argument("--teacher-steps", type=int, default=64, help="ld3: the teacher's steps (logsnr)")
    g.add_argument("--candidates", type=int, default=48, help="gits: intervals of the fine candidate grid")
    g.add_argument("--epochs", type=int, default=4, help="ld3")
    g.add_argument("--batch-size", type=int, default=25, help="ld3")
    g.add_argument("--lr", type=float, default=0.05, help="ld3: Adam step of the logits")
    g.add_argument("--init", choices=HAND_DESIGNED, default="polynomial", help="ld3: the starting grid")
    g.add_argument("--init-grid", type=Path, default=None, help="ld3: start from this grid file instead of --init")
    g.add_argument(
        "--predictor",
        type=Path,
        default=None,
        help="ld3, amed_plugin: learn the grid through this trained predictor (a card .json; the joint option)",
    )
    g.add_argument("--radius", type=float, default=0.01, help="ld3: soft ball radius / (sqrt(d) sigma_max)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--teacher-cache", type=Path, default=None, help="keep teacher solves here (shared by solvers and NFE)"
    )
    g.add_argument("--device", default="auto")
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--out", type=Path, default=None)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(handler=train_schedule)
    c = commands.add_parser(
        "compare-schedules",
        help="held-out RMSE against a teacher: hand-designed schedules against the learned grids found",
    )
    c.add_argument("--model", default="mnist")
    c.add_argument("--solvers", required=True, help='comma-separated solver[:JSON params], e.g. ipndm:{"max_order":2}')
    c.add_argument("--nfe", type=lambda text: [int(v) for v in text.split(",")], required=True)
    c.add_argument("--afs", action=argparse.BooleanOptionalAction, default=False)
    _held_out_arguments(c, guidance="the grids' guidance")
    c.add_argument("--dir", type=Path, action="append", default=[])
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(handler=compare_schedules)
    sg = commands.add_parser(
        "score-grids", help="held-out RMSE of grid files (the ablation): compare-schedules' protocol"
    )
    sg.add_argument("grids", nargs="+", help="[LABEL=]PATH of a grid card")
    sg.add_argument("--model", default="mnist")
    sg.add_argument("--predictor", type=Path, default=None, help="amed_plugin grids: run with this predictor card")
    _held_out_arguments(sg, guidance="the grids' guidance")
    sg.add_argument("--out", type=Path, required=True)
    sg.set_defaults(handler=score_grids)
    rk = commands.add_parser(
        "rank-grids",
        help="where a key has grids of both methods: which is better on held-out noise (the folder's ranking)",
    )
    rk.add_argument("--model", default="mnist")
    _held_out_arguments(rk, guidance="rank the grids trained for this guidance")
    rk.add_argument("--dir", type=Path, action="append", default=[], help="grid folders read before the model's")
    rk.add_argument("--out", type=Path, default=None, help=f"the ranking file (default: the model's {RANKING_FILE})")
    rk.set_defaults(handler=rank_grids)
    gc = commands.add_parser("gits-cost", help="GITS's cost matrix and DP path for one solver: where the cost lies")
    gc.add_argument("--model", default="mnist")
    gc.add_argument("--solver", default="ipndm")
    gc.add_argument("--solver-params", type=json.loads, default={"max_order": 2})
    gc.add_argument("--candidates", type=int, default=48)
    gc.add_argument("--trajectories", type=int, default=16)
    gc.add_argument("--intervals", type=int, default=5, help="the DP path's length (NFE 5 with AFS: 5)")
    gc.add_argument("--device", default="auto")
    gc.add_argument("--threads", type=int, default=None)
    gc.add_argument("--out", type=Path, required=True)
    gc.set_defaults(handler=gits_cost)
    sel = commands.add_parser(
        "select", help="keep the best of predictors trained apart for one key (one folder per seed)"
    )
    sel.add_argument("candidates", nargs="+", type=Path, help="folders holding one predictor each")
    sel.add_argument("--model", default="mnist")
    sel.add_argument("--guidance", type=float, default=1.0)
    sel.add_argument("--selection", type=int, default=128, help="held-out noises")
    sel.add_argument("--selection-teacher-steps", type=int, default=64)
    sel.add_argument("--teacher-cache", type=Path, default=None)
    sel.add_argument("--grid-dir", type=Path, action="append", default=[], help="learned grids (--schedule learned)")
    sel.add_argument("--device", default="auto")
    sel.add_argument("--threads", type=int, default=None)
    sel.add_argument("--out", type=Path, required=True)
    sel.set_defaults(handler=select)
    sgr = commands.add_parser(
        "select-grid", help="keep the best of grids trained apart for one key (one per seed) on held-out noise"
    )
    sgr.add_argument("candidates", nargs="+", type=Path, help="grid cards, or folders holding one each")
    sgr.add_argument("--model", default="mnist")
    sgr.add_argument("--selection", type=int, default=128, help="held-out noises")
    sgr.add_argument("--selection-teacher-steps", type=int, default=64)
    sgr.add_argument("--teacher-cache", type=Path, default=None)
    sgr.add_argument("--device", default="auto")
    sgr.add_argument("--threads", type=int, default=None)
    sgr.add_argument("--out", type=Path, required=True)
    sgr.set_defaults(handler=select_grid)
    o = commands.add_parser(
        "oracle-grid",
        help="the bound of grid learning: a grid fitted to a sweep's own noises and reference by LD3's Adam or a "
        "direct search (never shipped)",
    )
    o.add_argument("--model", default="mnist")
    o.add_argument("--solvers", required=True, help='comma-separated solver[:JSON params], e.g. ipndm:{"max_order":2}')
    o.add_argument("--nfe", type=lambda text: [int(v) for v in text.split(",")], required=True)
    o.add_argument("--afs", action=argparse.BooleanOptionalAction, default=False)
    o.add_argument("--guidance", type=float, default=1.0)
    o.add_argument(
        "--sweep-cache", type=Path, required=True, help="the sweep's --cache: its reference is read, never computed"
    )
    o.add_argument("--num-samples", type=int, default=1000, help="the sweep's N")
    o.add_argument("--seed-base", type=int, default=0, help="the sweep's")
    o.add_argument("--chunk", type=int, default=250, help="the sweep's --batch-size (its chunks)")
    o.add_argument("--reference-steps", type=int, default=128, help="the sweep's")
    o.add_argument(
        "--init",
        default="shipped,time_uniform",
        help="comma-separated starts: shipped (the store's LD3 grid) or a hand-designed schedule",
    )
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--batch-size", type=int, default=25, help="noises per Adam step")
    o.add_argument("--lr", type=float, default=0.05)
    o.add_argument("--fd-scheme", choices=("central", "forward"), default="forward")
    o.add_argument(
        "--optimizer",
        choices=("adam", *OPTIMIZERS),
        default="adam",
        help="adam: LD3's minibatch Adam (--epochs, --batch-size, --lr); nelder-mead or powell: a deterministic "
        "full-batch search of the interior nodes on the first --search-samples noises (--max-evals)",
    )
    o.add_argument("--search-samples", type=int, default=0, help="a search's objective: the first K noises (0: all N)")
    o.add_argument("--max-evals", type=int, default=300, help="a search's objective evaluations at most")
    o.add_argument("--initial-step", type=float, default=0.3, help="a search's first step in the log-increment logits")
    o.add_argument("--target", type=float, default=0.05, help="the RMSE the bound is compared with")
    o.add_argument("--device", default="auto")
    o.add_argument("--threads", type=int, default=None)
    o.add_argument("--out", type=Path, required=True)
    o.set_defaults(handler=oracle_grid)

    listing = commands.add_parser("list", help="list the predictors and learned grids in folders")
    listing.add_argument("--model", default=None, help="also the model's own amed/ folder")
    listing.add_argument("--dir", type=Path, action="append", default=[])
    listing.set_defaults(handler=list_predictors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (BenchError, solvers.SolverError) as error:
        print(f"sampler-amed {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
