"""`python -m bench COMMAND ...` / `sampler-bench COMMAND ...`: the benchmark CLI.

Each command lives in its own module with `add_parser(subparsers)` (which sets `handler`) and
`run(args) -> int`; adding one is a new module and a line in COMMANDS. Domain errors of the
harness and of the solver core become one line on stderr and exit status 2, here only.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

from solvers.errors import SolverError

from . import (
    accuracy,
    afs_probe,
    amed_ablation,
    amed_c_placement,
    batch_invariance,
    fd_vs_nfe,
    final_order,
    fuzz,
    model_card,
    model_speed,
    ray_load,
    report,
    serve_load,
    serve_mixed,
    serve_startup,
    solver_overhead,
    step_error,
    t2i_speed,
)
from .errors import BenchError

# The [bench] extra's packages the commands import when they plot or solve a reference (lazily, so
# `--help` works anywhere); a runtime-only install (`pip install .`) lacks them: say so at the start
# rather than after a long run.
NEEDS = ("matplotlib", "scipy")

COMMANDS = (
    accuracy,
    solver_overhead,
    model_speed,
    model_card,
    fd_vs_nfe,
    final_order,
    step_error,
    afs_probe,
    report,
    serve_load,
    serve_mixed,
    serve_startup,
    ray_load,
    batch_invariance,
    amed_ablation,
    amed_c_placement,
    fuzz,
    t2i_speed,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sampler-bench",
        description="Benchmarks of the sampling service; results and their provenance go to bench/results/.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"{parser.prog}: {', '.join(missing)} not installed: the bench needs the [bench] extra"
            " (pip install 'diffusion-sampler-service[bench]', or .[bench] in a checkout)",
            file=sys.stderr,
        )
        return 2
    try:
        return int(args.handler(args))
    except (BenchError, SolverError) as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
