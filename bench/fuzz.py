"""`fuzz`: the service under malformed, extreme and abandoned requests.

    python -m bench fuzz                          # 10,000 requests, seed 0, mnist on CPU
    python -m bench fuzz --requests 300 --out /tmp/fuzz

Starts `sampler-service serve` in a subprocess (loopback, a free port, a metrics port; its stderr
log goes to a file), waits for SERVING, then sends --requests requests, --concurrency at a time,
through generic calls that carry raw bytes (so malformed messages reach the server as sent):

- mutations: a cheap valid request (1 sample, a few steps) with one field changed: every number
  at and just beyond its bounds (the solver and schedule parameter bounds come from the JSON
  schemas the server publishes in ListSolvers and from the schedule registry; steps, samples,
  guidance and labels from GetServerInfo and ListModels), NaN, infinities and huge values, empty
  and huge lists, long strings, NUL and unusual Unicode, wrong types and unknown
  keys inside the parameter Structs, odd x-request-id metadata;
- raw bytes on every method: random, truncated and bit-flipped messages, and unknown methods;
  string fields holding invalid UTF-8;
- valid requests, and abandoned ones: streams cancelled at random moments, unary calls with
  deadlines of a few milliseconds.

What is sent depends only on --seed (the interleaving of concurrent calls does not). A health probe
runs throughout. FAIL (exit status 1, reasons listed) on: any UNKNOWN; any INTERNAL (for an
invalid request that should have been INVALID_ARGUMENT, for a valid one on this healthy model a
failure); an OK answer to a request that breaks the published schema or limits; INVALID_ARGUMENT
for a parseable request without a BadRequest field violation; a status message over 4 KiB or
error trailers over gRPC's metadata limit; a deadline expiring on a request that did not set a
short one (a hang); a missing sample in an OK answer; any traceback or plain (non-JSON) line in
the server log; health other than SERVING at any probe; admission slots still held after the run;
the server's `sampler_requests_total{code="OK"}` of Plan, ListModels, ListSolvers and
GetServerInfo differing from the OK answers clients got; the server exiting.

Writes fuzz.json (provenance, summary, counts by method x status code), counts.csv and
summary.md under --out (default bench/results/fuzz-cpu/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from google.protobuf import struct_pb2

import provenance

from .arguments import options_of, positive_int
from .errors import BenchError

NAME = "fuzz"
RESULTS = Path(__file__).resolve().parent / "results" / "fuzz-cpu"
SERVICE = "/sampler.v1.SamplerService/"
UNARY_METHODS = ("GenerateUnary", "Plan", "ListModels", "ListSolvers", "GetServerInfo")
METHODS = ("Generate", *UNARY_METHODS)
TOKEN = "fuzz-token-0123456789"  # --auth: the server's bearer token (loopback only)
MAX_MESSAGE_CHARS = 4096  # a status message longer than this quotes input it should have cut short
REQUEST_TIMEOUT = 120.0  # seconds; only a hang reaches it
CHEAP_COST = 8  # steps x samples x passes above which a valid mutation goes to Plan only
UINT32_MAX, INT32_MAX, UINT64_MAX = 2**32 - 1, 2**31 - 1, 2**64 - 1
ODD_STRINGS = (
    "",
    "x" * 10_000,
    "nul\x00inside",
    "\x00",
    " leading-space",
    "ünïcödé-名前-🙂",
    "\u202eright-to-left",
    "\ufeffbom",
    "a\nnew line",
)

STRING_FIELDS = {"model": 1, "solver": 2, "schedule": 6, "request_id": 15}  # name: field number
BAD_KEYS = (("unknown", 1.0), ("", 1.0), ("k" * 10_000, 1.0), ("nul\x00key", 1.0), ("ünï", "x"), ("unknown", math.nan))
METADATA_VALUES = ("ok-id-1", "quote\"and'", "a" * 129, "has space", "x" * 2000)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        NAME,
        help="malformed, extreme and cancelled requests against a real server; fails on UNKNOWN, tracebacks, ...",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=positive_int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--concurrency", type=positive_int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--auth",
        action="store_true",
        help="serve with a bearer token: calls carry it, except about 10%% that carry none or a wrong one "
        "and must be UNAUTHENTICATED",
    )
    parser.add_argument(
        "--text",
        action="store_true",
        help="also serve a tiny seeded text-to-image pipeline (built offline) and mutate the text-to-image "
        "fields: prompts, sizes, init images, strength",
    )
    parser.add_argument(
        "--text-kind",
        choices=("sd", "flux"),
        default="sd",
        help="which tiny pipeline --text serves: Stable Diffusion, or a guidance-distilled Flux (2x2 packed "
        "sizes, no negative prompt)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.set_defaults(handler=run)


# -- the cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request: where it goes, its bytes, and what a correct server may answer.

    expect: "valid" (OK; INVALID_ARGUMENT and the like are noted, not failures: the schema does
    not say everything), "invalid" (anything but OK), "any" (raw bytes, cancels, deadlines).
    """

    index: int
    kind: str  # mutation, valid, raw, unknown_method, cancel, deadline
    method: str
    payload: bytes
    what: str  # field and value, short
    expect: str
    metadata: tuple[tuple[str, str], ...] = ()
    cancel_after: float | None = None  # seconds after the call starts (cancel cases)
    timeout: float = REQUEST_TIMEOUT
    samples: int = 0  # results an OK Generate / GenerateUnary must carry
    field: str = ""  # the mutated field, as a violation names it ("solver_params.r", "labels")


@dataclass
class Outcome:
    case: Case
    code: str
    seconds: float
    message_chars: int = 0
    message: str = ""
    results: int = 0
    fields: tuple[str, ...] = ()  # the BadRequest field violations of an INVALID_ARGUMENT


@dataclass
class Limits:
    """What the server publishes about itself."""

    max_steps: int
    max_samples: int
    min_guidance: float
    max_guidance: float
    num_labels: int
    solvers: dict[str, dict[str, Any]]  # name -> {schema, min_steps, reachable_nfe, needs_predictor}
    schedules: dict[str, dict[str, Any]]  # name -> JSON schema of its parameters
    # a text-to-image model when served (--text): name, width, height, multiple, max_prompt_chars,
    # min_side, max_side, max_pixels
    text: dict[str, Any] | None = None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} chars)"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(number: int, data: bytes) -> bytes:
    """A protobuf field of wire type 2 (string/bytes/message) with arbitrary bytes: the last one
    of a string field wins when parsed, so appending it replaces the field."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def _number_branch(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The non-null branch of an anyOf [..., null] and whether null is allowed."""
    if "anyOf" in schema:
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        nullable = len(branches) < len(schema["anyOf"])
        return (branches[0] if branches else {}), nullable
    return schema, False


