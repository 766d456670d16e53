"""argparse value types shared by the bench commands (validation at the CLI boundary).

The value types are sampler_service.arguments' (one definition, shared with `sampler-client`, which
may not import bench/); this module adds what only the bench needs.
"""

from __future__ import annotations

import argparse

from sampler_service.arguments import int_list, positive_int, positive_int_list

__all__ = ["int_list", "options_of", "positive_int", "positive_int_list"]


def options_of(args: argparse.Namespace) -> dict[str, object]:
    """The parsed options for the provenance record (without the command's handler)."""
    return {name: value for name, value in vars(args).items() if not callable(value)}
