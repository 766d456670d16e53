"""`amed-ablation`: why AMED reaches what it reaches on a model, one question per row.

    python -m bench amed-ablation --model mnist --num-samples 1000 --cache .cache/sweep-cpu \\
        --out bench/results/amed-ablation-cpu

Each variant trains one predictor with `sampler-amed train` (the recipe with one setting changed:
feature, teacher, trajectory count, dc, da, objective, base solver, schedule) into
`<work>/<variant>/`, then scores it as a sweep row (same seeds, labels, reference and schema as
`fd-vs-nfe`; the variant's folder shadows the model's own predictors). Training-free rows on the
same settings sit beside them. Rows add `variant`, `question`, `train_args` and the predictor's
`final_loss`; out/results.csv and results.json carry the provenance.

The predictors are not shipped: `--work` (default .cache/amed-ablation) is scratch, and with
`--reuse` a variant whose artifact is already there is not trained again.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import provenance
from solvers.amed import HEAD_INITS

from . import amed
from .errors import BenchError
from .sweep import COLUMNS, SweepConfig, run_sweep

NAME = "amed-ablation"


@dataclass(frozen=True)
class AblationVariant:
    """One row: a predictor trained with `train` (None: a training-free row) and scored at `nfe`."""

    name: str
    question: str
    solver: str
    nfe: int
    train: tuple[str, ...] | None
    params: dict[str, Any] = field(default_factory=dict)
    schedule: str = "polynomial"
    schedule_params: dict[str, Any] = field(default_factory=dict)
    afs: bool = True


def _plugin(name: str, question: str, *extra: str, base: str = "ipndm", order: int = 2) -> AblationVariant:
    train = ("--solver", "amed_plugin", "--base", base, "--base-max-order", str(order), *extra)
    return AblationVariant(name, question, "amed_plugin", 5, train, {"base": base, "max_order": order})


def _amed3(
    name: str, question: str, *extra: str, rho: float | None = None, schedule: str = "polynomial"
) -> AblationVariant:
    params = {} if rho is None else {"rho": rho}
    train = ("--solver", "amed", *extra, *(("--schedule-params", json.dumps(params)) if params else ()))
    return AblationVariant(name, question, "amed", 3, train, schedule=schedule, schedule_params=params)


VARIANTS = (
    # AMED-Plugin at NFE 5 (3 intervals, AFS, polynomial rho 7): the recipe on iPNDM order 2, one change per row
    _plugin("plugin", "recipe: iPNDM order 2 base and teacher, M = 2, 1000 trajectories, dc 0.01"),
    _plugin("plugin-untrained", "training: none (r = 1/2, c = 1: iPNDM-2 on the merged grid)", "--trajectories", "0"),
    _plugin("plugin-table", "feature: table mode (zero feature, a learned fixed schedule)", "--table"),
    _plugin("plugin-teacher-m5", "teacher: M = 5 (18-step iPNDM-2 teacher)", "--teacher-substeps", "5"),
    _plugin(
        "plugin-teacher-heun", "teacher: Heun, M = 4 (15 steps, 29 NFE)", "--teacher", "heun", "--teacher-substeps", "4"
    ),
    _plugin("plugin-250", "trajectory count: 250", "--trajectories", "250"),
    _plugin("plugin-4000", "trajectory count: 4000", "--trajectories", "4000"),
    _plugin("plugin-dc0.05", "scale range: dc 0.05", "--dc", "0.05"),
    _plugin("plugin-da0.2", "sigma scale a on: da 0.2", "--da", "0.2"),
    _plugin("plugin-trajectory", "objective: whole trajectory", "--objective", "trajectory"),
    _plugin("plugin-order4", "base: iPNDM order 4 (the paper's)", order=4),
    _plugin("plugin-v2", "base: variable-step iPNDM order 2", base="ipndm_v"),
    _plugin("plugin-v4", "base: variable-step iPNDM order 4", base="ipndm_v", order=4),
    AblationVariant("ipndm2", "training-free: iPNDM order 2", "ipndm", 5, None, {"max_order": 2}),
    AblationVariant("unipc", "training-free: UniPC", "unipc", 5, None),
    # AMED-Solver at NFE 3 (2 intervals, AFS): where its one midpoint evaluation falls short
    _amed3("amed3", "recipe: Heun teacher, M = 1, polynomial rho 7"),
    _amed3("amed3-teacher-m3", "teacher: Heun, M = 3", "--teacher-substeps", "3"),
    _amed3("amed3-rho5", "schedule: polynomial rho 5", rho=5.0),
    _amed3("amed3-rho10", "schedule: polynomial rho 10", rho=10.0),
    _amed3("amed3-time-uniform", "schedule: time_uniform (the paper's)", schedule="time_uniform"),
    AblationVariant("ipndm2-nfe3", "training-free: iPNDM order 2, rho 7", "ipndm", 3, None, {"max_order": 2}),
    AblationVariant(
        "ipndm2-nfe3-rho5",
        "training-free: iPNDM order 2, rho 5",
        "ipndm",
        3,
        None,
        {"max_order": 2},
        schedule_params={"rho": 5.0},
    ),
    AblationVariant(
        "ipndm2-nfe3-rho10",
        "training-free: iPNDM order 2, rho 10",
        "ipndm",
        3,
        None,
        {"max_order": 2},
        schedule_params={"rho": 10.0},
    ),
)
EXTRA_COLUMNS = ["variant", "question", "train_args", "final_loss"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="AMED ablations: one changed setting per row",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mnist", help="any models.load source")
    parser.add_argument(
        "--variants", default="all", help=f"comma-separated, or all: {', '.join(v.name for v in VARIANTS)}"
    )
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument(
        "--trajectories", type=int, default=1000, help="each variant's count unless it sets its own (the rows': 1000)"
    )
    parser.add_argument(
        "--train-batch-size", type=int, default=25, help="trajectories per Adam step (the committed rows': 25)"
    )
    parser.add_argument(
        "--train-init", choices=HEAD_INITS, default="neutral", help="how the heads start (the committed rows': neutral)"
    )
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--reference-steps", type=int, default=128)
    parser.add_argument("--reference-check", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--tier", default="cpu")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--work", type=Path, default=Path(".cache/amed-ablation"), help="where predictors are trained")
    parser.add_argument("--reuse", action="store_true", help="keep a variant's predictor already in --work")
    parser.add_argument("--cache", type=Path, default=None, help="the sweep cache (reference and rows)")
    parser.add_argument("--out", type=Path, required=True)
    parser.set_defaults(handler=run)


def _train(variant: AblationVariant, args: argparse.Namespace, folder: Path) -> None:
    assert variant.train is not None
    if args.reuse and any(folder.glob("*.json")):
        return
    for stale in folder.glob("*"):
        stale.unlink()
    argv = ["train", "--model", args.model, "--nfe", str(variant.nfe), "--schedule", variant.schedule, "--quiet"]
    argv += ["--afs" if variant.afs else "--no-afs", "--batch-size", str(args.train_batch_size)]
    argv += ["--init", args.train_init, "--out", str(folder), *variant.train]
    if "--trajectories" not in variant.train:
        argv += ["--trajectories", str(args.trajectories)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if amed.main(argv) != 0:
        raise BenchError(f"variant {variant.name}: sampler-amed {' '.join(argv)} failed")


def run(args: argparse.Namespace) -> int:
    meta = provenance.collect({k: v for k, v in vars(args).items() if k != "handler"})
    known = {v.name: v for v in VARIANTS}
    names = list(known) if args.variants == "all" else [n.strip() for n in args.variants.split(",") if n.strip()]
    for name in names:
        if name not in known:
            raise BenchError(f"--variants: unknown variant {name!r}; choose from {', '.join(known)}")
    chosen = [known[name] for name in names]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for variant in chosen:
        folder = args.work / variant.name
        folder.mkdir(parents=True, exist_ok=True)
        if variant.train is not None:
            _train(variant, args, folder)
        config = SweepConfig(
            model=args.model,
            solvers=[variant.solver],
            solver_params={variant.solver: variant.params},
            predictor_dirs=[str(folder)] if variant.train is not None else [],
            nfe=[variant.nfe],
            num_samples=args.num_samples,
            schedule=variant.schedule,
            schedule_params=variant.schedule_params,
            afs=variant.afs,
            device=args.device,
            batch_size=args.batch_size,
            reference_steps=args.reference_steps,
            reference_check=args.reference_check,
            tier=args.tier,
            bootstrap=args.bootstrap,
            grid=0,
        )
        (row,) = run_sweep(config, folder / "sweep", args.cache)
        final_loss = None
        if variant.train is not None:
            (card,) = folder.glob("*.json")
            final_loss = json.loads(card.read_text())["training"]["final_loss"]
        row.update(
            variant=variant.name,
            question=variant.question,
            train_args=" ".join(variant.train) if variant.train is not None else None,
            final_loss=final_loss,
            command=meta["command"],
            git_rev=(meta.get("git") or {}).get("revision"),
        )
        rows.append(row)
        print(
            f"{variant.name:>22}: NFE {row['nfe']} rmse_ref {row['rmse_ref']:.4f} FD {row['fd_indomain']:.3f}",
            file=sys.stderr,
        )
    args.out.mkdir(parents=True, exist_ok=True)
    columns = [*EXTRA_COLUMNS, *COLUMNS]
    provenance.write_csv(args.out / "results.csv", rows, columns)
    provenance.write_json(args.out / "results.json", meta, rows)
    print(f"wrote {args.out / 'results.csv'} and results.json", file=sys.stderr)
    return 0
