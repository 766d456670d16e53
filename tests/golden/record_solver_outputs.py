"""Record every solver's outputs on the exact Gaussian-mixture model into solver_outputs.safetensors.

Run once on the code whose numbers are to be kept (it was run on main at ff0f0c3, before the solver
bodies were shared with AMED-Plugin); tests/test_solvers_golden.py compares today's solvers with it.

    PYTHONPATH=$PWD python tests/golden/record_solver_outputs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

import solvers
from models.analytic import GaussianMixtureDenoiser
from solvers.amed import PredictorConfig, new_predictor

HERE = Path(__file__).resolve().parent
FIXTURE = HERE / "solver_outputs.safetensors"
SEEDS = [0, 1, 2]


def cases() -> list[dict[str, Any]]:
    """(name, options) of every run pinned: each solver with its defaults, with and without AFS, and
    the parameters that pick another code path."""
    out: list[dict[str, Any]] = []
    for spec in solvers.list_solvers():
        steps = max(5, spec.min_steps_of(spec.params()))
        for afs in (False, True):
            out.append({"solver": spec.name, "steps": steps, "afs": afs})
    variants: list[tuple[str, dict[str, Any], int]] = [
        ("dpm_solver_2", {"r": 0.3}, 4),
        ("ipndm", {"max_order": 2}, 6),
        ("ipndm_v", {"max_order": 3}, 6),
        ("deis", {"max_order": 2}, 6),
        ("dpmpp_2m", {"lower_order_final": False}, 6),
        ("dpmpp_2m", {"thresholding": True, "threshold_ratio": 0.9, "threshold_max": 1.5}, 6),
        ("dpmpp_3m", {"third_order": "upstream"}, 7),
        ("dpmpp_3m", {}, 12),
        ("unipc", {"order": 3, "variant": "bh1"}, 6),
        ("unipc", {"corrector": False}, 6),
        ("amed_plugin", {"base": "euler"}, 4),
        ("amed_plugin", {"base": "dpm_solver_2"}, 4),
        ("amed_plugin", {"base": "ipndm", "max_order": 2}, 4),
        ("amed_plugin", {"base": "ipndm_v"}, 4),
        ("amed_plugin", {"base": "ipndm_v", "max_order": 2}, 4),
        ("amed_plugin", {"base": "dpmpp_2m"}, 4),
        ("amed_plugin", {"base": "dpmpp_2m", "max_order": 3}, 4),
        ("amed_plugin", {"base": "dpmpp_2m", "max_order": 1}, 4),
    ]
    for solver, params, steps in variants:
        for afs in (False, True):
            out.append({"solver": solver, "steps": steps, "afs": afs, "solver_params": params})
    # Image-to-image entry and the final denoise.
    out.append({"solver": "heun", "steps": 6, "start": 2, "init": True})
    out.append({"solver": "unipc", "steps": 6, "start": 3, "init": True, "final_denoise": True})
    out.append({"solver": "dpmpp_2m", "steps": 5, "schedule": "logsnr", "final_denoise": True})
    return out


def predictor() -> Any:
    """A table-mode predictor away from its neutral start (r = 1/2, c = a = 1), so r, c and a all act."""
    net = new_predictor(PredictorConfig(dc=0.2, da=0.2), seed=0).double()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return net.eval()


def run(case: dict[str, Any], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Final images and every step's state and data prediction of one case."""
    model = GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)
    noise = solvers.make_noise(SEEDS, (2, 2, 2), dtype=dtype)
    options = dict(case)
    if options.pop("init", False):
        options["init"] = model.sample_data(len(SEEDS), seed=5).reshape(noise.shape).to(dtype)
    if solvers.SOLVERS.get(case["solver"]).needs_predictor:
        options["predictor"] = predictor()
    states: list[torch.Tensor] = []
    denoised: list[torch.Tensor] = []

    def keep(info: solvers.StepInfo) -> None:
        states.append(info.x.clone())
        denoised.append(info.denoised.clone())

    result = solvers.sample(model, noise, callback=keep, **options)
    return {
        "images": result.images,
        "states": torch.stack(states),
        "denoised": torch.stack(denoised),
        "nfe": torch.tensor([result.nfe]),
    }


def key(case: dict[str, Any]) -> str:
    return json.dumps(case, sort_keys=True)


def main() -> int:
    torch.set_num_threads(1)
    tensors: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for index, case in enumerate(cases()):
        for dtype in (torch.float64, torch.float32):
            tag = f"{index}.{str(dtype).removeprefix('torch.')}"
            names[tag] = key(case)
            for field, value in run(case, dtype).items():
                tensors[f"{tag}.{field}"] = value.contiguous()
    save_file(tensors, str(FIXTURE), metadata={"cases": json.dumps(names)})
    print(f"wrote {len(names)} runs to {FIXTURE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
