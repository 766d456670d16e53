"""Every solver gives the numbers it gave before the solver bodies were shared with AMED-Plugin.

tests/golden/solver_outputs.safetensors was recorded by tests/golden/record_solver_outputs.py on
main at ff0f0c3 (each solver with its defaults and the parameters that choose another code path,
with and without AFS, img2img entry and final denoise; float64 and float32; AMED with a predictor
away from its neutral start). The classic solvers must match bit for bit; AMED's per-sample
updates now run through the base solvers' own step rules, whose coefficients are formed in another
order (float64 per sample, then cast), so AMED matches to rounding: measured at most 4e-15
relative in float64 and 4.2e-6 in float32 (the bounds below are 1e-12 and 1e-5). The 12-step
dpmpp_3m case spells out the default it was recorded with (lower_order_final_below=10) since the
default became every step count.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import solvers

GOLDEN = Path(__file__).resolve().parent / "golden"
sys.path.insert(0, str(GOLDEN))
import record_solver_outputs as recorder  # noqa: E402

with safe_open(str(recorder.FIXTURE), "pt") as handle:
    _CASES: dict[str, str] = json.loads((handle.metadata() or {})["cases"])
    _STORED = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)

# AMED's relative tolerance per dtype (max |new - old| / max |old| over a run's outputs).
AMED_TOLERANCE = {"float64": 1e-12, "float32": 1e-5}


def test_every_registered_solver_is_pinned():
    pinned = {json.loads(case)["solver"] for case in _CASES.values()}
    assert pinned == set(solvers.SOLVERS.names())


@pytest.mark.parametrize("tag", sorted(_CASES, key=lambda t: (int(t.split(".")[0]), t)))
def test_solver_outputs_match_the_recorded_ones(tag):
    case = json.loads(_CASES[tag])
    dtype = getattr(torch, tag.split(".")[1])
    outputs = recorder.run(case, dtype)
    amed = solvers.SOLVERS.get(case["solver"]).needs_predictor
    for field, value in outputs.items():
        stored = _STORED[f"{tag}.{field}"]
        assert value.dtype == stored.dtype, field
        assert value.shape == stored.shape, field
        if not amed or field == "nfe":
            assert torch.equal(value, stored), f"{field} of {case} changed: max diff {(value - stored).abs().max()}"
        else:
            scale = stored.abs().max().item()
            error = (value - stored).abs().max().item() / scale
            assert error <= AMED_TOLERANCE[tag.split(".")[1]], f"{field} of {case}: relative difference {error:.3g}"