def schema_allows(schema: dict[str, Any], value: Any) -> bool:
    """Whether `value`, sent as a protobuf Struct value, satisfies a parameter's JSON schema.
    Structs have one number type, so an integral number (|v| < 2^53) counts as an integer."""
    branch, nullable = _number_branch(schema)
    if value is None:
        return nullable
    kind = branch.get("type")
    if "enum" in branch:
        return isinstance(value, str) and value in branch["enum"]
    if kind == "boolean":
        return isinstance(value, bool)
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if kind == "integer" and not (float(value).is_integer() and abs(value) < 2**53):
            return False
        if "minimum" in branch and value < branch["minimum"]:
            return False
        if "exclusiveMinimum" in branch and value <= branch["exclusiveMinimum"]:
            return False
        if "maximum" in branch and value > branch["maximum"]:
            return False
        return not ("exclusiveMaximum" in branch and value >= branch["exclusiveMaximum"])
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    return False


def parameter_values(schema: dict[str, Any]) -> list[Any]:
    """Values to try for one parameter: at and beyond each bound, inside, specials, wrong types."""
    branch, _ = _number_branch(schema)
    kind = branch.get("type")
    values: list[Any] = [None, "1", [1.0], {"nested": 1.0}, "x" * 10_000]
    if "enum" in branch:
        values += [*branch["enum"], "", "not-a-choice", "\x00", branch["enum"][0] + "\x00", "ü" * 300, 1.0]
    elif kind == "boolean":
        values += [True, False, 1.0, 0.0, "true"]
    elif kind in ("number", "integer"):
        integer = kind == "integer"
        step = (lambda v, d: v + d) if integer else (lambda v, d: math.nextafter(v, d * math.inf))
        for key, direction in (("minimum", -1), ("exclusiveMinimum", -1), ("maximum", 1), ("exclusiveMaximum", 1)):
            if key in branch:
                bound = branch[key]
                values += [bound, step(bound, direction), step(bound, -direction)]
        low = branch.get("minimum", branch.get("exclusiveMinimum"))
        high = branch.get("maximum", branch.get("exclusiveMaximum"))
        if low is not None and high is not None:
            values.append((low + high) / 2)
        values += [0.0, -0.0, 1.0, -1.0, 1.5, 2.0, 1e-300, 5e-324, 1e39, -1e39, 1e308, -1e308, 2.0**53 + 2, 2.0**64]
        values += [math.nan, math.inf, -math.inf, True]
    elif kind == "array":
        values += [[], [math.nan], [1e308, 1.0], [1.0, 2.0, 3.0], ["a"], [[1.0]], [1.0] * 100_000]
    return values


def _cheap(steps: int, samples: int, guided: bool) -> bool:
    return steps * samples * (2 if guided else 1) <= CHEAP_COST


