"""Cross-check against diffusers: tiny random SD3 and Flux pipelines, saved with `save_pretrained`
and loaded back through `models.load`, sample the same latents and images through our solvers in
the EDM sigma form as diffusers' own pipelines do in flow time.

The grid: our `discrete` schedule (linspace spacing) over the model's trained levels, the
training times t = k / N shifted. The test builds the same grid on diffusers' side independently:
unshifted times u_i = (round(linspace(N - 2, 0, S + 1)) + 1) / N, which the pipeline's own
FlowMatchEulerDiscreteScheduler shifts (SD3's static shift, Flux's e^mu with mu from the token
count, both computed by diffusers). diffusers' default grid starts at t = 1 (sigma = inf in our
form); ours ends at t_max = 1 - 1 / N, so diffusers is run on our grid through the pipelines'
`sigmas` argument. Both end with a step to t = 0, which is D at the last grid point: our
`final_denoise`.

DPM-Solver++ and UniPC: diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler with
use_flow_sigmas build a fixed grid and cast the network's timesteps to integers, while the update
uses the float sigmas. `_on_the_model_grid` subclasses them to take the grid of the model's own
FlowMatchEulerDiscreteScheduler (as above) and feed the network the same float timesteps t N; the
update rules are diffusers' untouched.

Latents and decoded images agree to REL_TOL in float32. The same comparison without the shift, or
with t where sigma belongs in D = (x - sigma v) / (1 + sigma), or with the VAE's shift factor
left out, fails (`test_the_crosscheck_catches_*`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from torch import Tensor

import models
from models.flow import FlowSchedule
from models.flow_transformers import pack, unpack
from solvers import make_noise, sample, start_step

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

REL_TOL = 1e-4
STEPS = 6
SIZE = 32  # pixels: latents 8 x 8 with the tiny VAE's factor 4, 4 x 4 tokens
N = 1000  # the tiny schedulers' num_train_timesteps
PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor of mountains at sunrise"]
NEGATIVE = ["blurry, low quality", "text, watermark"]
PIPELINES = {
    "sd3": StableDiffusion3Pipeline,
    "sd3-no-t5": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "flux-cfg": FluxPipeline,
}
SOLVER_PARAMS: dict[str, dict[str, Any] | None] = {
    "euler": None,
    "dpmpp_2m": {"lower_order_final": False},
    "unipc": {"lower_order_final": False},
}


@pytest.fixture(scope="module")
def folders(flow_pipelines: dict[str, Path]) -> dict[str, Path]:
    return flow_pipelines


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
        # A folder saved without T5 is loaded by naming the missing parts, as diffusers documents.
        missing = {"text_encoder_3": None, "tokenizer_3": None} if kind == "sd3-no-t5" else {}
        pipeline = cls.from_pretrained(str(folders[kind]), local_files_only=True, **missing)
        pipeline.set_progress_bar_config(disable=True)
        pipeline.model_scheduler_config = dict(pipeline.scheduler.config)  # runs swap the scheduler
        pipelines[kind] = pipeline
    return pipelines


def unshifted_times(steps: int) -> list[float]:
    """The grid's unshifted flow times, built here from the training grid alone."""
    idx = np.linspace(N - 2, 0, steps + 1).round()
    return ((idx + 1) / N).tolist()


def relative_difference(ours: Tensor, reference: Tensor) -> float:
    return float(torch.linalg.vector_norm(ours.double() - reference.double()) / torch.linalg.vector_norm(reference))


def model_grid(pipeline: Any) -> tuple[Tensor, float | None]:
    """(the shifted flow times of the grid, float32, with the final 0; mu or None), from the
    pipeline's own FlowMatchEulerDiscreteScheduler."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.model_scheduler_config)
    mu = None
    if scheduler.config.use_dynamic_shifting:
        tokens = (SIZE // pipeline.vae_scale_factor // 2) ** 2
        mu = calculate_shift(
            tokens,
            scheduler.config.base_image_seq_len,
            scheduler.config.max_image_seq_len,
            scheduler.config.base_shift,
            scheduler.config.max_shift,
        )
    scheduler.set_timesteps(sigmas=unshifted_times(STEPS), mu=mu)
    return scheduler.sigmas.clone(), mu


def _on_the_model_grid(cls: type, grid: Tensor) -> type:
    """`cls` (DPMSolverMultistepScheduler or UniPCMultistepScheduler) stepping on `grid` (flow
    times ending in 0) with the network fed float timesteps (see the module docstring)."""

    class OnTheModelGrid(cls):  # type: ignore[misc, valid-type]
        def set_timesteps(self, num_inference_steps: int | None = None, device: Any = None, **_: Any) -> None:
            super().set_timesteps(num_inference_steps=len(grid) - 1, device=device)
            self.sigmas = grid.clone()
            self.timesteps = (grid[:-1] * self.config.num_train_timesteps).to(device)
            self.num_inference_steps = len(grid) - 1

    return OnTheModelGrid


def run_ours(
    model: models.TextToImageModel, solver: str, guidance: float, negative: list[str] | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Our run: (latents (D at the last grid point), images in [0, 1], the float64 grid)."""
    denoiser = model.conditioned(PROMPTS, negative, guidance, height=SIZE, width=SIZE)
    noise = make_noise([0, 1], model.latent_shape(SIZE, SIZE))
    with torch.no_grad():
        result = sample(
            denoiser,
            noise,
            solver=solver,
            steps=STEPS,
            schedule="discrete",
            schedule_params={"spacing": "linspace"},
            solver_params=SOLVER_PARAMS[solver],
            final_denoise=True,
        )
    assert result.nfe == STEPS + 1
    images = model.decode(result.images) / 2 + 0.5
    return result.images, images, result.sigmas


