"""`sampler-amed`: train and list AMED predictors for a model (the loop itself is solvers/amed).

    sampler-amed train --model mnist --solver amed_plugin --base ipndm --nfe 5 --schedule polynomial --afs
    sampler-amed train --model mnist --solver amed --nfe 5 --schedule time_uniform --afs
    sampler-amed list --model mnist

Recipes (the paper's): AMED-Solver with a Heun teacher and M = 1 substep between student points;
the plugin with its own base solver as teacher and M = 2 (`--teacher`, `--teacher-substeps`
override). The teacher runs the same schedule with (M + 1) S steps from the same noise, without
AFS. Trajectory k uses noise seed `2**40 + seed * 1000003 + k` (never a benchmark's seed) and, for
a class-conditional model, label k mod 10.

Artifacts go to `--out` (default: the model's own `amed/` folder for built-in models, which the
service reads): `<name>.safetensors` and `<name>.json` (the card: model and fingerprint, solver,
base, NFE, schedule with its parameters and sigma range, AFS, guidance, training settings, loss
per interval, wall time, device, provenance).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import models
import provenance
import solvers
from solvers.amed import (
    BASES,
    MULTISTEP,
    AMEDPluginParams,
    IntervalUpdate,
    PredictorCard,
    PredictorConfig,
    PredictorStore,
    TrainingSettings,
    new_predictor,
    predictor_key,
    save_predictor,
    train_predictor,
)

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


def train(args: argparse.Namespace) -> int:
    if args.trajectories < 0:
        raise BenchError(f"--trajectories {args.trajectories}: expected 0 (the untrained predictor) or more")
    if args.batch_size < 1:
        raise BenchError(f"--batch-size {args.batch_size}: expected 1 or more")
    if args.threads:
        torch.set_num_threads(args.threads)
    # at the start: the code and tree this run executes
    meta = provenance.collect({k: v for k, v in vars(args).items() if k != "handler"})
    try:
        model = models.load(args.model, device=args.device)
    except models.ModelError as error:
        raise BenchError(str(error)) from None
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

    sigmas, teacher_sigmas = grid(steps), grid((substeps + 1) * steps)
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
    predictor = new_predictor(config, args.seed).to(model.device)
    settings = TrainingSettings(
        trajectories=args.trajectories,
        batch_size=args.batch_size,
        lr=args.lr,
        teacher=teacher,
        teacher_params=teacher_params,
        teacher_substeps=substeps,
        seed=args.seed,
        objective=args.objective,
    )

    def make_batch(seeds: Sequence[int]) -> tuple[solvers.Denoiser, torch.Tensor]:
        return conditioned(seeds), solvers.make_noise(seeds, model.sample_shape, device=model.device)

    batches = -(-args.trajectories // args.batch_size)
    bar = tqdm(total=batches, desc=f"{args.solver} NFE {args.nfe}", unit="batch", disable=args.quiet)

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
    card = PredictorCard(
        model=model.name,
        model_fingerprint=model.fingerprint,
        solver=args.solver,
        base=plugin.base if plugin else None,
        base_max_order=plugin.order_limit() if plugin else None,
        nfe=args.nfe,
        steps=steps,
        schedule=args.schedule,
        schedule_params=schedule_params.model_dump(),
        sigma_min=float(sigmas[-1]),
        sigma_max=float(sigmas[0]),
        afs=args.afs,
        guidance=args.guidance,
        config=config,
        training={
            **settings.as_dict(),
            **summary.as_dict(),
            "parameters": sum(p.numel() for p in predictor.parameters()),
            "command": meta["command"],
            "git": meta.get("git"),
            "versions": meta.get("versions"),
            "host": meta.get("device"),
        },
    )
    expected = predictor_key(
        model_fingerprint=model.fingerprint,
        solver=args.solver,
        base=card.base,
        base_max_order=card.base_max_order,
        nfe=args.nfe,
        schedule=args.schedule,
        schedule_params=schedule_params.model_dump(),
        sigma_min=float(sigmas[-1]),
        sigma_max=float(sigmas[0]),
        afs=args.afs,
        guidance=args.guidance,
    )
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
    for problem in store.problems:
        print(f"unusable: {problem}", file=sys.stderr)
    return 0


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
        "--prompt", action="append", default=[], help="text-to-image models: a training prompt (repeat; seed % count)"
    )
    t.add_argument("--trajectories", type=int, default=1000, help="0: write the untrained predictor (a baseline)")
    t.add_argument("--batch-size", type=int, default=100)
    t.add_argument("--lr", type=float, default=5e-3)
    t.add_argument("--teacher", default=None, help="default: heun (amed) or the base solver (plugin)")
    t.add_argument("--teacher-substeps", type=int, default=None, help="M; default 1 (amed) or 2 (plugin)")
    t.add_argument("--table", action="store_true", help="no bottleneck feature: a learned fixed schedule")
    t.add_argument("--dc", type=float, default=0.01)
    t.add_argument("--da", type=float, default=0.0)
    t.add_argument("--seed", type=int, default=0)
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
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(handler=train)
    listing = commands.add_parser("list", help="list the predictors in folders")
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
