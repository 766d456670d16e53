"""Every numeric parameter of every solver and schedule has a closed range, and every value in it
either samples to finite images or is refused before sampling starts (never NaN half-way)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import solvers
from solvers import InvalidParameterError
from solvers.registry import _numeric

# Switches a parameter needs to take effect (the threshold is only used with thresholding on).
ENABLING = {"threshold_ratio": {"thresholding": True}, "threshold_max": {"thresholding": True}}
# Parameters that come in pairs: the other one at the same end of its range, and at the other end.
PARTNER = {"beta_d": "beta_min", "beta_min": "beta_d"}


def numeric_fields(params: type[solvers.Params]) -> dict[str, dict[str, Any]]:
    properties = params.model_json_schema().get("properties", {})
    fields = {name: _numeric(schema) for name, schema in properties.items()}
    return {name: schema for name, schema in fields.items() if schema.get("type") in ("number", "integer")}


def bounds(schema: dict[str, Any]) -> tuple[float, float]:
    return schema["minimum"], schema["maximum"]


SOLVER_FIELDS = [
    (spec.name, name, end, partner_end)
    for spec in solvers.list_solvers()
    if not spec.needs_predictor
    for name in numeric_fields(spec.params)
    for end in (0, 1)
    for partner_end in ((0, 1) if name in PARTNER else (None,))
]
SCHEDULE_FIELDS = [
    (spec.name, name, end)
    for spec in solvers.SCHEDULES
    for name in numeric_fields(spec.params)
    if name not in ("sigma_min", "sigma_max")  # checked against the model's range, see test_schedules
    if spec.name != "discrete"  # the analytic model has no trained levels (see test_schedules)
    for end in (0, 1)
]


def test_every_numeric_parameter_has_a_closed_range() -> None:
    models = [spec.params for spec in solvers.list_solvers()] + [spec.params for spec in solvers.SCHEDULES]
    for params in models:
        for name, schema in numeric_fields(params).items():
            if name in ("sigma_min", "sigma_max"):  # bounded by the model's range instead
                continue
            assert "minimum" in schema, f"{params.__name__}.{name}: {schema}"
            assert "maximum" in schema, f"{params.__name__}.{name}: {schema}"


def _finite_or_refused(denoiser: Any, *, solver: str, schedule: str, solver_params: Any, schedule_params: Any) -> None:
    noise = solvers.make_noise([0, 1], (2, 2, 2), dtype=torch.float32)
    steps = max(4, solvers.SOLVERS.get(solver).min_steps_of(solvers.SOLVERS.get(solver).parse_params(solver_params)))
    try:
        result = solvers.sample(
            denoiser,
            noise,
            solver=solver,
            steps=steps,
            schedule=schedule,
            solver_params=solver_params,
            schedule_params=schedule_params,
        )
    except InvalidParameterError as refused:  # before any network call: the request never starts
        message = str(refused)
        assert "expected" in message
        return
    assert bool(torch.isfinite(result.images).all()), (solver, solver_params, schedule, schedule_params)


@pytest.mark.parametrize(("solver", "field", "end", "partner_end"), SOLVER_FIELDS)
def test_solver_parameters_at_their_bounds(gmm, solver: str, field: str, end: int, partner_end: int | None) -> None:
    fields = numeric_fields(solvers.SOLVERS.get(solver).params)
    params = {**ENABLING.get(field, {}), field: bounds(fields[field])[end]}
    if partner_end is not None:
        params[PARTNER[field]] = bounds(fields[PARTNER[field]])[partner_end]
    _finite_or_refused(gmm, solver=solver, schedule="polynomial", solver_params=params, schedule_params={})


@pytest.mark.parametrize(("schedule", "field", "end"), SCHEDULE_FIELDS)
@pytest.mark.parametrize("steps_solver", ["euler", "dpmpp_3m"])
def test_schedule_parameters_at_their_bounds(gmm, schedule: str, field: str, end: int, steps_solver: str) -> None:
    fields = numeric_fields(solvers.SCHEDULES.get(schedule).params)
    params = {field: bounds(fields[field])[end]}
    _finite_or_refused(gmm, solver=steps_solver, schedule=schedule, solver_params={}, schedule_params=params)
