"""Text-to-image pipelines through `models.load`: tiny random Stable Diffusion and SDXL folders
saved with save_pretrained, loaded as a user's folder would be. What the model exposes (kind, sizes,
latents), how it conditions (passes, per-sample guidance, the prompt cache, truncation), the VAE
round trip, and every load error naming its file. The numerical agreement with diffusers' own
pipelines is tests/test_text_to_image_crosscheck.py.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTokenizer

import models
from models.prompts import PromptCache
from models.text_to_image import SizeLimits
from solvers import make_noise, sample
from solvers.contract import CountingDenoiser

SIZE = 32
PROMPTS = ["a red fox in the snow", "a city at night"]


@pytest.fixture(scope="module")
def loaded(tiny_pipelines: dict[str, Path]) -> dict[str, models.TextToImageModel]:
    result = {}
    for kind, folder in tiny_pipelines.items():
        model = models.load(folder, device="cpu", name=kind)
        assert isinstance(model, models.TextToImageModel)
        result[kind] = model
    return result


def copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def assert_rows_match(batched: torch.Tensor, alone: list[torch.Tensor], guidance: list[float]) -> None:
    """Row k of a batch equals the same row run alone, to rounding. A batch of 3 and a batch of 1
    reduce in different orders, so each forward differs by a few float32 ulps of its output, and
    guidance w scales those differences by |w| + |1 - w| (14 at w = 7.5). A row given another row's
    prompt or guidance differs by far more: 1% more guidance moves it by 400 times this bound."""
    for k, w in enumerate(guidance):
        ulps = 8 * torch.finfo(torch.float32).eps * float(alone[k].abs().max())
        torch.testing.assert_close(batched[k : k + 1], alone[k], rtol=0, atol=(abs(w) + abs(1 - w)) * ulps)


@pytest.mark.parametrize(
    ("kind", "pipeline"), [("sd", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")]
)
def test_model_attributes(loaded: dict[str, models.TextToImageModel], kind: str, pipeline: str) -> None:
    model = loaded[kind]

    assert model.kind == "text-to-image"
    assert model.pipeline_class == pipeline
    assert model.default_size == (32, 32)
    assert model.sample_shape == (4, 8, 8)
    assert model.latent_shape(64, 48) == (4, 16, 12)
    assert model.prediction_type == "epsilon"
    assert model.sigma_levels is not None
    assert model.sigma_levels.shape == (1000,)
    assert model.sigma_max == pytest.approx(14.6146, rel=1e-4)  # SD's trained range
    assert model.force_zeros_for_empty_prompt is (kind == "sdxl")
    assert len(model.fingerprint) == 64
    assert models.load("mnist").kind == "class-conditional"


@pytest.mark.parametrize(
    ("height", "width", "message"),
    [
        (30, 32, r"height=30 .*multiple of 4 in 32\.\.2048"),
        (32, 2052, r"width=2052 .*multiple of 4"),
        (16, 32, r"height=16 .*in 32\.\.2048"),
        (2048, 2048, r"height x width='2048 x 2048' .*at most 1000000 pixels"),
    ],
)
def test_sizes_are_validated(tiny_pipelines: dict[str, Path], height: int, width: int, message: str) -> None:
    model = models.load(tiny_pipelines["sd"], device="cpu", size_limits=SizeLimits(max_pixels=1_000_000))
    assert isinstance(model, models.TextToImageModel)
    with pytest.raises(models.InvalidConditioningError, match=message):
        model.latent_shape(height, width)
    with pytest.raises(models.InvalidConditioningError, match=message):
        model.conditioned(["a"], height=height, width=width)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_passes_follow_guidance(loaded: dict[str, models.TextToImageModel], kind: str) -> None:
    model = loaded[kind]
    for guidance, per_call in ((1.0, 1), (0.0, 1), (7.5, 2), (torch.tensor([1.0, 0.0]), 2)):
        counted = CountingDenoiser(model.conditioned(PROMPTS, None, guidance, height=SIZE, width=SIZE))
        with torch.no_grad():
            result = sample(counted, make_noise([0, 1], model.sample_shape), solver="heun", steps=3)
        assert counted.evals_per_call == per_call
        assert result.network_evals == per_call * result.nfe


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_per_sample_guidance_in_one_batch_equals_separate_runs(
    loaded: dict[str, models.TextToImageModel], kind: str
) -> None:
    model = loaded[kind]
    x = 3.0 * make_noise([4, 5, 6], model.sample_shape)
    sigma = torch.tensor([3.0, 1.0, 0.5])
    prompts, negatives, guidance = [*PROMPTS, "a cat"], ["blurry", "", "text"], [7.5, 1.0, 0.0]
    with torch.no_grad():
        batched = model.conditioned(prompts, negatives, torch.tensor(guidance), height=SIZE, width=SIZE)(x, sigma)
        alone = [
            model.conditioned([p], [n], w, height=SIZE, width=SIZE)(x[k : k + 1], sigma[k : k + 1])
            for k, (p, n, w) in enumerate(zip(prompts, negatives, guidance, strict=True))
        ]
    assert_rows_match(batched, alone, guidance)


def test_guidance_combines_the_two_halves(loaded: dict[str, models.TextToImageModel]) -> None:
    model = loaded["sdxl"]
    x = 2.0 * make_noise([1, 2], model.sample_shape)
    sigma = torch.tensor([2.0, 0.7])
    with torch.no_grad():
        conditional = model.conditioned(PROMPTS, None, 1.0)(x, sigma)
        unconditional = model.conditioned(PROMPTS, None, 0.0)(x, sigma)
        guided = model.conditioned(PROMPTS, None, 3.0)(x, sigma)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-4, atol=1e-4)
    assert float((conditional - unconditional).abs().max()) > 1e-3  # the prompt matters


def test_prompts_are_encoded_once_and_cached(tiny_pipelines: dict[str, Path]) -> None:
    cache = PromptCache(size=3)
    model = models.load(tiny_pipelines["sd"], device="cpu", prompt_cache=cache)
    assert isinstance(model, models.TextToImageModel)
    model.conditioned(["a", "b", "a"], None, 5.0)  # a, b and the empty negative: 3 encodings
    assert (cache.misses, cache.hits, len(cache)) == (3, 0, 3)
    first = cache.get(model.prompts.fingerprint, "a")
    model.conditioned(["a", "b"], ["", ""], 5.0)
    assert cache.hits == 1 + 3  # the get above, then a, b and ""
    model.conditioned(["c"], None, 1.0)  # evicts the least recently used entry ("a" was read first)
    assert len(cache) == 3
    assert cache.get(model.prompts.fingerprint, "a") is None
    assert first is not None
    # A second model with the same encoders shares the entries; the key is the encoder's fingerprint.
    other = models.load(tiny_pipelines["sd"], device="cpu", prompt_cache=cache)
    assert isinstance(other, models.TextToImageModel)
    assert other.prompts.fingerprint == model.prompts.fingerprint
    sdxl = models.load(tiny_pipelines["sdxl"], device="cpu", prompt_cache=cache)
    assert isinstance(sdxl, models.TextToImageModel)
    assert sdxl.prompts.fingerprint != model.prompts.fingerprint
    with pytest.raises(models.InvalidConditioningError, match=r"prompt_cache_size=-1"):
        PromptCache(size=-1)


def test_cached_encoding_equals_a_fresh_one(tiny_pipelines: dict[str, Path]) -> None:
    model = models.load(tiny_pipelines["sdxl"], device="cpu", prompt_cache=PromptCache(size=0))
    assert isinstance(model, models.TextToImageModel)
    fresh = model.prompts.encode(["a red fox", "a cat"])
    again = model.prompts.encode(["a cat", "a red fox"])
    assert fresh.pooled is not None
    assert again.pooled is not None
    torch.testing.assert_close(fresh.hidden[0], again.hidden[1])
    torch.testing.assert_close(fresh.pooled[1], again.pooled[0])
    assert fresh.hidden.shape == (2, 77, 64)  # both encoders' states side by side
    assert fresh.pooled.shape == (2, 32)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_truncation_as_diffusers_does_it(
    loaded: dict[str, models.TextToImageModel], tiny_pipelines: dict[str, Path], kind: str
) -> None:
    model = loaded[kind]
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_pipelines[kind] / "tokenizer"))
    long = " ".join(["astronaut"] * 40)
    untruncated = tokenizer(long).input_ids  # with start and end tokens

    assert model.dropped_tokens([long, "a cat"]) == [len(untruncated) - 77, 0]
    # What is cut changes nothing: the long prompt and its first 75 tokens encode alike.
    kept = tokenizer.decode(untruncated[1:76])
    same = model.prompts.encode([long, kept])
    torch.testing.assert_close(same.hidden[0], same.hidden[1])


def test_vae_round_trip_and_scaling(
    loaded: dict[str, models.TextToImageModel], tiny_pipelines: dict[str, Path]
) -> None:
    model = loaded["sd"]
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = model.encode(images)
    vae = AutoencoderKL.from_pretrained(str(tiny_pipelines["sd"] / "vae"))
    with torch.no_grad():
        expected = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)

    assert latents.shape == (2, 4, 8, 8)
    torch.testing.assert_close(latents, expected)
    out = model.decode(latents)
    assert out.dtype == torch.float32
    assert out.shape == (2, 3, SIZE, SIZE)
    assert float(out.min()) >= -1.0
    assert float(out.max()) <= 1.0
    torch.testing.assert_close(out, decoded)
    with pytest.raises(models.InvalidConditioningError, match=r"height=30"):
        model.encode(torch.zeros(1, 3, 30, 32))


def test_dtype_and_devices_per_component(tiny_pipelines: dict[str, Path]) -> None:
    model = models.load(tiny_pipelines["sdxl"], device="cpu", dtype="bfloat16", text_encoder_device="cpu")
    assert isinstance(model, models.TextToImageModel)
    assert model.dtype == torch.bfloat16
    assert model.codec.dtype == torch.bfloat16  # force_upcast applies to float16 only, as in diffusers
    half = models.load(tiny_pipelines["sdxl"], device="cpu", dtype="float16")
    assert isinstance(half, models.TextToImageModel)
    assert half.dtype == torch.float16
    assert half.codec.dtype == torch.float32  # force_upcast: the VAE stays in float32
    # text encoders on a CPU run in float32 (CPU half precision is slow); what they give is cast
    encoder_dtypes = {p.dtype for e in half.prompts.encoders for p in e.parameters()}  # type: ignore[attr-defined]
    assert encoder_dtypes == {torch.float32}
    with torch.no_grad():
        denoised = half.conditioned(PROMPTS, None, 3.0)(torch.randn(2, 4, 8, 8), torch.tensor([2.0, 1.0]))
    assert denoised.dtype == torch.float32
    assert bool(torch.isfinite(denoised).all())
    with pytest.raises(models.InvalidDeviceError, match=r"device='gpu'"):
        models.load(tiny_pipelines["sd"], device="cpu", text_encoder_device="gpu")


def test_conditioning_errors_name_the_argument(loaded: dict[str, models.TextToImageModel]) -> None:
    model = loaded["sd"]
    with pytest.raises(models.InvalidConditioningError, match=r"^prompts="):
        model.conditioned([])
    with pytest.raises(models.InvalidConditioningError, match=r"^prompts="):
        model.conditioned("a cat")  # type: ignore[arg-type]
    with pytest.raises(models.InvalidConditioningError, match=r"negative_prompts='1 texts' .*2, one per prompt"):
        model.conditioned(PROMPTS, ["x"], 2.0)
    with pytest.raises(models.InvalidConditioningError, match=r"guidance=.*shape \(2,\)"):
        model.conditioned(PROMPTS, None, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(models.InvalidConditioningError, match=r"guidance=nan"):
        model.conditioned(PROMPTS, None, float("nan"))
    with pytest.raises(models.InvalidConditioningError, match=r"null_class=3 .*None for a text-to-image"):
        models.load(Path(model.source), device="cpu", null_class=3)


# ---- load errors: each names its file --------------------------------------------------------


def _edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_other_pipeline_classes_are_refused(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(tiny_pipelines["sd"], tmp_path)
    _edit_json(folder / "model_index.json", _class_name="KandinskyPipeline")
    with pytest.raises(
        models.UnsupportedModelError,
        match=r"model_index.json: _class_name='KandinskyPipeline' .*StableDiffusionPipeline, StableDiffusionXLPipeline",
    ):
        models.load(folder, device="cpu")


def test_pickle_text_encoder_is_refused(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(tiny_pipelines["sd"], tmp_path)
    (folder / "text_encoder" / "model.safetensors").rename(folder / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(
        models.ModelLoadError, match=r"text_encoder/pytorch_model.bin: pickle-format weights are refused"
    ):
        models.load(folder, device="cpu")


def test_corrupt_vae_weights(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(tiny_pipelines["sdxl"], tmp_path)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(
        models.ModelLoadError, match=r"vae/diffusion_pytorch_model.safetensors: not a valid safetensors"
    ):
        models.load(folder, device="cpu")


def test_missing_component(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(tiny_pipelines["sdxl"], tmp_path)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(models.ModelLoadError, match=r"text_encoder_2: missing"):
        models.load(folder, device="cpu")
    _edit_json(folder / "model_index.json", text_encoder_2=None)
    with pytest.raises(models.ModelLoadError, match=r"model_index.json: has no 'text_encoder_2' component"):
        models.load(folder, device="cpu")


def test_missing_config_key(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(tiny_pipelines["sd"], tmp_path)
    _edit_json(folder / "vae" / "config.json", latent_channels=None)
    with pytest.raises(models.ModelLoadError, match=r"vae/config.json: has no 'latent_channels'"):
        models.load(folder, device="cpu")
    _edit_json(folder / "vae" / "config.json", latent_channels=4)
    _edit_json(folder / "unet" / "config.json", cross_attention_dim=None)
    with pytest.raises(models.ModelLoadError, match=r"unet/config.json: has no 'cross_attention_dim'"):
        models.load(folder, device="cpu")


def test_a_vae_config_without_scaling_factor_is_sd1s(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    """SD 1.x folders saved by diffusers 0.6 have no scaling_factor; diffusers' default is theirs."""
    folder = copy(tiny_pipelines["sd"], tmp_path)
    _edit_json(folder / "vae" / "config.json", scaling_factor=None)
    model = models.load(folder, device="cpu")
    assert isinstance(model, models.TextToImageModel)
    assert model.codec.scaling_factor == pytest.approx(0.18215)


