"""Explicit registries of solvers (and, in schedules.py, schedules).

A `SolverSpec` carries what a client needs to know before it pays for a run: a description, the
declared order, the JSON schema of the parameters, how many denoiser calls a step count costs
and its inverse. Lookups of unknown names raise a domain error that lists the valid names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import pydantic

from .errors import InvalidParameterError, OutOfRangeError, UnknownNameError, UnknownSolverError, UnreachableNFEError

MAX_STEPS = 1000

T = TypeVar("T")


class Params(pydantic.BaseModel):
    """Base of every solver's and schedule's parameter model: frozen, unknown fields rejected."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid", strict=True)


P = TypeVar("P", bound=Params)


class NoParams(Params):
    """For solvers without parameters."""


class Registry(Generic[T]):
    """Name -> entry, with domain errors that list the valid names."""

    def __init__(self, kind: str, error: Callable[[str, list[str]], UnknownNameError] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._error = error

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            if self._error is not None:
                raise self._error(name, list(self._entries)) from None
            raise UnknownNameError(self.kind, name, self._entries) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def parse_params(model: type[P], value: P | Mapping[str, Any] | None, prefix: str) -> P:
    """Validate `value` against `model`, turning pydantic's errors into InvalidParameterError.

    `prefix` names the request field (e.g. "solver_params") so messages read "solver_params.order=5 ...".
    """
    if value is None:
        return model()
    if isinstance(value, model):
        return value
    if not isinstance(value, Mapping):
        raise InvalidParameterError(prefix, value, f"a mapping of parameters or a {model.__name__}")
    try:
        return model.model_validate(dict(value))
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        field_name = f"{prefix}.{name}" if name else prefix
        given = first.get("input")
        if first["type"] == "extra_forbidden":
            valid = ", ".join(model.model_fields) or "no parameters"
            raise InvalidParameterError(field_name, given, f"a known parameter: {valid}") from None
        schema = model.model_json_schema().get("properties", {}).get(str(first["loc"][0]) if first["loc"] else "", {})
        if first["type"] in _RANGE_ERRORS:
            raise OutOfRangeError(field_name, given, _range_text(_numeric(schema))) from None
        if first["type"] == "value_error":  # a model validator's ValueError: its text says what is expected
            allowed = str(first["msg"]).removeprefix("Value error, ")
            raise InvalidParameterError(field_name, given, allowed) from None
        if first["type"] == "finite_number":
            raise InvalidParameterError(field_name, given, "a finite number") from None
        raise InvalidParameterError(field_name, given, _allowed_from_schema(schema), first["msg"]) from None


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _numeric(schema: dict[str, Any]) -> dict[str, Any]:
    """The numeric branch of a field's schema (an optional field's is under anyOf)."""
    branches: list[dict[str, Any]] = [schema, *schema.get("anyOf", [])]
    return next((b for b in branches if b.get("type") in ("number", "integer")), schema)


def _range_text(schema: dict[str, Any]) -> str:
    """ "lo..hi" from a numeric schema, naming an excluded end: "0..1 (0 excluded)"."""
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    text = f"{'-inf' if low is None else f'{low:g}'}..{'inf' if high is None else f'{high:g}'}"
    excluded = [f"{v:g}" for v in (schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")) if v is not None]
    if excluded:
        text += f" ({' and '.join(excluded)} excluded)"
    if schema.get("type") == "integer":
        text = f"an integer in {text}"
    return text


def _allowed_from_schema(schema: dict[str, Any]) -> str:
    """A short 'what is allowed' text from the field's JSON schema (type, range, choices)."""
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    if "const" in schema:
        return repr(schema["const"])
    numeric = _numeric(schema)
    if any(k in numeric for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return _range_text(numeric)
    if "anyOf" in schema:
        kinds = [str(branch.get("type", "a value")) for branch in schema["anyOf"]]
        return " or ".join(kinds)
    return str(schema.get("type", "a valid value"))


@dataclass(frozen=True)
class SolverSpec(Generic[P]):
    """Everything the registry knows about one solver.

    Attributes:
        name: registry key.
        description: one line for clients.
        fn: the pure sampling function.
        params: the parameter model (frozen pydantic); its JSON schema is published.
        evals_per_step: denoiser calls per step; NFE = evals_per_step * steps - afs.
        order_of: the declared convergence order for given parameters.
        min_steps_of: the smallest step count the parameters allow.
        warmup_of: steps taken at lower order before the formula's full order applies
            (multistep solvers); the convergence test may replace them with exact states.
        needs_predictor: whether a trained predictor (AMED) is required.
        grid_check: raises InvalidParameterError when the parameters cannot run on a grid
            (params, sigmas, model sigma_min, model sigma_max); see `check_grid`.
    """

    name: str
    description: str
    fn: Callable[..., Any]
    params: type[P]
    evals_per_step: int
    order_of: Callable[[P], int]
    min_steps_of: Callable[[P], int] = field(default=lambda _p: 1)
    warmup_of: Callable[[P], int] = field(default=lambda _p: 0)
    needs_predictor: bool = False
    grid_check: Callable[[P, Any, float, float], None] | None = None

    @property
    def order(self) -> int:
        """Declared order with default parameters."""
        return self.order_of(self.params())

    def parse_params(self, value: P | Mapping[str, Any] | None) -> P:
        return parse_params(self.params, value, "solver_params")

    def check_grid(self, params: P, sigmas: Any, sigma_min: float, sigma_max: float) -> None:
        """Raise InvalidParameterError when sampling with `params` on `sigmas` (float64, the
        schedule's grid for a model of range [sigma_min, sigma_max]) cannot give finite results.
        Called before sampling starts, so a request is refused instead of failing half-way."""
        if self.grid_check is not None:
            self.grid_check(params, sigmas, sigma_min, sigma_max)

    def parameter_schema(self) -> dict[str, Any]:
        return self.params.model_json_schema()

    def nfe(self, steps: int, afs: bool) -> int:
        """Denoiser calls per sample for `steps` intervals (the final_denoise option adds one)."""
        return self.evals_per_step * steps - int(afs)

    def steps_for_nfe(self, nfe: int, afs: bool, params: P | None = None) -> int | None:
        """The step count that costs exactly `nfe` calls, or None when none does."""
        min_steps = self.min_steps_of(params if params is not None else self.params())
        total = nfe + int(afs)
        if total % self.evals_per_step:
            return None
        steps = total // self.evals_per_step
        if steps < min_steps or steps > MAX_STEPS or self.nfe(steps, afs) < 1:
            return None
        return steps

    def reachable_nfe(self, afs: bool, params: P | None = None, limit: int = MAX_STEPS) -> list[int]:
        min_steps = self.min_steps_of(params if params is not None else self.params())
        values = (self.nfe(s, afs) for s in range(min_steps, MAX_STEPS + 1))
        return [n for n in values if 1 <= n <= limit]

    def require_steps_for_nfe(self, nfe: int, afs: bool, params: P | None = None) -> int:
        steps = self.steps_for_nfe(nfe, afs, params)
        if steps is None:
            reachable = self.reachable_nfe(afs, params)
            below = [n for n in reachable if n < nfe][-1:]
            above = [n for n in reachable if n > nfe][:1]
            raise UnreachableNFEError(self.name, nfe, afs, below + above)
        return steps


def describe(spec: SolverSpec[Any]) -> dict[str, Any]:
    """A JSON-ready summary of a solver for clients (ListSolvers, the CLI)."""
    return {
        "name": spec.name,
        "description": spec.description,
        "order": spec.order,
        "parameters": spec.parameter_schema(),
        "evals_per_step": spec.evals_per_step,
        "needs_predictor": spec.needs_predictor,
    }


SOLVERS: Registry[SolverSpec[Any]] = Registry("solver", UnknownSolverError)


def register(
    name: str,
    *,
    description: str,
    params: type[P],
    evals_per_step: int,
    order: int | Callable[[P], int],
    min_steps: Callable[[P], int] | None = None,
    warmup: Callable[[P], int] | None = None,
    needs_predictor: bool = False,
    grid_check: Callable[[P, Any, float, float], None] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that adds a sampling function to SOLVERS (see SolverSpec for the fields)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        order_of = order if callable(order) else (lambda _p, _o=order: _o)
        SOLVERS.add(
            name,
            SolverSpec(
                name=name,
                description=description,
                fn=fn,
                params=params,
                evals_per_step=evals_per_step,
                order_of=order_of,
                min_steps_of=min_steps or (lambda _p: 1),
                warmup_of=warmup or (lambda _p: 0),
                needs_predictor=needs_predictor,
                grid_check=grid_check,
            ),
        )
        return fn

    return wrap


def list_solvers() -> list[SolverSpec[Any]]:
    """Every registered solver, in registration order."""
    return list(SOLVERS)
