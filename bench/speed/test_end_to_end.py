"""End-to-end sampling with the embedded `mnist` model, against one forward pass and against a
diffusers sampling loop on the same UNet, batch and NFE (pytest-benchmark; `make bench`).

Groups, per NFE in (5, 10) at batch BATCH, conditional pass only (one evaluation per call):
- `forward`: one adapter call D(x, sigma) (input scaling, timestep lookup, UNet, eps -> D);
- `ours`: `solvers.sample(..., solver="dpmpp_2m", steps=NFE)`, noise generation included;
- `diffusers`: `DPMSolverMultistepScheduler` (DPM-Solver++ 2M, the scheduler's defaults) driving
  the same UNet: set_timesteps, scale_model_input, unet, step, per-seed CPU noise as ours.

The goals (sampling wall time <= 1.05 x NFE x one forward; ours / diffusers <= 1.02 on CPU) are
ratios of medians from one run, summarised by `python -m bench model-speed` (make bench-unet).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

import models
import solvers

BATCH = 16
NFES = (5, 10)
SETTINGS = {"rounds": 10, "warmup_rounds": 2}


@pytest.fixture(scope="module")
def mnist() -> models.DiffusionModel:
    return models.load("mnist")


@pytest.fixture(scope="module")
def labels(mnist: models.DiffusionModel) -> torch.Tensor:
    return (torch.arange(BATCH) % 10).to(mnist.device)


def _sync(model: models.DiffusionModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def _info(benchmark, group: str, nfe: int, model: models.DiffusionModel) -> None:
    benchmark.group = f"{group}"
    benchmark.extra_info.update(
        kind=group,
        nfe=nfe,
        batch=BATCH,
        device=str(model.device),
        torch_threads=torch.get_num_threads(),
        fingerprint=model.fingerprint,
    )


def test_forward(benchmark, mnist: models.DiffusionModel, labels: torch.Tensor) -> None:
    denoiser = mnist.conditioned(labels, 1.0)
    x = torch.randn(BATCH, *mnist.sample_shape, generator=torch.Generator().manual_seed(0)).to(mnist.device)
    sigma = torch.full((BATCH,), 1.0, device=mnist.device)

    def run() -> None:
        with torch.inference_mode():
            denoiser(x, sigma)
        _sync(mnist)

    _info(benchmark, "forward", 1, mnist)
    benchmark.pedantic(run, **SETTINGS)


@pytest.mark.parametrize("nfe", NFES)
def test_ours(benchmark, mnist: models.DiffusionModel, labels: torch.Tensor, nfe: int) -> None:
    denoiser = mnist.conditioned(labels, 1.0)

    def run() -> int:
        noise = solvers.make_noise(list(range(BATCH)), mnist.sample_shape, device=mnist.device)
        with torch.inference_mode():
            result = solvers.sample(denoiser, noise, solver="dpmpp_2m", steps=nfe)
        _sync(mnist)
        return result.nfe

    _info(benchmark, "ours", nfe, mnist)
    assert benchmark.pedantic(run, **SETTINGS) == nfe


@pytest.mark.parametrize("nfe", NFES)
def test_diffusers(benchmark, mnist: models.DiffusionModel, labels: torch.Tensor, nfe: int) -> None:
    scheduler = DPMSolverMultistepScheduler.from_config(mnist.scheduler_config)
    unet = mnist.unet

    def run() -> int:
        calls = 0
        scheduler.set_timesteps(nfe, device=mnist.device)
        noise = solvers.make_noise(list(range(BATCH)), mnist.sample_shape, device=mnist.device)
        x = noise * scheduler.init_noise_sigma
        with torch.inference_mode():
            for t in scheduler.timesteps:
                eps = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
                calls += 1
                x = scheduler.step(eps, t, x).prev_sample
        _sync(mnist)
        return calls

    _info(benchmark, "diffusers", nfe, mnist)
    assert benchmark.pedantic(run, **SETTINGS) == nfe
