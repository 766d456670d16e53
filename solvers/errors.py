"""Domain errors of the solver core.

Every error raised for bad input or an unmet precondition is a `SolverError`, so callers (the
service, the benchmark CLI) map one family in one place. Messages name the field, the bad value
and what is allowed. This module imports nothing else of ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


class SolverError(Exception):
    """Base class of every error the solver core raises on purpose."""


class UnknownNameError(SolverError, KeyError):
    """A name that is not in a registry (solver, schedule, base solver, ...)."""

    def __init__(self, kind: str, name: object, valid: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = sorted(valid)
        super().__init__(f"unknown {kind} {name!r}: expected one of {', '.join(self.valid)}")

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class UnknownSolverError(UnknownNameError):
    def __init__(self, name: object, valid: Iterable[str]) -> None:
        super().__init__("solver", name, valid)


class UnknownScheduleError(UnknownNameError):
    def __init__(self, name: object, valid: Iterable[str]) -> None:
        super().__init__("schedule", name, valid)


class InvalidParameterError(SolverError, ValueError):
    """One input field is invalid: `field` names it, `value` is what came, `allowed` what may.

    Messages quote at most a short prefix of the value (see `quote`): values come from clients and
    end up in status trailers and logs, which must stay small whatever was sent.
    """

    problem = "is invalid"

    def __init__(self, field: str, value: object, allowed: str, detail: str | None = None) -> None:
        self.field = shorten(field)
        self.value = value
        self.allowed = allowed
        self.detail = detail
        text = f"{self.field}={self.describe()}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)

    def describe(self) -> str:
        """The message without the field name: "<value> is invalid: expected <allowed>"."""
        return f"{quote(self.value)} {self.problem}: expected {self.allowed}"


class OutOfRangeError(InvalidParameterError):
    """A number outside its range; `allowed` reads "lo..hi"."""

    problem = "is out of range"


class UnreachableNFEError(SolverError, ValueError):
    """No step count makes this solver spend exactly `nfe` denoiser calls."""

    def __init__(self, solver: str, nfe: int, afs: bool, nearest: Sequence[int]) -> None:
        self.solver = solver
        self.nfe = nfe
        self.afs = afs
        self.nearest = list(nearest)
        near = ", ".join(str(n) for n in self.nearest) or "none"
        super().__init__(
            f"nfe={nfe} is not reachable by solver {solver!r} with afs={afs}: nearest reachable values are {near}"
        )


class SamplingCancelled(SolverError):
    """The step callback asked to stop; raised after `completed_steps` of `total_steps`."""

    def __init__(self, completed_steps: int, total_steps: int) -> None:
        self.completed_steps = completed_steps
        self.total_steps = total_steps
        super().__init__(f"sampling cancelled after {completed_steps} of {total_steps} steps")


class MissingPredictorError(SolverError, LookupError):
    """A solver that needs a trained predictor (AMED) found none for this request.

    Args:
        key: what was looked for (model fingerprint, solver, NFE, schedule, ...), human-readable.
        available: the keys that do exist, so the caller can pick one.
        train_command: the exact command that trains the missing predictor.
    """

    def __init__(self, key: str, available: Sequence[str], train_command: str) -> None:
        self.key = key
        self.available = list(available)
        self.train_command = train_command
        have = "; ".join(self.available) if self.available else "none"
        super().__init__(f"no trained predictor for {key} (available: {have}); train one with: {train_command}")


class MissingGridError(MissingPredictorError):
    """A `learned` schedule found no stored grid for this request (same fields as
    MissingPredictorError: what was looked for, what exists, the command that trains it)."""

    def __init__(self, key: str, available: Sequence[str], train_command: str) -> None:
        super().__init__(key, available, train_command)
        have = "; ".join(self.available) if self.available else "none"
        self.args = (f"no learned grid for {key} (available: {have}); train one with: {train_command}",)

    def __str__(self) -> str:
        return str(self.args[0])


QUOTE_LIMIT = 64


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` cut to its first `limit` characters, with "…" when something was cut."""
    return text if len(text) <= limit else text[:limit] + "…"


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """How an error message shows a client's value: strings in quotes, numbers as written, lists and
    the rest by repr, at most `limit` characters of it (then "…")."""
    return shorten(repr(value), limit)
