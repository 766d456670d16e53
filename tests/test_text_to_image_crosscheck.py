"""Cross-check against diffusers itself: tiny random Stable Diffusion and SDXL pipelines, saved
with `save_pretrained` and loaded back through `models.load`, sample the same latents and images
through our solvers as diffusers' own pipelines do with its schedulers.

For each pipeline class, the same prompts, negative prompts, guidance and initial latents go to
(a) our path: `model.conditioned(...)` -> `solvers.sample(solver, schedule="discrete")` ->
`model.decode`, and (b) the diffusers pipeline with `EulerDiscreteScheduler` /
`DPMSolverMultistepScheduler` on the same trained timesteps. Both end either at the last trained
sigma (`final_sigmas_type="sigma_min"`, our plain run) or with a final step to sigma 0 (diffusers'
default, our `final_denoise`). Latents and decoded images agree to REL_TOL in float32.

Where the two sides keep different states: Euler-discrete steps the EDM state x (ours), DPM-Solver
steps x_vp = x / sqrt(1 + sigma^2); the diffusers pipeline is fed the start in its space and our
result is compared in that space (at sigma 0 both are the data prediction).

The same comparison with a one-index timestep shift or a wrong VAE scaling factor fails
(`test_the_crosscheck_catches_*`), so it can catch the errors it exists for.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import Tensor

import models
from models.diffusers_unet import VPDiscreteSchedule
from models.tiny_pipelines import save_tiny_pipeline
from solvers import make_noise, sample, start_step

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REL_TOL = 1e-4
STEPS = 8
SIZE = 32  # pixels; latents 8 x 8 with the tiny VAE's factor 4
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor of mountains at sunrise"]
NEGATIVE = ["blurry, low quality", "text, watermark"]
# "sd-v": an SD 2.x-style v-prediction model.
PIPELINES = {"sd": StableDiffusionPipeline, "sd-v": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def folders(tiny_pipelines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    v_model = save_tiny_pipeline("sd", tmp_path_factory.mktemp("v") / "sd-v", prediction_type="v_prediction")
    return {**tiny_pipelines, "sd-v": v_model}


@pytest.fixture(scope="module")
def ours(folders: dict[str, Path]) -> dict[str, models.TextToImageModel]:
    loaded = {}
    for kind, folder in folders.items():
        model = models.load(folder, device="cpu", name=kind)
        assert isinstance(model, models.TextToImageModel)
        loaded[kind] = model
    return loaded


@pytest.fixture(scope="module")
def theirs(folders: dict[str, Path]) -> dict[str, Any]:
    pipelines = {}
    for kind, cls in PIPELINES.items():
        pipeline = cls.from_pretrained(str(folders[kind]), local_files_only=True)
        pipeline.set_progress_bar_config(disable=True)
        pipelines[kind] = pipeline
    return pipelines


def linspace_timesteps(count: int, steps: int) -> list[int]:
    """The trained timesteps of our `discrete` linspace schedule: round(linspace(T-1, 0, S+1))."""
    return np.linspace(count - 1, 0, steps + 1).round().astype(np.int64).tolist()


def relative_difference(ours: Tensor, reference: Tensor) -> float:
    return float(torch.linalg.vector_norm(ours.double() - reference.double()) / torch.linalg.vector_norm(reference))


def run_ours(
    model: models.TextToImageModel,
    solver: str,
    final: str,
    guidance: float,
    negative: list[str] | None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor]:
    """Our run (the solver state in `dtype`); returns (latents, images in [0, 1], the float64 grid)."""
    denoiser = model.conditioned(PROMPTS, negative, guidance, height=SIZE, width=SIZE)
    noise = make_noise([0, 1], model.latent_shape(SIZE, SIZE), dtype=dtype)
    params = {"lower_order_final": False} if solver == "dpmpp_2m" else None
    with torch.no_grad():
        result = sample(
            denoiser,
            noise,
            solver=solver,
            steps=STEPS,
            schedule="discrete",
            schedule_params={"spacing": "linspace"},
            solver_params=params,
            final_denoise=final == "zero",
        )
    # The grid is exactly the trained levels at the linspace timesteps.
    assert model.sigma_levels is not None
    assert torch.equal(result.sigmas, model.sigma_levels[linspace_timesteps(1000, STEPS)])
    latents = result.images
    if solver == "dpmpp_2m" and final == "sigma_min":
        latents = latents / math.sqrt(1.0 + result.sigmas[-1].item() ** 2)  # into DPM-Solver's VP space
    images = model.decode(latents) / 2 + 0.5
    return latents, images, result.sigmas


def run_theirs(
    pipeline: Any,
    solver: str,
    final: str,
    guidance: float,
    negative: list[str] | None,
    sigma_max: float,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """The diffusers pipeline on the same timesteps and initial noise; returns (latents, images in [0, 1])."""
    timesteps = linspace_timesteps(1000, STEPS)
    if final == "sigma_min":
        timesteps = timesteps[:-1]  # the final sigma_min is the last trained level, timestep 0
    if solver == "euler":
        # timestep_spacing "linspace": init_noise_sigma is then sigma_max itself, as our start.
        scheduler = EulerDiscreteScheduler.from_config(
            pipeline.scheduler.config, timestep_spacing="linspace", final_sigmas_type=final
        )
        start = make_noise([0, 1], (4, SIZE // 4, SIZE // 4), dtype=dtype)
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(
            pipeline.scheduler.config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=False,
            final_sigmas_type=final,
        )
        # init_noise_sigma is 1: the start is x_vp = sigma_max eps / sqrt(1 + sigma_max^2).
        start = make_noise([0, 1], (4, SIZE // 4, SIZE // 4), dtype=dtype) * (sigma_max / math.sqrt(1.0 + sigma_max**2))
    pipeline.scheduler = scheduler
    arguments: dict[str, Any] = {
        "prompt": PROMPTS,
        "negative_prompt": negative,
        "guidance_scale": guidance,
        "timesteps": timesteps,
        "height": SIZE,
        "width": SIZE,
    }
    with torch.no_grad():
        latents = pipeline(**arguments, latents=start.clone(), output_type="latent").images
        images = pipeline(**arguments, latents=start.clone(), output_type="pt").images
    return latents, images


CASES = [
    pytest.param(kind, solver, final, id=f"{kind}-{solver}-{final}")
    for kind in PIPELINES
    for solver in ("euler", "dpmpp_2m")
    for final in ("sigma_min", "zero")
]


@pytest.mark.parametrize(("kind", "solver", "final"), CASES)
def test_guided_sampling_matches_the_diffusers_pipeline(
    ours: dict[str, models.TextToImageModel], theirs: dict[str, Any], kind: str, solver: str, final: str
) -> None:
    model = ours[kind]
    latents, images, sigmas = run_ours(model, solver, final, 7.5, NEGATIVE)
    ref_latents, ref_images = run_theirs(theirs[kind], solver, final, 7.5, NEGATIVE, sigmas[0].item())

    assert images.shape == ref_images.shape == (2, 3, SIZE, SIZE)
    assert relative_difference(latents, ref_latents) <= REL_TOL
    assert relative_difference(images, ref_images) <= REL_TOL


# In float64 (both sides: our model and solver state, the whole diffusers pipeline) what is left is
# diffusers' float32 sigma table: measured 3.8-4.6e-7 on the latents, 4-6e-8 on the images.
REL_TOL_FLOAT64 = 2e-6


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_float64_agrees_tighter(folders: dict[str, Path], kind: str, solver: str) -> None:
    model = models.load(folders[kind], device="cpu", dtype="float64")
    assert isinstance(model, models.TextToImageModel)
    pipeline = PIPELINES[kind].from_pretrained(str(folders[kind]), local_files_only=True, dtype=torch.float64)
    pipeline.set_progress_bar_config(disable=True)
    latents, images, sigmas = run_ours(model, solver, "zero", 7.5, NEGATIVE, torch.float64)
    ref_latents, ref_images = run_theirs(pipeline, solver, "zero", 7.5, NEGATIVE, sigmas[0].item(), torch.float64)

    assert ref_latents.dtype == torch.float64
    assert relative_difference(latents, ref_latents) <= REL_TOL_FLOAT64
    assert relative_difference(images, ref_images) <= REL_TOL_FLOAT64


@pytest.mark.parametrize(
    ("kind", "guidance", "negative"),
    [
        pytest.param("sd", 1.0, None, id="sd-conditional_only"),
        pytest.param("sd", 4.0, None, id="sd-empty_negative"),
        pytest.param("sdxl", 1.0, None, id="sdxl-conditional_only"),
        pytest.param("sdxl", 4.0, None, id="sdxl-zeros_for_empty_negative"),
    ],
)
def test_conditioning_variants_match_the_diffusers_pipeline(
    ours: dict[str, models.TextToImageModel],
    theirs: dict[str, Any],
    kind: str,
    guidance: float,
    negative: list[str] | None,
) -> None:
    model = ours[kind]
    latents, images, sigmas = run_ours(model, "euler", "zero", guidance, negative)
    ref_latents, ref_images = run_theirs(theirs[kind], "euler", "zero", guidance, negative, sigmas[0].item())

    assert relative_difference(latents, ref_latents) <= REL_TOL
    assert relative_difference(images, ref_images) <= REL_TOL


def test_the_crosscheck_catches_a_one_index_timestep_shift(
    ours: dict[str, models.TextToImageModel], theirs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    shifted = VPDiscreteSchedule.sigma_to_timestep
    monkeypatch.setattr(VPDiscreteSchedule, "sigma_to_timestep", lambda self, sigma: shifted(self, sigma) + 1)
    for kind in ("sd", "sdxl"):
        latents, _, sigmas = run_ours(ours[kind], "euler", "zero", 7.5, NEGATIVE)
        ref_latents, _ = run_theirs(theirs[kind], "euler", "zero", 7.5, NEGATIVE, sigmas[0].item())

        assert relative_difference(latents, ref_latents) > 10 * REL_TOL


def test_the_crosscheck_catches_a_wrong_vae_scaling_factor(
    ours: dict[str, models.TextToImageModel], theirs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for kind in ("sd", "sdxl"):
        model = ours[kind]
        monkeypatch.setattr(model.codec, "scaling_factor", 0.13025)  # SDXL's, where SD 1.x's belongs
        latents, images, sigmas = run_ours(model, "euler", "zero", 7.5, NEGATIVE)
        ref_latents, ref_images = run_theirs(theirs[kind], "euler", "zero", 7.5, NEGATIVE, sigmas[0].item())

        assert relative_difference(latents, ref_latents) <= REL_TOL  # sampling does not read the VAE
        assert relative_difference(images, ref_images) > 10 * REL_TOL


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.5, 0.75, 1.0])
def test_img2img_matches_the_diffusers_img2img_pipeline(
    ours: dict[str, models.TextToImageModel], folders: dict[str, Path], solver: str, strength: float
) -> None:
    model = ours["sd"]
    init_images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 2 - 1
    init = model.encode(init_images)
    noise = make_noise([3, 4], model.latent_shape(SIZE, SIZE))
    start = start_step(STEPS, strength)
    denoiser = model.conditioned(PROMPTS, NEGATIVE, 7.5, height=SIZE, width=SIZE)
    params = {"lower_order_final": False} if solver == "dpmpp_2m" else None
    with torch.no_grad():
        result = sample(
            denoiser,
            noise,
            solver=solver,
            steps=STEPS,
            schedule="discrete",
            schedule_params={"spacing": "linspace"},
            solver_params=params,
            init=init,
            start=start,
        )
    assert result.nfe == result.steps == int(STEPS * strength)  # the steps actually run
    latents = result.images
    if solver == "dpmpp_2m":
        latents = latents / math.sqrt(1.0 + result.sigmas[-1].item() ** 2)

    pipeline = StableDiffusionImg2ImgPipeline.from_pretrained(str(folders["sd"]), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    if solver == "euler":
        pipeline.scheduler = EulerDiscreteScheduler.from_config(
            pipeline.scheduler.config, timestep_spacing="linspace", final_sigmas_type="sigma_min"
        )
    else:
        pipeline.scheduler = DPMSolverMultistepScheduler.from_config(
            pipeline.scheduler.config,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=False,
            final_sigmas_type="sigma_min",
        )
    with torch.no_grad():
        reference = pipeline(
            prompt=PROMPTS,
            negative_prompt=NEGATIVE,
            image=init,  # latents (4 channels) are taken as the encoded image, as they are
            strength=strength,
            guidance_scale=7.5,
            timesteps=linspace_timesteps(1000, STEPS)[:-1],
            generator=[torch.Generator().manual_seed(seed) for seed in (3, 4)],  # one per sample, as make_noise
            output_type="latent",
        ).images

    assert relative_difference(latents, reference) <= REL_TOL
    assert relative_difference(latents, init) > 0.01  # it did move
