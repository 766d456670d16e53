"""`fd-vs-nfe`: quality versus NFE for a list of solvers under one protocol (see bench/sweep.py).

    python -m bench fd-vs-nfe --model mnist --solvers all --nfe 3,4,5,6,7,8,9,10,15,20 \\
        --num-samples 1000 --out bench/results/fd-vs-nfe-cpu/

Writes results.csv, results.json (rows in the shared schema, provenance in meta), fd-vs-nfe.png
and samples-nfe<k>.png (the same seeds for every solver at the two lowest NFE) to --out; per-chunk
statistics are cached in --cache (default --out/cache), so an interrupted run resumes and a new
solver computes only its rows.

Several processes or GPUs (chunks sharded, statistics gathered; same numbers as one process):

    accelerate launch --num_processes 8 -m bench fd-vs-nfe ... --tier gpu --guidance 2
    accelerate launch --cpu --num_processes 2 -m bench fd-vs-nfe ... --threads 1

FID (opt-in): --fid, with pytorch-fid installed (pip install -e '.[fid]') and the standard Inception
weights from --fid-weights or the torch hub cache (SHA-256 checked; see bench/fid.py). Without them
the fid column stays empty, the reason is printed and recorded, and the rest completes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

import models
import solvers

from . import fid
from .arguments import positive_int_list
from .errors import BenchError
from .sweep import SweepConfig, run_sweep

NAME = "fd-vs-nfe"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="quality (in-domain FD, reference RMSE, class accuracy) versus NFE",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="mnist", help="any models.load source")
    parser.add_argument("--solvers", default="all", help="comma-separated names, or all (the training-free ones)")
    parser.add_argument("--nfe", type=positive_int_list, default=[3, 4, 5, 6, 7, 8, 9, 10, 15, 20])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument(
        "--solver-params",
        type=json.loads,
        default={},
        help='JSON object per solver, e.g. {"amed_plugin": {"base": "ipndm"}}',
    )
    parser.add_argument(
        "--predictor-dir",
        action="append",
        default=[],
        help="AMED predictors, learned grids (besides the model's amed/)",
    )
    parser.add_argument("--schedule", default="polynomial")
    parser.add_argument("--schedule-params", type=json.loads, default={}, help="JSON object")
    parser.add_argument("--afs", action="store_true")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed-base", type=int, default=0)
    parser.add_argument("--reference-steps", type=int, default=128, help="0: no reference (rmse_ref empty)")
    parser.add_argument("--reference-check", type=int, default=64, help="samples checked against 2x steps")
    parser.add_argument("--tier", default="cpu")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the FD interval")
    parser.add_argument("--fid", action="store_true", help="also compute FID (Inception-v3 features)")
    parser.add_argument("--fid-weights", default=None, help=f"path of {fid.WEIGHTS_NAME}")
    parser.add_argument("--fid-reference", default=None, help="image folder or .npz (mu, sigma); default MNIST test")
    parser.add_argument("--grid", type=int, default=10, help="samples per solver in the sample grids (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=None)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    names = (
        [s.name for s in solvers.list_solvers() if not s.needs_predictor]
        if args.solvers == "all"
        else [n.strip() for n in args.solvers.split(",") if n.strip()]
    )
    for name in names:
        if name not in solvers.SOLVERS:
            raise BenchError(f"--solvers: unknown solver {name!r}; choose from {', '.join(solvers.SOLVERS.names())}")
    try:
        config = SweepConfig(
            model=args.model,
            solvers=names,
            solver_params=args.solver_params,
            predictor_dirs=args.predictor_dir,
            nfe=args.nfe,
            num_samples=args.num_samples,
            schedule=args.schedule,
            schedule_params=args.schedule_params,
            afs=args.afs,
            guidance=args.guidance,
            dtype=args.dtype,
            device=args.device,
            batch_size=args.batch_size,
            seed_base=args.seed_base,
            reference_steps=args.reference_steps,
            tier=args.tier,
            bootstrap=args.bootstrap,
            reference_check=args.reference_check,
            fid=args.fid,
            fid_weights=args.fid_weights,
            fid_reference=args.fid_reference,
            grid=args.grid,
        )
    except ValidationError as error:
        raise BenchError(str(error)) from None

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def report(row: dict[str, Any]) -> None:
        if not row["reachable"]:
            print(f"{row['solver']:>14} NFE {row['nfe']:>3}: not reachable", file=sys.stderr)
            return
        fd = row.get("fd_indomain")
        fd_text = f"FD {fd:8.3f} [{row['fd_ci_low']:.3f}, {row['fd_ci_high']:.3f}]" if fd is not None else ""
        rmse = row["rmse_ref"]
        rmse_text = f"rmse_ref {rmse:.4f} " if rmse is not None else ""
        print(
            f"{row['solver']:>14} NFE {row['nfe']:>3}: {rmse_text}{fd_text}{' (cached)' if row['cached'] else ''}",
            file=sys.stderr,
        )

    try:
        rows = run_sweep(config, args.out, args.cache, on_row=report)
    except (models.ModelError, fid.FidWeightsRejected) as error:
        raise BenchError(str(error)) from None
    if rows:  # the main process
        print(f"wrote {args.out / 'results.csv'}, results.json, fd-vs-nfe.png and the sample grids", file=sys.stderr)
    return 0
