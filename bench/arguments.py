"""argparse value types shared by the commands (validation at the CLI boundary)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1, for argparse `type=`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: expected an integer >= 1")
    return value


def options_of(args: argparse.Namespace) -> dict[str, object]:
    """The parsed options for the provenance record (without the command's handler)."""
    return {name: value for name, value in vars(args).items() if not callable(value)}
