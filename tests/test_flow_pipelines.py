"""SD3 and Flux pipelines through `models.load` (tiny random folders saved in the real layout):
their schedules and shift, conditioning rules, sizes, and what a damaged folder gets. The
cross-check against diffusers' own pipelines is test_flow_pipelines_crosscheck.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import models
import solvers
from models.flow_transformers import pack, shift_mu, unpack


@pytest.fixture(scope="module")
def loaded(flow_pipelines: dict[str, Path]) -> dict[str, models.TextToImageModel]:
    result = {}
    for kind, folder in flow_pipelines.items():
        model = models.load(folder, device="cpu", name=kind)
        assert isinstance(model, models.TextToImageModel)
        result[kind] = model
    return result


def test_the_shift_sets_the_range_and_every_schedule_stays_inside_it(
    loaded: dict[str, models.TextToImageModel],
) -> None:
    sd3 = loaded["sd3"]
    # t in [1/N, 1 - 1/N], sigma = t / (1 - t), times SD3's shift 3
    assert sd3.sigma_max == pytest.approx(3 * 999, rel=1e-12)
    assert sd3.sigma_min == pytest.approx(3 / 999, rel=1e-12)
    assert sd3.sigma_levels is not None
    assert len(sd3.sigma_levels) == 999
    denoiser = sd3.conditioned(["a red fox"], None, 1.0)
    for schedule in ("polynomial", "logsnr", "time_uniform", "discrete"):
        sigmas = solvers.build_sigmas(
            schedule,
            10,
            sigma_min=denoiser.sigma_min,
            sigma_max=denoiser.sigma_max,
            sigma_levels=denoiser.sigma_levels,
        )
        assert sigmas[0] == pytest.approx(sd3.sigma_max)
        assert sigmas[-1] == pytest.approx(sd3.sigma_min)
    # Flux: e^mu, mu linear in the token count through (256, 0.5) and (4096, 1.15)
    flux = loaded["flux"]
    for side in (32, 96):
        tokens = (side // 8) ** 2
        mu = 0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256)
        assert shift_mu(tokens, flux.scheduler_config) == pytest.approx(mu)
        _low, high, levels = flux.noise_range(side, side)
        assert high == pytest.approx(math.exp(mu) * 999, rel=1e-12)
        assert levels is not None
        assert float(levels[-1]) == pytest.approx(high)
        assert flux.conditioned(["a"], None, 3.5, height=side, width=side).sigma_max == pytest.approx(high)


def test_packing_is_a_permutation_that_round_trips() -> None:
    latents = torch.randn(2, 4, 6, 10)
    tokens = pack(latents)
    assert tokens.shape == (2, 15, 16)
    torch.testing.assert_close(unpack(tokens, 6, 10), latents, rtol=0, atol=0)
    # token (row 1, column 2) holds the 2 x 2 patch at rows 2..3, columns 4..5, channels outermost
    torch.testing.assert_close(tokens[0, 1 * 5 + 2].reshape(4, 2, 2), latents[0, :, 2:4, 4:6])


def test_guidance_passes_and_the_distilled_model(loaded: dict[str, models.TextToImageModel]) -> None:
    flux, cfg, sd3 = loaded["flux"], loaded["flux-cfg"], loaded["sd3"]
    assert flux.guidance_distilled
    assert not cfg.guidance_distilled
    assert not sd3.guidance_distilled
    for w in (0.0, 1.0, 3.5):
        assert flux.conditioned(["a", "b"], None, w).evals_per_call == 1  # guidance is an input
    assert cfg.conditioned(["a", "b"], None, 1.0).evals_per_call == 1
    assert cfg.conditioned(["a", "b"], ["c", None], torch.tensor([4.0, 1.0])).evals_per_call == 2
    with pytest.raises(models.InvalidConditioningError, match="guidance-distilled") as caught:
        flux.conditioned(["a", "b"], [None, "blurry"], 3.5)
    assert caught.value.field == "negative_prompts"
    # the distilled model reads its guidance: another value, another prediction
    x = solvers.make_noise([0], flux.sample_shape) * 10.0
    sigma = torch.tensor([10.0])
    with torch.no_grad():
        first = flux.conditioned(["a red fox"], None, 1.0)(x, sigma)
        second = flux.conditioned(["a red fox"], None, 5.0)(x, sigma)
    assert not torch.allclose(first, second)


def test_a_sample_does_not_depend_on_its_batch(loaded: dict[str, models.TextToImageModel]) -> None:
    prompts, negatives, guidance = ["a red fox", "a cat"], ["blurry", None], torch.tensor([4.0, 2.0])

    def run(model: models.TextToImageModel, rows: list[int]) -> torch.Tensor:
        denoiser = model.conditioned(
            [prompts[k] for k in rows], [negatives[k] for k in rows], guidance[rows], height=32, width=48
        )
        noise = solvers.make_noise(rows, model.latent_shape(32, 48))
        with torch.no_grad():
            return solvers.sample(denoiser, noise, solver="dpmpp_2m", steps=3).images

    for kind in ("sd3", "flux-cfg"):
        both = run(loaded[kind], [0, 1])
        torch.testing.assert_close(both[1:], run(loaded[kind], [1]), rtol=0, atol=2e-5)


def test_sizes_are_checked_against_the_patches_and_the_position_table(
    loaded: dict[str, models.TextToImageModel],
) -> None:
    flux, sd3 = loaded["flux"], loaded["sd3"]
    assert flux.size_multiple == sd3.size_multiple == 8
    assert flux.latent_shape(40, 48) == (4, 10, 12)
    for model, field, height, width, allowed in (
        (flux, "width", 32, 36, "a multiple of 8"),
        (flux, "height", 20, 32, "a multiple of 8"),
        (sd3, "width", 32, 136, "in 32..128"),  # pos_embed_max_size 16 patches x 2 x the factor 4
    ):
        with pytest.raises(models.InvalidConditioningError) as caught:
            model.latent_shape(height, width)
        assert caught.value.field == field
        assert allowed in str(caught.value.allowed)


def test_sd3_without_t5_reads_zeros_in_its_place(loaded: dict[str, models.TextToImageModel]) -> None:
    with_t5, without = loaded["sd3"], loaded["sd3-no-t5"]
    hidden = without.prompts.encode(["a red fox"]).hidden
    assert hidden.shape == with_t5.prompts.encode(["a red fox"]).hidden.shape == (1, 77 + 256, 64)
    assert torch.count_nonzero(hidden[:, 77:]) == 0
    assert without.prompts.max_tokens == 77
    assert with_t5.prompts.max_tokens == 256
    long = " ".join(["astronaut"] * 100)
    assert without.dropped_tokens([long])[0] > 0  # CLIP's 77 tokens cut it
    assert with_t5.dropped_tokens([long]) == [0]  # T5's 256 hold it


def test_bfloat16_runs_and_stays_close(flow_pipelines: dict[str, Path]) -> None:
    reference = models.load(flow_pipelines["flux-cfg"], device="cpu")
    half = models.load(flow_pipelines["flux-cfg"], device="cpu", dtype="bfloat16")
    assert isinstance(reference, models.TextToImageModel)
    assert isinstance(half, models.TextToImageModel)
    noise = solvers.make_noise([0], reference.sample_shape)
    images = []
    for model in (reference, half):
        with torch.no_grad():
            run = solvers.sample(model.conditioned(["a red fox"], None, 3.0), noise, solver="euler", steps=4)
            images.append(model.decode(run.images))
    assert images[1].dtype == torch.float32
    assert float((images[0] - images[1]).abs().mean()) < 0.05


def _copy(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / folder.name
    shutil.copytree(folder, target)
    return target


def test_damaged_folders_name_the_file_and_the_field(flow_pipelines: dict[str, Path], tmp_path: Path) -> None:
    sd3 = _copy(flow_pipelines["sd3"], tmp_path)
    scheduler = sd3 / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text())
    scheduler.write_text(json.dumps({**config, "_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(models.UnsupportedSchedulerError, match="flow-matching"):
        models.load(sd3, device="cpu")
    scheduler.write_text(json.dumps({**config, "stochastic_sampling": True}))
    with pytest.raises(models.UnsupportedSchedulerError, match="stochastic_sampling"):
        models.load(sd3, device="cpu")
    scheduler.write_text(json.dumps(config))

    weights = sd3 / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(models.ModelLoadError, match="pickle-format weights are refused"):
        models.load(sd3, device="cpu")
    weights.with_suffix(".bin").rename(weights)

    index = json.loads((sd3 / "model_index.json").read_text())
    (sd3 / "model_index.json").write_text(json.dumps({**index, "tokenizer_3": [None, None]}))
    with pytest.raises(models.ModelLoadError, match="lists text_encoder_3 but not tokenizer_3"):
        models.load(sd3, device="cpu")

    flux = _copy(flow_pipelines["flux"], tmp_path)
    index = json.loads((flux / "model_index.json").read_text())
    (flux / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    with pytest.raises(models.ModelLoadError, match="has no 'text_encoder_2' component"):
        models.load(flux, device="cpu")
