"""argparse value types for our command lines (validation at the CLI boundary).

Here, not in bench/, because the client (`sampler-client`) is part of the runtime and may not import
bench/; bench/ sits on top of sampler_service/ and takes them from here (bench/arguments.py).
Imports nothing but the standard library.
"""

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


def int_list(text: str) -> list[int]:
    """Comma-separated integers ("3,5,10"; empty parts are skipped, "" is []), for argparse `type=`."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def positive_int_list(text: str) -> list[int]:
    """int_list with at least one value, every one >= 1 (NFE and step counts)."""
    values = int_list(text)
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is empty: expected comma-separated integers >= 1")
    for value in values:
        if value < 1:
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected integers >= 1")
    return values