class CaseMaker:
    """Builds the deterministic list of cases from the seed and the server's published limits."""

    def __init__(self, rng: random.Random, limits: Limits) -> None:
        self.rng = rng
        self.limits = limits
        self.free_solvers = [name for name, s in limits.solvers.items() if not s["needs_predictor"]]
        self.index = 0
        self.pngs: dict[str, bytes] = {}
        if limits.text is not None:
            self.pngs = {
                "default": _png(int(limits.text["width"]), int(limits.text["height"]), rng),
                "tiny": _png(1, 1, rng),
                "huge": _png(6000, 6000, None),  # 36 M pixels of zeros: a 36 KB file
                "junk": rng.randbytes(200),
            }
        self.catalog = self._catalog()
        rng.shuffle(self.catalog)
        self.position = 0

    def _next(self) -> int:
        self.index += 1
        return self.index - 1

    def base(self) -> Any:
        """A cheap valid request: one sample, the solver's fewest steps (at most 3)."""
        from sampler_service.gen.sampler.v1 import sampler_pb2 as pb

        rng = self.rng
        solver = rng.choice(self.free_solvers)
        min_steps = int(self.limits.solvers[solver]["min_steps"])
        return pb.GenerateRequest(
            model="mnist",
            solver=solver,
            steps=max(min_steps, min(3, min_steps + rng.randrange(2))),
            seeds=[rng.randrange(2**40)],
            labels=[rng.randrange(10)],
            guidance=[rng.choice([1.0, 1.0, 2.0, 0.0])],
            request_id=f"fuzz-{self.index}",
        )

    def _method(self, request: Any, expect: str) -> str:
        samples = request.num_samples or len(request.seeds) or len(request.labels) or 1
        steps = request.steps if request.WhichOneof("budget") == "steps" else request.nfe
        guided = any(w not in (1.0, 0.0) for w in request.guidance)
        if expect == "valid" and not _cheap(steps, samples, guided):
            return "Plan"
        if expect == "invalid" and samples * max(1, steps) > 4 * CHEAP_COST:
            return "Plan"  # in case the server wrongly accepts it: a failure either way, never a long run
        return self.rng.choices(["Plan", "GenerateUnary", "Generate"], weights=[4, 3, 3])[0]

    def _case(
        self,
        request: Any,
        what: str,
        expect: str,
        *,
        kind: str = "mutation",
        field: str | None = None,
        extra: bytes = b"",
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> Case:
        method = self._method(request, expect)
        samples = request.num_samples or len(request.seeds) or len(request.labels) or 1
        return Case(
            self._next(),
            kind,
            method,
            request.SerializeToString() + extra,
            what,
            expect,
            metadata=metadata,
            samples=samples,
            field=field if field is not None else what.split("=")[0].split(" ")[0].split(",")[0],
        )

    # one generator per family; each returns one case, chosen by the rng
    def _catalog(self) -> list[tuple[str, tuple[Any, ...]]]:
        """Every single-field mutation: each parameter of each solver and schedule x its values,
        unknown keys, each top-level field's values, odd and invalid-UTF-8 strings, metadata."""
        limits = self.limits
        entries: list[tuple[str, tuple[Any, ...]]] = []
        for solver, spec in limits.solvers.items():
            for key, schema in sorted(spec["schema"].get("properties", {}).items()):
                entries += [("solver_params", (solver, key, value)) for value in parameter_values(schema)]
            entries += [("solver_params", (solver, key, value)) for key, value in BAD_KEYS]
        for name, schema in limits.schedules.items():
            for key, prop in sorted(schema.get("properties", {}).items()):
                if key == "sigmas":  # the custom schedule's grid
                    entries += [("custom_sigmas", (value,)) for value in [*parameter_values(prop), "valid"]]
                else:
                    entries += [("schedule_params", (name, key, value)) for value in parameter_values(prop)]
            entries += [("schedule_params", (name, key, value)) for key, value in BAD_KEYS]
        entries += [("top", (k,)) for k in range(len(self._table(self.base())))]
        entries += [("strings", (name, value)) for name in STRING_FIELDS for value in ODD_STRINGS]
        junk = [b"\xff\xfe", b"mnist\xc3", b"\xed\xa0\x80", b"\xc0\x80", self.rng.randbytes(8)]
        entries += [("utf8", (number, value)) for number in STRING_FIELDS.values() for value in junk]
        entries += [("metadata", (value,)) for value in METADATA_VALUES]
        if self.limits.text is not None:  # each text mutation three times: a few fields, many values
            entries += [("text", (k,)) for k in range(len(self._text_table(self.text_base()))) for _ in range(3)]
        return entries

    def text_base(self) -> Any:
        """A cheap valid text-to-image request: one sample at the model's default size."""
        from sampler_service.gen.sampler.v1 import sampler_pb2 as pb

        assert self.limits.text is not None
        rng = self.rng
        solver = rng.choice(self.free_solvers)
        min_steps = int(self.limits.solvers[solver]["min_steps"])
        return pb.GenerateRequest(
            model=self.limits.text["name"],
            solver=solver,
            steps=max(min_steps, min(3, min_steps + rng.randrange(2))),
            seeds=[rng.randrange(2**40)],
            prompt=["a red cube on a table"],
            guidance=[rng.choice([1.0, 2.0])],
            request_id=f"fuzz-{self.index}",
        )

    def _text_table(self, request: Any) -> list[tuple[str, tuple[str, ...], dict[str, Any], str]]:
        """Mutations of the text-to-image fields (prompt, negative_prompt, width, height,
        init_image, strength) of a text request; the same length for every request."""
        text = self.limits.text
        assert text is not None
        chars, multiple = int(text["max_prompt_chars"]), max(1, int(text["multiple"]))
        width, height = int(text["width"]), int(text["height"])
        low, high = int(text["min_side"]), int(text["max_side"])
        nothing: tuple[str, ...] = ()
        init = ("init_image",)
        table: list[tuple[str, tuple[str, ...], dict[str, Any], str]] = [
            ("prompt=['']", nothing, {"prompt": [""]}, "valid"),
            ("prompt=[]", ("prompt",), {}, "valid"),
            ("prompt=max_prompt_chars", nothing, {"prompt": ["p" * chars]}, "valid"),
            ("prompt=max_prompt_chars+1", nothing, {"prompt": ["p" * (chars + 1)]}, "invalid"),
            ("prompt=NUL inside", nothing, {"prompt": ["a\x00b"]}, "invalid"),
            ("prompt=unicode", nothing, {"prompt": ["ünïcödé 名前 🙂 \u202e"]}, "valid"),
            ("prompt=10,000 values", nothing, {"prompt": ["p"] * 10_000}, "invalid"),
            ("prompt=2 for 1 sample", nothing, {"prompt": ["a", "b"]}, "invalid"),
            (
                "negative_prompt=['blurry']",
                nothing,
                {"negative_prompt": ["blurry"]},
                "invalid" if text.get("distilled") else "valid",  # a distilled model takes none
            ),
            ("negative_prompt=max_prompt_chars+1", nothing, {"negative_prompt": ["n" * (chars + 1)]}, "invalid"),
            ("negative_prompt=NUL", nothing, {"negative_prompt": ["\x00"]}, "invalid"),
            ("negative_prompt=2 for 1 sample", nothing, {"negative_prompt": ["a", "b"]}, "invalid"),
            ("width=0", nothing, {"width": 0}, "valid"),
            ("width=default+multiple", nothing, {"width": width + multiple}, "valid"),
            ("width=default+1", nothing, {"width": width + 1}, "invalid" if multiple > 1 else "valid"),
            ("width=min_image_side", nothing, {"width": low}, "valid"),
            ("width=min_image_side-1", nothing, {"width": max(1, low - 1)}, "invalid"),
            ("width=max_image_side", nothing, {"width": high}, "valid"),
            ("width=max_image_side+multiple", nothing, {"width": high + multiple}, "invalid"),
            ("width=2^32-1", nothing, {"width": UINT32_MAX}, "invalid"),
            ("height=default+multiple", nothing, {"height": height + multiple}, "valid"),
            ("height=default+1", nothing, {"height": height + 1}, "invalid" if multiple > 1 else "valid"),
            ("height=2^32-1", nothing, {"height": UINT32_MAX}, "invalid"),
            (
                "width=height=max_image_side",
                nothing,
                {"width": high, "height": high},
                "valid" if high * high <= int(text["max_pixels"]) else "invalid",
            ),
            ("init_image=PNG of the default size", nothing, {"init_image": self.pngs["default"]}, "valid"),
            (
                "init_image=PNG of the default size, strength=1",
                nothing,
                {"init_image": self.pngs["default"], "strength": 1.0},
                "valid",
            ),
            ("init_image=PNG 1x1", nothing, {"init_image": self.pngs["tiny"]}, "invalid"),
            ("init_image=PNG 6000x6000", nothing, {"init_image": self.pngs["huge"]}, "invalid"),
            ("init_image=truncated PNG", nothing, {"init_image": self.pngs["default"][:40]}, "invalid"),
            ("init_image=random bytes", nothing, {"init_image": self.pngs["junk"]}, "invalid"),
            ("init_image=PNG signature only", nothing, {"init_image": b"\x89PNG\r\n\x1a\n"}, "invalid"),
            ("strength=0", nothing, {"init_image": self.pngs["default"], "strength": 0.0}, "invalid"),
            ("strength=nan", nothing, {"init_image": self.pngs["default"], "strength": math.nan}, "invalid"),
            ("strength=-1", nothing, {"init_image": self.pngs["default"], "strength": -1.0}, "invalid"),
            (
                "strength=1+",
                nothing,
                {"init_image": self.pngs["default"], "strength": _float32_after(1.0, 1)},
                "invalid",
            ),
            ("strength=inf", nothing, {"init_image": self.pngs["default"], "strength": math.inf}, "invalid"),
            ("strength without init_image", init, {"strength": 0.5}, "any"),
            ("labels on a text model", nothing, {"labels": [1]}, "invalid"),
            ("prompt on a class model", nothing, {"model": "mnist", "prompt": ["a cat"]}, "invalid"),
            (
                "init_image on a class model",
                ("prompt",),
                {"model": "mnist", "labels": [1], "init_image": self.pngs["default"]},
                "invalid",
            ),
        ]
        return table

    def mutation(self) -> Case:
        """The next entry of the (shuffled) catalog applied to a fresh cheap valid request; the
        catalog is walked round and round, each time on other bases."""
        family, entry = self.catalog[self.position % len(self.catalog)]
        self.position += 1
        request = self.base()
        if family == "solver_params":
            solver, key, value = entry
            request.solver = solver
            request.steps = max(request.steps, int(self.limits.solvers[solver]["min_steps"]))
            return self._params_case(request, "solver_params", self.limits.solvers[solver]["schema"], key, value)
        if family == "schedule_params":
            name, key, value = entry
            request.schedule = name
            return self._params_case(request, "schedule_params", self.limits.schedules[name], key, value)
        if family == "custom_sigmas":
            request.schedule = "custom"
            return self._custom_sigmas(request, entry[0])
        if family == "strings":
            name, value = entry
            setattr(request, name, value)
            expect = "valid" if (name in ("schedule", "request_id") and value == "") else "invalid"
            return self._case(request, f"{name}={_short(value)}", expect)
        if family == "utf8":
            number, junk = entry
            return self._case(
                request,
                f"field {number} = invalid UTF-8 {junk!r}",
                "invalid",
                kind="utf8",  # the message does not parse: no field can be named
                extra=_length_delimited(number, junk),
            )
        if family == "metadata":
            (value,) = entry
            request.request_id = ""
            ok = value in ("ok-id-1", "quote\"and'")  # printable ASCII without spaces
            return self._case(
                request,
                f"x-request-id={_short(value)}",
                "valid" if ok else "invalid",
                field="request_id",
                metadata=(("x-request-id", value),),
            )
        if family == "text":
            request = self.text_base()
            what, cleared, fields, expect = self._text_table(request)[entry[0]]
        else:
            what, cleared, fields, expect = self._table(request)[entry[0]]
        for name in cleared:
            request.ClearField(name)
        for name, value in fields.items():
            if isinstance(value, list):
                del getattr(request, name)[:]
                getattr(request, name).extend(value)
            else:
                setattr(request, name, value)
        min_steps = int(self.limits.solvers.get(request.solver, {"min_steps": 1})["min_steps"])
        if expect == "valid" and request.WhichOneof("budget") == "steps" and request.steps < min_steps:
            expect = "invalid"
        case = self._case(request, what, expect)
        text = self.limits.text
        area = (request.width or (text or {}).get("width", 0)) * (request.height or (text or {}).get("height", 0))
        if text is not None and expect == "valid" and area > text["width"] * text["height"]:
            case = replace(case, method="Plan")  # a valid but larger image: what it would cost, not a run
        return case

    def _params_case(self, request: Any, name: str, schema: dict[str, Any], key: str, value: Any) -> Case:
        properties = schema.get("properties", {})
        try:
            getattr(request, name).CopyFrom(_struct({key: value}))
        except ValueError:  # a value a Struct cannot hold
            getattr(request, name).CopyFrom(_struct({key: str(value)}))
            value = str(value)
        known = key in properties
        expect = "valid" if known and schema_allows(properties[key], value) else "invalid"
        if expect == "valid" and self.limits.solvers.get(request.solver, {}).get("needs_predictor"):
            expect = "any"  # a predictor may or may not exist for it
        plain = key.isidentifier() and len(key) <= 64
        label = key if plain else _short(key)
        # a key that is no identifier may be quoted shortened in the violation: its struct suffices
        field = f"{name}.{key}" if plain else name
        return self._case(request, f"{name}.{label}={_short(value)}", expect, field=field)

    def _custom_sigmas(self, request: Any, value: Any) -> Case:
        steps = request.steps
        if value == "valid":  # a custom grid: decreasing, within the model's range
            value = [float(14.6 * (0.5 ** (k * 6 / steps))) for k in range(steps)] + [0.03]
            expect = "any"  # the exact range rules are the schedule's
        else:
            expect = "invalid"
        request.schedule_params.CopyFrom(_struct({"sigmas": value}))
        return self._case(request, f"schedule_params.sigmas={_short(value)}", expect)

    def _table(self, request: Any) -> list[tuple[str, tuple[str, ...], dict[str, Any], str]]:
        """Top-level field mutations for this request: (what, fields cleared, fields set (a list
        replaces a repeated field), expect); the same length for every request."""
        limits = self.limits
        solver = limits.solvers[request.solver]
        steps = request.steps
        nothing: tuple[str, ...] = ()
        seeds, labels, budget = ("seeds",), ("labels",), ("budget",)
        table: list[tuple[str, tuple[str, ...], dict[str, Any], str]] = [
            ("steps=0", nothing, {"steps": 0}, "invalid"),
            ("steps=min_steps", nothing, {"steps": int(solver["min_steps"])}, "valid"),
            ("steps=max_steps", nothing, {"steps": limits.max_steps}, "valid"),
            ("steps=max_steps+1", nothing, {"steps": limits.max_steps + 1}, "invalid"),
            ("steps=2^32-1", nothing, {"steps": UINT32_MAX}, "invalid"),
            ("nfe=0", nothing, {"nfe": 0}, "invalid"),
            ("nfe=smallest reachable", nothing, {"nfe": int(solver["reachable_nfe"][0])}, "valid"),
            ("nfe=largest reachable", nothing, {"nfe": int(solver["reachable_nfe"][-1])}, "valid"),
            ("nfe=2^32-1", nothing, {"nfe": UINT32_MAX}, "invalid"),
            ("no steps or nfe", budget, {}, "invalid"),
            ("afs=true", nothing, {"afs": True}, "any"),
            ("num_samples=0", nothing, {"num_samples": 0}, "valid"),
            ("num_samples=max", seeds, {"num_samples": limits.max_samples}, "valid"),
            ("num_samples=max+1", seeds, {"num_samples": limits.max_samples + 1}, "invalid"),
            ("num_samples=2^32-1", seeds, {"num_samples": UINT32_MAX}, "invalid"),
            ("num_samples=2, one seed", nothing, {"num_samples": 2}, "invalid"),
            ("seeds=[]", seeds, {}, "valid"),
            ("seeds=[2^63-1]", nothing, {"seeds": [2**63 - 1]}, "valid"),
            ("seeds=[2^63]", nothing, {"seeds": [2**63]}, "invalid"),
            ("seeds=[2^64-1]", nothing, {"seeds": [UINT64_MAX]}, "invalid"),
            ("seeds=10,000 values", nothing, {"seeds": list(range(10_000))}, "invalid"),
            ("seeds and base_seed", nothing, {"base_seed": 1}, "invalid"),
            ("base_seed=0", seeds, {"base_seed": 0}, "valid"),
            ("base_seed=2^63-1", seeds, {"base_seed": 2**63 - 1}, "valid"),
            ("base_seed=2^63-1, 2 samples", seeds, {"base_seed": 2**63 - 1, "num_samples": 2}, "invalid"),
            ("base_seed=2^64-1", seeds, {"base_seed": UINT64_MAX}, "invalid"),
            ("labels=[]", ("labels", "guidance"), {}, "valid"),
            ("labels=[-1]", nothing, {"labels": [-1]}, "invalid"),
            ("labels=[null class]", nothing, {"labels": [limits.num_labels - 1]}, "valid"),
            ("labels=[num_labels]", nothing, {"labels": [limits.num_labels]}, "invalid"),
            ("labels=[2^31-1]", nothing, {"labels": [INT32_MAX]}, "invalid"),
            ("labels=[-2^31]", nothing, {"labels": [-(2**31)]}, "invalid"),
            ("labels=10,000 values", nothing, {"labels": [1] * 10_000}, "invalid"),
            ("labels=3 for 2 samples", seeds, {"num_samples": 2, "labels": [1, 2, 3]}, "invalid"),
            ("guidance=min", nothing, {"guidance": [limits.min_guidance]}, "valid"),
            ("guidance=max", nothing, {"guidance": [limits.max_guidance]}, "valid"),
            ("guidance=max+", nothing, {"guidance": [_float32_after(limits.max_guidance, 1)]}, "invalid"),
            ("guidance=min-", nothing, {"guidance": [_float32_after(limits.min_guidance, -1)]}, "invalid"),
            ("guidance=nan", nothing, {"guidance": [math.nan]}, "invalid"),
            ("guidance=inf", nothing, {"guidance": [math.inf]}, "invalid"),
            ("guidance=-inf", nothing, {"guidance": [-math.inf]}, "invalid"),
            ("guidance=3.4e38", nothing, {"guidance": [3.4e38]}, "invalid"),
            ("guidance=10,000 values", nothing, {"guidance": [1.0] * 10_000}, "invalid"),
            ("guidance=2 without labels", labels, {"guidance": [2.0]}, "invalid"),
            ("output_format=RAW", nothing, {"output_format": 2}, "valid"),
            ("output_format=3", nothing, {"output_format": 3}, "invalid"),
            ("output_format=-1", nothing, {"output_format": -1}, "invalid"),
            ("output_format=2^31-1", nothing, {"output_format": INT32_MAX}, "invalid"),
            ("request_id=128 chars", nothing, {"request_id": "r" * 128}, "valid"),
            ("request_id=129 chars", nothing, {"request_id": "r" * 129}, "invalid"),
            ("preview_every=1", nothing, {"preview_every": 1}, "valid"),
            ("preview_every=steps", nothing, {"preview_every": steps}, "valid"),
            ("preview_every=steps+1", nothing, {"preview_every": steps + 1}, "invalid"),
            ("preview_every=2^32-1", nothing, {"preview_every": UINT32_MAX}, "invalid"),
            ("model=unknown", nothing, {"model": "nope"}, "invalid"),
            ("solver=unknown", nothing, {"solver": "nope"}, "invalid"),
            ("schedule=unknown", nothing, {"schedule": "nope"}, "invalid"),
        ]
        table += [
            (f"solver={name}", nothing, {"solver": name}, "any" if spec["needs_predictor"] else "valid")
            for name, spec in limits.solvers.items()
        ]
        table += [
            (f"schedule={name}", nothing, {"schedule": name}, "invalid" if name == "custom" else "valid")
            for name in limits.schedules
        ]
        return table

    def raw(self) -> Case:
        rng = self.rng
        method = rng.choice(METHODS)
        valid = self.base().SerializeToString()
        style = rng.choice(["random", "truncated", "flipped", "varint", "empty", "wrong wire type"])
        if style == "random":
            payload = rng.randbytes(rng.randrange(1, 300))
        elif style == "truncated":
            payload = valid[: rng.randrange(1, len(valid))]
        elif style == "flipped":
            flipped = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            payload = bytes(flipped)
        elif style == "varint":
            payload = b"\x20" + b"\xff" * rng.randrange(10, 40)  # field 4 (steps) with an endless varint
        elif style == "empty":
            payload = b""
        else:
            payload = b"\x0d" + rng.randbytes(4) + valid  # field 1 (model, a string) as fixed32
        return Case(self._next(), "raw", method, payload, f"{style} ({len(payload)} bytes)", "any", samples=0)

    def unknown_method(self) -> Case:
        path = self.rng.choice(["/sampler.v1.SamplerService/Nope", "/nope.v1.Service/Generate", "/x"])
        return Case(self._next(), "unknown_method", path, b"", path, "unimplemented")

    def valid(self) -> Case:
        request = self.base()
        return self._case(request, "valid", "valid", kind="valid")

    def abandoned(self, kind: str) -> Case:
        rng = self.rng
        request = self.base()
        request.steps = rng.randrange(8, 30)
        request.solver = "euler"
        if kind == "cancel":
            return Case(
                self._next(),
                kind,
                "Generate",
                request.SerializeToString(),
                "cancelled stream",
                "any",
                cancel_after=rng.uniform(0.0, 0.4),
                samples=1,
            )
        method = rng.choice(["GenerateUnary", "Generate"])
        timeout = rng.uniform(0.001, 0.2)
        return Case(
            self._next(),
            kind,
            method,
            request.SerializeToString(),
            f"deadline {timeout * 1000:.0f} ms",
            "any",
            timeout=timeout,
            samples=1,
        )


def _png(width: int, height: int, rng: random.Random | None) -> bytes:
    """An RGB PNG: random pixels from `rng`, or zeros."""
    import io

    from PIL import Image

    pixels = rng.randbytes(width * height * 3) if rng is not None else bytes(width * height * 3)
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _float32_after(value: float, direction: int) -> float:
    """The next float32 beyond `value` (guidance is a float field)."""
    import numpy as np

    return float(np.nextafter(np.float32(value), np.float32(direction * np.inf)))


def build_cases(seed: int, count: int, limits: Limits) -> list[Case]:
    """`count` cases: about 60% field mutations, 25% raw bytes, 5% valid, 6% cancelled streams,
    3.5% short deadlines, 0.5% unknown methods; the same list for the same seed and limits."""
    rng = random.Random(seed)
    maker = CaseMaker(rng, limits)
    families: list[tuple[Callable[[], Case], float]] = [
        (maker.mutation, 60),
        (maker.raw, 25),
        (maker.valid, 5),
        (lambda: maker.abandoned("cancel"), 6),
        (lambda: maker.abandoned("deadline"), 3.5),
        (maker.unknown_method, 0.5),
    ]
    makers, weights = zip(*families, strict=True)
    return [rng.choices(makers, weights=weights)[0]() for _ in range(count)]


def with_token(cases: list[Case], token: str, seed: int) -> list[Case]:
    """The cases as a client of a server with auth sends them: with `authorization: Bearer token`,
    except about 10% (not cancels or deadlines) that carry none or a wrong one and must be
    answered UNAUTHENTICATED, whatever else is wrong with them."""
    rng = random.Random(seed)
    signed = []
    for case in cases:
        header = ("authorization", f"Bearer {token}")
        expect = case.expect
        if case.kind not in ("cancel", "deadline") and rng.random() < 0.1:
            header = rng.choice(
                [("authorization", f"Bearer {token}x"), ("authorization", "Basic Zm9v"), ("x-none", "")]
            )
            expect = "unauthenticated"
        signed.append(replace(case, metadata=(*case.metadata, header), expect=expect))
    return signed


# -- the run --------------------------------------------------------------------------------


async def _send(channel: Any, case: Case) -> Outcome:
    import grpc

    from sampler_service.gen.sampler.v1 import sampler_pb2 as pb

    path = case.method if case.method.startswith("/") else SERVICE + case.method
    began = time.perf_counter()
    results = 0
    try:
        if case.method == "Generate":
            call = channel.unary_stream(path)(case.payload, timeout=case.timeout, metadata=case.metadata or None)
            if case.cancel_after is not None:
                await asyncio.sleep(case.cancel_after)
                call.cancel()
            async for raw in call:
                event = pb.GenerateEvent.FromString(raw)
                results += event.WhichOneof("event") == "result"
            code = await call.code()
        else:
            response = await channel.unary_unary(path)(
                case.payload, timeout=case.timeout, metadata=case.metadata or None
            )
            if case.method == "GenerateUnary":
                results = len(pb.GenerateResponse.FromString(response).results)
            code = grpc.StatusCode.OK
        return Outcome(case, code.name, time.perf_counter() - began, results=results)
    except asyncio.CancelledError:
        return Outcome(case, "CANCELLED", time.perf_counter() - began, results=results)
    except grpc.aio.AioRpcError as error:
        message = error.details() or ""
        seconds = time.perf_counter() - began
        fields = _violated_fields(error) if error.code() == grpc.StatusCode.INVALID_ARGUMENT else ()
        return Outcome(case, error.code().name, seconds, len(message), message[:300], results, fields)


def _violated_fields(error: Any) -> tuple[str, ...]:
    """The fields a google.rpc.BadRequest in the error's trailers names."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)
    fields: list[str] = []
    for packed in status.details if status is not None else ():
        if packed.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            packed.Unpack(bad)
            fields += [violation.field for violation in bad.field_violations]
    return tuple(fields)


async def _run_cases(port: int, cases: list[Case], concurrency: int, progress: Callable[[int], None]) -> list[Outcome]:
    import grpc

    limit = 64 * 2**20
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    outcomes: list[Outcome] = []
    queue: asyncio.Queue[Case] = asyncio.Queue()
    for case in cases:
        queue.put_nowait(case)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:

        async def worker() -> None:
            while not queue.empty():
                case = queue.get_nowait()
                outcomes.append(await _send(channel, case))
                progress(len(outcomes))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(outcomes, key=lambda o: o.case.index)


class HealthProbe(threading.Thread):
    """Checks health every `interval` seconds on its own channel; records anything not SERVING."""

    def __init__(self, port: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.stopped = threading.Event()
        self.checks = 0
        self.bad: list[str] = []
        self.worst = 0.0

    def run(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self.stopped.wait(self.interval):
                began = time.perf_counter()
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                except grpc.RpcError as error:
                    name = f"error {error.code().name}"
                self.worst = max(self.worst, time.perf_counter() - began)
                self.checks += 1
                if name != "SERVING":
                    self.bad.append(name)


def published_limits(port: int, metadata: tuple[tuple[str, str], ...] = ()) -> Limits:
    """Bounds as the server publishes them (ServerInfo, ListModels, ListSolvers) plus the schedule
    parameter schemas from the registry (the API does not list schedules)."""
    import grpc

    import solvers
    from sampler_service.gen.sampler.v1 import sampler_pb2 as pb
    from sampler_service.gen.sampler.v1 import sampler_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.SamplerServiceStub(channel)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30, metadata=metadata)
        listed = stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=metadata)
        solver_list = stub.ListSolvers(pb.ListSolversRequest(), timeout=30, metadata=metadata)
    mnist = next((m for m in listed.models if m.name == "mnist"), None)
    if mnist is None:
        raise BenchError("the server does not serve the mnist model")
    text = next((m for m in listed.models if m.kind == pb.MODEL_KIND_TEXT_TO_IMAGE), None)
    return Limits(
        max_steps=info.max_steps,
        max_samples=info.max_samples_per_request,
        min_guidance=info.min_guidance,
        max_guidance=info.max_guidance,
        num_labels=mnist.num_labels,
        solvers={
            s.name: {
                "schema": json.loads(s.parameter_schema_json),
                "min_steps": s.min_steps,
                "reachable_nfe": list(s.reachable_nfe) or [1],
                "needs_predictor": s.needs_predictor,
            }
            for s in solver_list.solvers
        },
        schedules={name: solvers.SCHEDULES.get(name).params.model_json_schema() for name in solvers.SCHEDULES.names()},
        text=None
        if text is None
        else {
            "name": text.name,
            "width": text.width,
            "height": text.height,
            "multiple": text.size_multiple,
            "distilled": text.guidance_distilled,
            "max_prompt_chars": info.max_prompt_chars,
            "min_side": info.min_image_side,
            "max_side": info.max_image_side,
            "max_pixels": info.max_image_pixels,
        },
    )


def _text_models_config(device: str, kind: str = "sd") -> Path:
    """A models config serving mnist and a tiny seeded text-to-image pipeline ("sd", or "flux": a
    guidance-distilled one) saved to a temporary folder (random weights, the real layout; no download)."""
    from models.tiny_pipelines import save_tiny_pipeline

    folder = Path(tempfile.mkdtemp(prefix="fuzz-models-"))
    save_tiny_pipeline("sd" if kind == "sd" else "flux", folder / f"tiny-{kind}")
    config = folder / "models.toml"
    config.write_text(
        f'[[models]]\nname = "mnist"\nsource = "mnist"\ndevice = "{device}"\n\n'
        f'[[models]]\nname = "tiny-{kind}"\nsource = "{folder / f"tiny-{kind}"}"\ndevice = "{device}"\n'
    )
    return config


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def _metric(port: int, name: str) -> dict[str, float]:
    """Values of one Prometheus metric, by label text."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key[len(name) :]] = float(value)
    return found


def _wait_serving(port: int, server: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.perf_counter() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() < deadline:
            if server.poll() is not None:
                raise BenchError(f"the server exited with status {server.returncode} before SERVING")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise BenchError("the server did not become SERVING in time")


def scan_log(path: Path) -> dict[str, Any]:
    """Lines, levels, non-JSON lines and tracebacks of the server's stderr log."""
    levels: Counter[str] = Counter()
    tracebacks: list[str] = []
    plain: list[str] = []
    lines = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        lines += 1
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            entry = None
        if not isinstance(entry, dict):
            plain.append(line[:200])
            if line.startswith("Traceback") or "Traceback (most recent call last)" in line:
                tracebacks.append(line[:300])
            continue
        levels[str(entry.get("level"))] += 1
        if "Traceback" in str(entry.get("error", "")) or "Traceback (most recent call last)" in str(
            entry.get("message", "")
        ):
            tracebacks.append(
                f"{entry.get('message', '')[:150]} | {str(entry.get('error', '')).splitlines()[-1][:150]}"
            )
    return {
        "lines": lines,
        "bytes": path.stat().st_size,
        "levels": dict(levels),
        "non_json_lines": len(plain),
        "non_json_examples": plain[:5],
        "tracebacks": len(tracebacks),
        "traceback_examples": tracebacks[:10],
    }


def judge(outcomes: list[Outcome], failing: list[dict[str, Any]] | None = None) -> list[str]:
    """Failure reasons of the answers (each reason once, with a count and up to 3 examples); every
    failing answer is appended to `failing` when given."""
    found: dict[str, list[str]] = defaultdict(list)

    def fail(reason: str, outcome: Outcome) -> None:
        c = outcome.case
        found[reason].append(f"#{c.index} {c.method} {c.what}: {outcome.code} {outcome.message[:160]!r}")
        if failing is not None:
            failing.append(
                {"index": c.index, "reason": reason, "kind": c.kind, "method": c.method, "what": c.what}
                | {"code": outcome.code, "message": outcome.message[:300]}
            )

    for outcome in outcomes:
        case, code = outcome.case, outcome.code
        if code == "UNKNOWN":
            fail("UNKNOWN status", outcome)
        if code == "INTERNAL":
            fail(
                "INTERNAL"
                + (" for an invalid request" if case.expect in ("invalid", "any") else " for a valid request"),
                outcome,
            )
        if code == "OK" and case.expect == "invalid":
            fail("OK for a request that breaks the published schema or limits", outcome)
        if code == "INVALID_ARGUMENT" and case.kind in ("mutation", "valid") and not outcome.fields:
            fail("INVALID_ARGUMENT without a field violation naming the field", outcome)
        if case.expect == "unauthenticated" and code != "UNAUTHENTICATED":
            fail("a call without the right token not answered UNAUTHENTICATED", outcome)
        if code == "UNAUTHENTICATED" and case.expect != "unauthenticated":
            fail("UNAUTHENTICATED for a call with the right token (or on a server without auth)", outcome)
        if case.expect == "unimplemented" and code != "UNIMPLEMENTED":
            fail("an unknown method not answered UNIMPLEMENTED", outcome)
        if outcome.message_chars > MAX_MESSAGE_CHARS:
            fail(f"status message over {MAX_MESSAGE_CHARS} characters", outcome)
        if code == "RESOURCE_EXHAUSTED" and "metadata" in outcome.message:
            fail("error trailers over the metadata limit", outcome)
        if code == "DEADLINE_EXCEEDED" and case.timeout >= REQUEST_TIMEOUT:
            fail("no answer within the request timeout (a hang)", outcome)
        if (
            code == "OK"
            and case.samples
            and case.method in ("Generate", "GenerateUnary")
            and outcome.results != case.samples
        ):
            fail("an OK answer without every sample", outcome)
    return [f"{reason}: {len(examples)} ({'; '.join(examples[:3])})" for reason, examples in found.items()]


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    by_method: dict[str, Counter[str]] = defaultdict(Counter)
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    for outcome in outcomes:
        method = outcome.case.method if not outcome.case.method.startswith("/") else "(unknown method)"
        by_method[method][outcome.code] += 1
        by_kind[outcome.case.kind][outcome.code] += 1
        if outcome.case.kind not in ("cancel", "deadline"):
            latency[method].append(outcome.seconds)
    worst = max(outcomes, key=lambda o: o.seconds if o.case.kind not in ("cancel", "deadline") else 0.0)
    # INVALID_ARGUMENT answers to a mutation whose violations name another field than the mutated
    # one (a cross-field rule, or a message naming the wrong field): listed, not failures
    elsewhere = Counter(
        f"{o.case.what} -> {', '.join(o.fields)}"
        for o in outcomes
        if o.code == "INVALID_ARGUMENT"
        and o.case.kind == "mutation"
        and o.fields
        and not any(f.startswith(o.case.field) for f in o.fields)
    )
    valid_rejected = Counter(
        f"{o.case.what} -> {o.code}" for o in outcomes if o.case.expect == "valid" and o.code != "OK"
    )
    return {
        "requests": len(outcomes),
        "codes": dict(Counter(o.code for o in outcomes)),
        "by_method": {m: dict(c) for m, c in sorted(by_method.items())},
        "by_kind": {k: dict(c) for k, c in sorted(by_kind.items())},
        "latency_s": {
            m: {"p50": statistics.median(v), "p99": sorted(v)[int(0.99 * (len(v) - 1))], "max": max(v)}
            for m, v in sorted(latency.items())
        },
        "worst_latency_s": worst.seconds,
        "worst_latency_request": f"#{worst.case.index} {worst.case.method} {worst.case.what} -> {worst.code}",
        "schema_valid_not_ok": dict(valid_rejected.most_common(20)),
        "violations_naming_another_field": dict(elsewhere.most_common(30)),
    }


def run(args: argparse.Namespace) -> int:
    meta = provenance.collect(options_of(args))
    port, metrics_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "SAMPLER_PORT": str(port),
        "SAMPLER_HOST": "127.0.0.1",
        "SAMPLER_DEVICE": args.device,
        "SAMPLER_METRICS_PORT": str(metrics_port),
        **({"SAMPLER_AUTH_TOKEN": TOKEN} if args.auth else {}),
        **({"SAMPLER_MODELS_CONFIG": str(_text_models_config(args.device, args.text_kind))} if args.text else {}),
        "HF_HUB_OFFLINE": "1",
    }
    log_file = Path(tempfile.mkstemp(prefix="fuzz-server-", suffix=".log")[1])
    started = time.perf_counter()
    with log_file.open("wb") as log_stream:
        server = subprocess.Popen(
            [sys.executable, "-m", "sampler_service", "serve"], env=env, stdout=log_stream, stderr=subprocess.STDOUT
        )
    failures: list[str] = []
    probe: HealthProbe | None = None
    try:
        _wait_serving(port, server)
        seconds_to_serving = time.perf_counter() - started
        token = (("authorization", f"Bearer {TOKEN}"),) if args.auth else ()
        limits = published_limits(port, token)
        cases = build_cases(args.seed, args.requests, limits)
        warm = [c for c in build_cases(args.seed + 1, 200, limits) if c.kind == "valid"][:8]
        if args.auth:
            cases, warm = with_token(cases, TOKEN, args.seed), [replace(c, metadata=token) for c in warm]
        warmed = asyncio.run(_run_cases(port, warm, 4, lambda done: None))  # first calls of each kind
        rss_before = _rss_kib(server.pid)
        probe = HealthProbe(port)
        probe.start()
        shown = [0.0]

        def progress(done: int) -> None:
            if time.perf_counter() - shown[0] > 10:
                shown[0] = time.perf_counter()
                print(f"  {done}/{len(cases)} requests", file=sys.stderr, flush=True)

        began = time.perf_counter()
        outcomes = asyncio.run(_run_cases(port, cases, args.concurrency, progress))
        wall = time.perf_counter() - began
        probe.stopped.set()
        probe.join(30)
        # admission slots of cancelled and failed requests come back
        deadline = time.perf_counter() + 30
        admitted = _metric(metrics_port, "sampler_admitted_requests").get("", math.nan)
        while admitted != 0 and time.perf_counter() < deadline:
            time.sleep(0.2)
            admitted = _metric(metrics_port, "sampler_admitted_requests").get("", math.nan)
        rss_after = _rss_kib(server.pid)
        server_counts = _metric(metrics_port, "sampler_requests_total")
        if server.poll() is not None:
            failures.append(f"the server exited with status {server.returncode} during the run")
    finally:
        if probe is not None:
            probe.stopped.set()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
    log = scan_log(log_file)
    log_file.unlink()
    if args.text:
        shutil.rmtree(Path(env["SAMPLER_MODELS_CONFIG"]).parent, ignore_errors=True)
    failing: list[dict[str, Any]] = []
    failures += judge(outcomes, failing)
    # the server's own count of OK answers of the cheap unary methods matches what clients saw
    # (published_limits made one call each to GetServerInfo, ListModels, ListSolvers)
    seen = Counter(o.case.method for o in [*warmed, *outcomes] if o.code == "OK")
    seen.update(["GetServerInfo", "ListModels", "ListSolvers"])
    for method in ("Plan", "ListModels", "ListSolvers", "GetServerInfo"):
        counted = server_counts.get(f'{{code="OK",method="{method}"}}', 0.0)
        if counted != seen[method]:
            failures.append(f"the server counted {counted:g} OK {method} answers; clients got {seen[method]}")
    if log["tracebacks"]:
        failures.append(
            f"tracebacks in the server log: {log['tracebacks']} ({'; '.join(log['traceback_examples'][:3])})"
        )
    if log["non_json_lines"]:
        failures.append(
            f"plain (non-JSON) lines in the server log: {log['non_json_lines']} "
            f"({'; '.join(log['non_json_examples'][:2])})"
        )
    if probe.bad:
        failures.append(
            f"health not SERVING at {len(probe.bad)} of {probe.checks} probes ({', '.join(sorted(set(probe.bad)))})"
        )
    if admitted != 0:
        failures.append(f"{admitted} admission slots still held 30 s after the run")
    summary = summarise(outcomes)
    summary.update(
        {
            "seed": args.seed,
            "concurrency": args.concurrency,
            "wall_seconds": wall,
            "requests_per_second": len(outcomes) / wall,
            "seconds_to_serving": seconds_to_serving,
            "rss_kib_before": rss_before,
            "rss_kib_after": rss_after,
            "health_probes": probe.checks,
            "health_not_serving": len(probe.bad),
            "health_worst_seconds": probe.worst,
            "admitted_after": admitted,
            "server_log": log,
            "server_requests_total": server_counts,
            "verdict": "FAIL" if failures else "PASS",
            "failures": failures,
        }
    )
    meta["summary"] = summary
    # what was sent and answered, for the first 100 failures of each reason
    per_reason: Counter[str] = Counter()
    meta["failing_requests"] = []
    for entry in failing:
        per_reason[entry["reason"]] += 1
        if per_reason[entry["reason"]] <= 100:
            meta["failing_requests"].append(entry)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"method": method, "code": code, "count": count}
        for method, counts in summary["by_method"].items()
        for code, count in sorted(counts.items())
    ]
    provenance.write_csv(args.out / "counts.csv", rows, ("method", "code", "count"))
    provenance.write_json(args.out / "fuzz.json", meta, rows)
    (args.out / "summary.md").write_text(render_markdown(meta, summary), encoding="utf-8")
    print(render_markdown(meta, summary))
    return 1 if failures else 0


