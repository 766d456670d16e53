"""The fuzzer, short and seeded: a real server in a subprocess, a few hundred malformed, extreme,
cancelled and valid requests; the run must pass (no UNKNOWN, no INTERNAL, no traceback in the
server log, health SERVING throughout, every admission slot back). Plus the fuzzer's own pieces:
the same seed gives the same requests, and the schema check it judges answers by."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import fuzz
from bench.__main__ import main


@pytest.mark.slow  # about 30 s: a server start and 400 requests
def test_a_short_seeded_fuzz_run_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the server process: tiny batches, a shared machine
    # --text: a tiny Stable Diffusion pipeline is served too (its loading once printed progress bars)
    status = main(["fuzz", "--text", "--requests", "400", "--seed", "1", "--concurrency", "8", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "fuzz.json").read_text())["meta"]["summary"]
    assert summary["failures"] == []
    assert status == 0
    assert summary["verdict"] == "PASS"
    assert summary["requests"] == 400
    assert "UNKNOWN" not in summary["codes"]
    assert "INTERNAL" not in summary["codes"]
    # every family was exercised, and the server answered more than one way
    assert set(summary["by_kind"]) >= {"mutation", "raw", "valid", "cancel", "deadline"}
    assert summary["codes"].get("OK", 0) > 0
    assert summary["codes"].get("INVALID_ARGUMENT", 0) > 0
    assert summary["health_probes"] > 0
    assert (tmp_path / "summary.md").read_text().startswith("# fuzz: PASS")


def _limits() -> fuzz.Limits:
    import solvers

    return fuzz.Limits(
        max_steps=1000,
        max_samples=64,
        min_guidance=0.0,
        max_guidance=20.0,
        num_labels=11,
        solvers={
            spec.name: {
                "schema": spec.parameter_schema(),
                "min_steps": spec.min_steps_of(spec.params()),
                "reachable_nfe": spec.reachable_nfe(False, spec.params(), limit=50),
                "needs_predictor": spec.needs_predictor,
            }
            for spec in solvers.list_solvers()
        },
        schedules={name: solvers.SCHEDULES.get(name).params.model_json_schema() for name in solvers.SCHEDULES.names()},
    )


def test_the_same_seed_sends_the_same_requests() -> None:
    limits = _limits()
    first, again, other = (fuzz.build_cases(seed, 500, limits) for seed in (3, 3, 4))
    assert [(c.method, c.payload, c.metadata, c.cancel_after, c.timeout) for c in first] == [
        (c.method, c.payload, c.metadata, c.cancel_after, c.timeout) for c in again
    ]
    assert [c.payload for c in first] != [c.payload for c in other]
    assert {c.method for c in first if c.kind == "raw"} == set(fuzz.METHODS)


@pytest.mark.parametrize(
    ("schema", "value", "allowed"),
    [
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, 0.5, True),
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, 0.0, False),
        ({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}, 1.0, False),
        ({"type": "number", "minimum": 1}, 1e39, True),
        ({"type": "number", "minimum": 1}, math.nan, False),
        ({"type": "number"}, math.inf, False),
        ({"type": "number"}, True, False),
        ({"type": "integer", "minimum": 1, "maximum": 4}, 2.0, True),
        ({"type": "integer", "minimum": 1, "maximum": 4}, 2.5, False),
        ({"type": "integer", "minimum": 1, "maximum": 4}, 5, False),
        ({"anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "null"}]}, None, True),
        ({"type": "number"}, None, False),
        ({"enum": ["bh1", "bh2"], "type": "string"}, "bh1", True),
        ({"enum": ["bh1", "bh2"], "type": "string"}, "bh1\x00", False),
        ({"type": "boolean"}, 1.0, False),
    ],
)
def test_schema_allows(schema: dict[str, object], value: object, allowed: bool) -> None:
    assert fuzz.schema_allows(schema, value) is allowed


def test_judge_fails_unknown_internal_and_accepted_invalid() -> None:
    def outcome(code: str, expect: str, kind: str = "mutation", fields: tuple[str, ...] = ()) -> fuzz.Outcome:
        case = fuzz.Case(0, kind, "Plan", b"", "steps=0", expect, field="steps")
        return fuzz.Outcome(case, code, 0.01, fields=fields)

    assert fuzz.judge([outcome("INVALID_ARGUMENT", "invalid", fields=("steps",)), outcome("OK", "valid")]) == []
    reasons = fuzz.judge(
        [
            outcome("UNKNOWN", "any", "raw"),
            outcome("INTERNAL", "invalid"),
            outcome("OK", "invalid"),
            outcome("INVALID_ARGUMENT", "invalid"),
        ]
    )
    assert [r.split(":")[0] for r in reasons] == [
        "UNKNOWN status",
        "INTERNAL for an invalid request",
        "OK for a request that breaks the published schema or limits",
        "INVALID_ARGUMENT without a field violation naming the field",
    ]


def test_with_token_signs_every_call_but_about_a_tenth() -> None:
    cases = fuzz.build_cases(5, 2000, _limits())
    signed = fuzz.with_token(cases, "secret", seed=5)
    refused = [c for c in signed if c.expect == "unauthenticated"]
    assert 100 < len(refused) < 300
    assert all(("authorization", "Bearer secret") not in c.metadata for c in refused)
    assert all(c.kind not in ("cancel", "deadline") for c in refused)
    kept = [c for c in signed if c.expect != "unauthenticated"]
    assert all(c.metadata[-1] == ("authorization", "Bearer secret") for c in kept)
    assert [c.payload for c in signed] == [c.payload for c in cases]