def test_unsupported_scheduler_names_the_file(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    folder = copy(tiny_pipelines["sd"], tmp_path)
    _edit_json(folder / "scheduler" / "scheduler_config.json", prediction_type="flow_prediction")
    with pytest.raises(models.UnsupportedSchedulerError, match=r"scheduler_config.json: prediction_type='flow"):
        models.load(folder, device="cpu")


def test_v_prediction_pipeline(tmp_path: Path) -> None:
    from models.tiny_pipelines import save_tiny_pipeline

    folder = save_tiny_pipeline("sd", tmp_path / "v", prediction_type="v_prediction")
    model = models.load(folder, device="cpu")
    assert model.prediction_type == "v_prediction"


def test_without_the_text_extra_the_error_names_it(
    tiny_pipelines: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(models.ModelLoadError, match=r"transformers: not installed.*diffusion-sampler-service\[text\]"):
        models.load(tiny_pipelines["sd"], device="cpu")


# ---- AMED on a text pipeline -----------------------------------------------------------------


def test_bottleneck_feature_is_the_mid_block_channel_mean(loaded: dict[str, models.TextToImageModel]) -> None:
    model = loaded["sdxl"]
    denoiser = model.conditioned(PROMPTS, None, 4.0)
    x = 2.0 * make_noise([1, 2], model.sample_shape)
    sigma = torch.tensor([3.0, 0.5])
    captured: list[torch.Tensor] = []
    unet = model.backbone.unet
    assert unet.mid_block is not None
    handle = unet.mid_block.register_forward_hook(lambda _m, _i, output: captured.append(output))
    try:
        with torch.no_grad():
            denoised, feature = denoiser.denoise_with_feature(x, sigma)
    finally:
        handle.remove()
    assert feature.shape == (2, 4, 4)  # 8 x 8 latents, one downsampling
    torch.testing.assert_close(feature, captured[0][:2].mean(dim=1))  # the conditional half
    with torch.no_grad():
        torch.testing.assert_close(denoised, denoiser(x, sigma))


def test_amed_trains_on_a_text_pipeline(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    from bench.amed import main as amed_main
    from solvers.amed import PredictorCard

    out = tmp_path / "predictors"
    args = ["train", "--model", str(tiny_pipelines["sd"]), "--solver", "amed_plugin", "--nfe", "5", "--guidance", "4"]
    args += ["--prompt", "a red fox in the snow", "--prompt", "a city at night", "--trajectories", "48"]
    args += ["--batch-size", "4", "--lr", "2e-2", "--device", "cpu", "--threads", "1", "--out", str(out), "--quiet"]
    assert amed_main(args) == 0
    (card_path,) = out.glob("*.json")
    card = PredictorCard.model_validate_json(card_path.read_text())
    assert card.config.feature_shape == (4, 4)
    first = sum(card.training["first_batch_loss_per_interval"])
    final = card.training["final_loss"]
    assert final < 0.8 * first, (first, final)
    model = models.load(tiny_pipelines["sd"], device="cpu")
    assert card.model_fingerprint == model.fingerprint
    assert amed_main([*args[:3], "--nfe", "5", "--out", str(tmp_path / "x"), "--quiet"]) == 2  # no --prompt


def test_hub_id_of_a_pipeline_resolves_from_the_local_cache(tiny_pipelines: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--sampler-tests--tiny-sdxl"
    revision = "89abcdef0123456789abcdef0123456789abcdef"
    shutil.copytree(tiny_pipelines["sdxl"], repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    model = models.load("sampler-tests/tiny-sdxl", device="cpu", hub_cache=tmp_path / "hub")
    assert isinstance(model, models.TextToImageModel)
    assert model.name == "sampler-tests/tiny-sdxl"
    assert model.fingerprint == models.load(tiny_pipelines["sdxl"], device="cpu").fingerprint


def test_a_refused_model_leaves_the_others_served(
    tiny_pipelines: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from sampler_service.server import load_served
    from sampler_service.settings import load_settings

    pickled = copy(tiny_pipelines["sd"], tmp_path)
    (pickled / "unet" / "diffusion_pytorch_model.safetensors").rename(pickled / "unet" / "diffusion_pytorch_model.bin")
    (tmp_path / "models.toml").write_text(
        '[[models]]\nname = "mnist"\nsource = "mnist"\ndevice = "cpu"\n\n'
        f'[[models]]\nname = "pickled"\nsource = "{pickled}"\ndevice = "cpu"\n'
    )
    with caplog.at_level("ERROR", logger="sampler_service"):
        served = load_served(load_settings(None, models_config=tmp_path / "models.toml"))
    assert list(served) == ["mnist"]
    (record,) = [r for r in caplog.records if "not serving" in r.getMessage()]
    assert "unet/diffusion_pytorch_model.bin: pickle-format weights are refused" in record.getMessage()
    assert record.exc_info is None  # a user's file problem: one line, no traceback
    (tmp_path / "models.toml").write_text(f'[[models]]\nname = "pickled"\nsource = "{pickled}"\ndevice = "cpu"\n')
    with pytest.raises(models.ModelError, match=r"model 'pickled'.*pickle-format"):
        load_served(load_settings(None, models_config=tmp_path / "models.toml"))


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_default_and_given_negative_prompts_mix_in_one_batch(
    loaded: dict[str, models.TextToImageModel], kind: str
) -> None:
    """Rows of different requests share a batch: one row's default unconditional pass (the empty
    prompt, or SDXL's zeros) and another's negative prompt are bound per row."""
    model = loaded[kind]
    x = 3.0 * make_noise([7, 8, 9], model.sample_shape)
    sigma = torch.tensor([2.0, 1.0, 0.3])
    negatives: list[str | None] = [None, "blurry", None]
    with torch.no_grad():
        batched = model.conditioned([*PROMPTS, "a cat"], negatives, 6.0)(x, sigma)
        alone = [
            model.conditioned([p], None if n is None else [n], 6.0)(x[k : k + 1], sigma[k : k + 1])
            for k, (p, n) in enumerate(zip([*PROMPTS, "a cat"], negatives, strict=True))
        ]
    assert_rows_match(batched, alone, [6.0] * 3)
    # and the default is what the pipeline says: zeros for SDXL, the empty prompt for SD
    with torch.no_grad():
        empty = model.conditioned(["a cat"], [""], 0.0)(x[:1], sigma[:1])
        default = model.conditioned(["a cat"], None, 0.0)(x[:1], sigma[:1])
    assert torch.allclose(empty, default) is (kind == "sd")


def test_token_counting_and_encoding_from_two_threads(tiny_pipelines: dict[str, Path]) -> None:
    """Validation counts tokens on the event loop while a worker encodes: a fast tokenizer switches
    padding / truncation per call, so unguarded calls from two threads fail or mis-pad (seen here
    as 'Unable to create tensor' within a few hundred calls)."""
    import threading

    model = models.load(tiny_pipelines["sdxl"], device="cpu", prompt_cache=PromptCache(0))
    assert isinstance(model, models.TextToImageModel)
    reference = model.prompts.encode(["city 0", "b"]).hidden
    errors: list[str] = []

    def count() -> None:
        try:
            for i in range(400):
                assert model.dropped_tokens([f"a red fox number {i} " * 3]) == [0]
        except Exception as error:  # reported below: a failure in a thread would otherwise vanish
            errors.append(repr(error))

    def encode() -> None:
        try:
            for _ in range(40):
                torch.testing.assert_close(model.prompts.encode(["city 0", "b"]).hidden, reference)
        except Exception as error:
            errors.append(repr(error))

    threads = [threading.Thread(target=target) for target in (count, encode, count, encode)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_a_precision_variant_is_read_when_asked_for(tmp_path: Path) -> None:
    from models.tiny_pipelines import build_tiny_pipeline

    folder = tmp_path / "variant"
    build_tiny_pipeline("sdxl").save_pretrained(str(folder), safe_serialization=True, variant="fp16")
    assert (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (folder / "text_encoder_2" / "model.fp16.safetensors").is_file()
    model = models.load(folder, device="cpu", variant="fp16")
    assert isinstance(model, models.TextToImageModel)
    with torch.no_grad():
        assert model.conditioned(["a"], None, 2.0)(torch.zeros(1, 4, 8, 8), torch.ones(1)).shape == (1, 4, 8, 8)
    with pytest.raises(models.ModelLoadError, match=r"unet/diffusion_pytorch_model.safetensors: missing"):
        models.load(folder, device="cpu")
    (folder / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(models.ModelLoadError, match=r"vae/diffusion_pytorch_model.fp16.safetensors: missing"):
        models.load(folder, device="cpu", variant="fp16")
    with pytest.raises(models.UnsupportedModelError, match=r"variant='fp16' .*bare UNet"):
        models.load("mnist", variant="fp16")


def test_full_size_configs_have_the_published_parameter_counts() -> None:
    """The random-weight benchmark pipelines have SD 1.5's and SDXL's architectures (built on the
    meta device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from models.full_size_pipelines import _clip, unet_config
    from models.tiny_pipelines import make_tokenizer

    tokenizer = make_tokenizer()

    def millions(module: torch.nn.Module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e6, 2)

    with torch.device("meta"):
        assert millions(UNet2DConditionModel(**unet_config("sd15"))) == 859.52
        assert millions(UNet2DConditionModel(**unet_config("sdxl"))) == 2567.46
        assert millions(CLIPTextModel(_clip(tokenizer, big=False))) == 123.06
        assert millions(CLIPTextModelWithProjection(_clip(tokenizer, big=True))) == 694.66