def render_markdown(meta: dict[str, Any], summary: dict[str, Any]) -> str:
    codes = sorted({code for counts in summary["by_method"].values() for code in counts})
    lines = [
        f"# fuzz: {summary['verdict']}",
        "",
        f"`{meta['command']}` at {meta['git']['revision'][:12] if meta['git'] else '?'}"
        f"{' (dirty tree)' if meta['git'] and meta['git']['dirty'] else ''}, {meta['timestamp_utc']}, "
        f"{meta['device']['cpu']} ({meta['device']['cpu_count']} CPUs), torch {meta['versions'].get('torch')}.",
        "",
        f"{summary['requests']} requests (seed {summary['seed']}, {summary['concurrency']} concurrent) in "
        f"{summary['wall_seconds']:.0f} s ({summary['requests_per_second']:.0f}/s). Worst latency "
        f"{summary['worst_latency_s']:.2f} s ({summary['worst_latency_request']}). Server RSS "
        f"{summary['rss_kib_before'] / 1024:.0f} MiB before, {summary['rss_kib_after'] / 1024:.0f} MiB after. "
        f"Health: {summary['health_probes']} probes, {summary['health_not_serving']} not SERVING. "
        f"Admitted after the run: {summary['admitted_after']:g}. Server log: {summary['server_log']['lines']} lines, "
        f"{summary['server_log']['tracebacks']} tracebacks, {summary['server_log']['non_json_lines']} non-JSON lines.",
        "",
        "| method | " + " | ".join(codes) + " |",
        "|---|" + "---|" * len(codes),
    ]
    for method, counts in summary["by_method"].items():
        lines.append(f"| {method} | " + " | ".join(str(counts.get(code, "")) for code in codes) + " |")
    lines += ["", "| kind | " + " | ".join(codes) + " |", "|---|" + "---|" * len(codes)]
    for kind, counts in summary["by_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(counts.get(code, "")) for code in codes) + " |")
    if summary["failures"]:
        lines += ["", "## Failures", ""] + [f"- {reason}" for reason in summary["failures"]]
    if summary["violations_naming_another_field"]:
        lines += ["", "INVALID_ARGUMENT naming another field than the mutated one (not failures; most frequent):", ""]
        lines += [f"- {what}: {count}" for what, count in summary["violations_naming_another_field"].items()]
    if summary["schema_valid_not_ok"]:
        lines += ["", "Schema-valid requests not answered OK (not failures; most frequent):", ""]
        lines += [f"- {what}: {count}" for what, count in summary["schema_valid_not_ok"].items()]
    return "\n".join(lines) + "\n"