def run_theirs(
    kind: str, pipeline: Any, solver: str, guidance: float, negative: list[str] | None
) -> tuple[Tensor, Tensor]:
    """The diffusers pipeline on the model grid from the same noise: (latents, images in [0, 1])."""
    grid, _ = model_grid(pipeline)
    t0 = float(grid[0])
    # Our start x = sigma_0 eps is x_t = (1 - t_0) x = t_0 eps in flow coordinates.
    start = make_noise([0, 1], (4, SIZE // 4, SIZE // 4)) * t0
    flux = kind.startswith("flux")
    if solver == "euler":
        pipeline.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipeline.model_scheduler_config)
        timing: dict[str, Any] = {"sigmas": unshifted_times(STEPS)}
    else:
        flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "final_sigmas_type": "zero"}
        if solver == "dpmpp_2m":
            cls, options = (
                DPMSolverMultistepScheduler,
                {
                    "algorithm_type": "dpmsolver++",
                    "solver_order": 2,
                    "solver_type": "midpoint",
                    "lower_order_final": False,
                },
            )
        else:
            cls, options = (
                UniPCMultistepScheduler,
                {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "lower_order_final": True},
            )
        scheduler = _on_the_model_grid(cls, grid)(num_train_timesteps=N, **flow, **options)
        pipeline.scheduler = scheduler
        timing = {"num_inference_steps": STEPS + 1}
    arguments: dict[str, Any] = {"prompt": PROMPTS, "height": SIZE, "width": SIZE, **timing}
    if flux:
        if pipeline.transformer.config.guidance_embeds:
            arguments["guidance_scale"] = guidance
        else:
            arguments.update(negative_prompt=negative, true_cfg_scale=guidance)
        latents_in = pack(start)
    else:
        arguments.update(negative_prompt=negative, guidance_scale=guidance)
        latents_in = start
    last: list[Tensor] = []

    def keep_latents(_pipeline: Any, _step: int, _t: Any, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        last[:] = [tensors["latents"].clone()]  # after the final step: what the VAE decodes
        return tensors

    with torch.no_grad():
        images = pipeline(
            **arguments, latents=latents_in.clone(), output_type="pt", callback_on_step_end=keep_latents
        ).images
    latents = unpack(last[0], SIZE // 4, SIZE // 4) if flux else last[0]
    return latents, images


CASES = [pytest.param("sd3", solver, 7.0, True, id=f"sd3-{solver}") for solver in ("euler", "dpmpp_2m", "unipc")] + [
    pytest.param("sd3-no-t5", "euler", 7.0, True, id="sd3_without_t5-euler"),
    pytest.param("sd3", "euler", 1.0, False, id="sd3-conditional_only"),
    pytest.param("flux-cfg", "euler", 4.0, True, id="flux_true_cfg-euler"),
    pytest.param("flux-cfg", "dpmpp_2m", 4.0, True, id="flux_true_cfg-dpmpp_2m"),
    pytest.param("flux-cfg", "unipc", 4.0, True, id="flux_true_cfg-unipc"),
    pytest.param("flux", "euler", 3.5, False, id="flux_distilled-euler"),
    pytest.param("flux", "dpmpp_2m", 3.5, False, id="flux_distilled-dpmpp_2m"),
]


@pytest.mark.parametrize(("kind", "solver", "guidance", "with_negative"), CASES)
def test_sampling_matches_the_diffusers_pipeline(
    ours: dict[str, models.TextToImageModel],
    theirs: dict[str, Any],
    kind: str,
    solver: str,
    guidance: float,
    with_negative: bool,
) -> None:
    negative = NEGATIVE if with_negative else None
    latents, images, _ = run_ours(ours[kind], solver, guidance, negative)
    ref_latents, ref_images = run_theirs(kind, theirs[kind], solver, guidance, negative)

    assert images.shape == ref_images.shape == (2, 3, SIZE, SIZE)
    assert relative_difference(latents, ref_latents) <= REL_TOL
    assert relative_difference(images, ref_images) <= REL_TOL


def test_the_grid_is_the_model_schedulers_shifted_grid(
    ours: dict[str, models.TextToImageModel], theirs: dict[str, Any]
) -> None:
    """Our float64 grid, as flow times t = sigma / (1 + sigma), is the scheduler's float32 one, the
    shift included (compared in t: 1 - t in float32 has few digits left near t = 1)."""
    for kind in ("sd3", "flux"):
        _, _, sigmas = run_ours(ours[kind], "euler", 1.0, None)
        grid, _ = model_grid(theirs[kind])
        assert torch.allclose(sigmas / (1 + sigmas), grid[:-1].double(), rtol=0, atol=1e-7)


def test_the_crosscheck_catches_a_missing_shift(
    ours: dict[str, models.TextToImageModel], theirs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    unshifted = FlowSchedule.from_config.__func__  # type: ignore[attr-defined]

    def no_shift(cls: type, config: Any, **kwargs: Any) -> FlowSchedule:
        return unshifted(cls, {**config, "shift": 1.0, "use_dynamic_shifting": False}, t_max=kwargs.get("t_max"))

    monkeypatch.setattr(FlowSchedule, "from_config", classmethod(no_shift))
    for kind in ("sd3", "flux"):
        model = models.load(Path(theirs[kind].config["_name_or_path"]), device="cpu")
        assert isinstance(model, models.TextToImageModel)
        latents, _, _ = run_ours(model, "euler", 1.0, None)
        ref_latents, _ = run_theirs(kind, theirs[kind], "euler", 1.0, None)
        assert relative_difference(latents, ref_latents) > 10 * REL_TOL


def test_the_crosscheck_catches_t_where_sigma_belongs(
    ours: dict[str, models.TextToImageModel], theirs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def wrong(self: FlowSchedule, x: Tensor, sigma_b: Tensor, output: Tensor) -> Tensor:
        return (x - sigma_b / (1 + sigma_b) * output) / (1.0 + sigma_b)

    monkeypatch.setattr(FlowSchedule, "denoised", wrong)
    for kind in ("sd3", "flux-cfg"):
        latents, _, _ = run_ours(ours[kind], "euler", 4.0, NEGATIVE)
        ref_latents, _ = run_theirs(kind, theirs[kind], "euler", 4.0, NEGATIVE)
        assert relative_difference(latents, ref_latents) > 10 * REL_TOL


def test_the_crosscheck_catches_a_missing_vae_shift(
    ours: dict[str, models.TextToImageModel], theirs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for kind in ("sd3", "flux"):
        model = ours[kind]
        monkeypatch.setattr(model.codec, "shift_factor", 0.0)
        latents, images, _ = run_ours(model, "euler", 1.0, None)
        ref_latents, ref_images = run_theirs(kind, theirs[kind], "euler", 1.0, None)
        assert relative_difference(latents, ref_latents) <= REL_TOL  # sampling does not read the VAE
        assert relative_difference(images, ref_images) > 10 * REL_TOL


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_img2img_matches_the_diffusers_sd3_img2img_pipeline(
    ours: dict[str, models.TextToImageModel], folders: dict[str, Path], strength: float
) -> None:
    """Image-to-image: ours enters the grid at start_step(S, strength) from init + sigma noise;
    diffusers' at int(n - n strength) of its n = S + 1 grid points (the same index for these
    strengths) from (1 - t) init + t noise, the same point in flow coordinates. Entering one
    step later gives 0.23 relative on the latents."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    model = ours["sd3"]
    init = model.encode(torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) * 2 - 1)
    noise = make_noise([3, 4], model.latent_shape(SIZE, SIZE))
    start = start_step(STEPS, strength)
    with torch.no_grad():
        result = sample(
            model.conditioned(PROMPTS, NEGATIVE, 7.0, height=SIZE, width=SIZE),
            noise,
            solver="euler",
            steps=STEPS,
            schedule="discrete",
            init=init,
            start=start,
            final_denoise=True,
        )
    pipeline = StableDiffusion3Img2ImgPipeline.from_pretrained(str(folders["sd3"]), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    assert int(STEPS + 1 - (STEPS + 1) * strength) == start
    with torch.no_grad():
        reference = pipeline(
            prompt=PROMPTS,
            negative_prompt=NEGATIVE,
            image=init,  # latents (4 channels) are taken as the encoded image, as they are
            strength=strength,
            guidance_scale=7.0,
            sigmas=unshifted_times(STEPS),
            generator=[torch.Generator().manual_seed(seed) for seed in (3, 4)],  # one per sample, as make_noise
            output_type="latent",
        ).images
    assert relative_difference(result.images, reference) <= REL_TOL
    assert relative_difference(result.images, init) > 0.01  # it did move
