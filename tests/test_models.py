"""The model adapters and the loader on real (tiny, randomly initialised) diffusers UNets saved with
`save_pretrained` and loaded back through `models.load`: predictions, conditioning and guidance,
the AMED feature, gradients, precision, fingerprints, the models config, and every loader error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel
from torch import Tensor

import models
from models.config import ModelsConfigError, load_models, read_models_config
from models.diffusers_unet import bottleneck_module, input_scale
from models.loading import resolve_device
from solvers import FeatureDenoiser, make_noise, sample
from solvers.contract import CountingDenoiser
from solvers.sampling import nfe_of

SCHEDULE = {"num_train_timesteps": 100, "beta_start": 1e-3, "beta_end": 0.1, "beta_schedule": "linear"}
NULL = 4  # the null class of the tiny class-conditional UNet (labels 0..3 are "digits")


def tiny_unet(**overrides: Any) -> UNet2DModel:
    torch.manual_seed(0)
    config: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 2,
        "out_channels": 2,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "attention_head_dim": 8,
        **overrides,
    }
    unet = UNet2DModel(**config)
    # Random init leaves the output convolution at zero; perturb everything so the test sees signal.
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return unet


def save_pipeline(
    folder: Path,
    unet: UNet2DModel | UNet2DConditionModel,
    prediction_type: str = "epsilon",
    scheduler_class: type = DDPMScheduler,
    **scheduler: Any,
) -> Path:
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    scheduler_class(**{**SCHEDULE, "prediction_type": prediction_type, **scheduler}).save_pretrained(
        folder / "scheduler"
    )
    return folder


@pytest.fixture(scope="module")
def class_model(tmp_path_factory: pytest.TempPathFactory) -> models.DiffusionModel:
    folder = save_pipeline(tmp_path_factory.mktemp("classes"), tiny_unet(num_class_embeds=NULL + 1))
    return models.load(folder, device="cpu", null_class=NULL)


def network_output(model: models.DiffusionModel, x: Tensor, t: int, labels: Tensor | None = None) -> Tensor:
    sigma = model.sigma_levels[t].to(x.dtype)
    with torch.no_grad():
        return model.unet(x * input_scale(sigma), torch.full((x.shape[0],), t), class_labels=labels).sample


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("layout", ["pipeline", "bare"])
def test_adapter_reproduces_the_unet_prediction(tmp_path: Path, prediction_type: str, layout: str) -> None:
    unet = tiny_unet()
    if layout == "pipeline":
        folder = save_pipeline(tmp_path, unet, prediction_type)
    else:
        folder = tmp_path / "bare"
        unet.save_pretrained(folder, safe_serialization=True)
        DDPMScheduler(**SCHEDULE, prediction_type=prediction_type).save_pretrained(folder)
    model = models.load(folder, device="cpu")
    denoiser = model.conditioned()
    x = 3.0 * torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    for t in (0, 17, 63, 99):
        sigma = float(model.sigma_levels[t])
        with torch.no_grad():
            denoised = denoiser(x, torch.full((4,), sigma))
        alpha = 1.0 / (1.0 + sigma**2) ** 0.5
        if prediction_type == "epsilon":
            implied = (x - denoised) / sigma
        elif prediction_type == "v_prediction":  # x0 = alpha x_vp - sigma_vp v, with x_vp = alpha x
            implied = (alpha * alpha * x - denoised) / (sigma * alpha)
        else:
            implied = denoised
        # float32 rounding of x - D (x ~ 3) divided by sigma_0 = 0.03 leaves ~5e-5 in the implied eps
        torch.testing.assert_close(implied, network_output(model, x, t), rtol=1e-4, atol=1e-4)


def test_model_attributes(class_model: models.DiffusionModel) -> None:
    assert class_model.sample_shape == (2, 8, 8)
    assert class_model.num_class_embeds == NULL + 1
    assert class_model.null_class == NULL
    assert class_model.sigma_levels.shape == (100,)
    assert class_model.sigma_levels.dtype == torch.float64
    assert class_model.sigma_min == pytest.approx(float(class_model.sigma_levels[0]))
    assert len(class_model.fingerprint) == 64
    assert class_model.conditioned(torch.tensor([0, 1])).evals_per_call == 1
    assert class_model.conditioned(torch.tensor([0, 1]), 3.0).evals_per_call == 2


def test_guided_sampling_counts_both_halves(class_model: models.DiffusionModel) -> None:
    labels = torch.tensor([0, 1, 2, 3])
    for guidance, per_call in ((2.5, 2), (1.0, 1), (0.0, 1), (torch.tensor([0.0, 1.0, 2.0, 1.0]), 2)):
        counted = CountingDenoiser(class_model.conditioned(labels, guidance))
        noise = make_noise([0, 1, 2, 3], class_model.sample_shape)
        with torch.no_grad():
            result = sample(counted, noise, solver="heun", steps=3)
        assert result.nfe == counted.calls == nfe_of("heun", 3)
        assert result.network_evals == counted.network_evals == per_call * result.nfe


def test_guidance_one_is_the_conditional_model_and_zero_the_null_class(class_model: models.DiffusionModel) -> None:
    labels = torch.tensor([0, 3, 1])
    x = 2.0 * torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    t = 40
    sigma = torch.full((3,), float(class_model.sigma_levels[t]))
    with torch.no_grad():
        conditional = class_model.conditioned(labels, 1.0)(x, sigma)
        unconditional = class_model.conditioned(labels, 0.0)(x, sigma)
        null_only = class_model.conditioned(None)(x, sigma)
    eps = network_output(class_model, x, t, labels)
    torch.testing.assert_close(conditional, x - sigma.view(-1, 1, 1, 1) * eps)
    null_eps = network_output(class_model, x, t, torch.full((3,), NULL))
    torch.testing.assert_close(unconditional, x - sigma.view(-1, 1, 1, 1) * null_eps)
    torch.testing.assert_close(null_only, unconditional)
    # and guidance w extrapolates from the null prediction through the conditional one
    with torch.no_grad():
        guided = class_model.conditioned(labels, 3.0)(x, sigma)
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)


def test_per_sample_guidance_in_one_batch_equals_separate_runs(class_model: models.DiffusionModel) -> None:
    labels = torch.tensor([0, 1, 2, 3])
    guidance = torch.tensor([0.0, 1.0, 2.0, 4.5])
    noise = make_noise([10, 11, 12, 13], class_model.sample_shape)
    with torch.no_grad():
        together = sample(class_model.conditioned(labels, guidance), noise, solver="dpmpp_2m", steps=4).images
        for k in range(4):
            alone = sample(
                class_model.conditioned(labels[k : k + 1], float(guidance[k])),
                noise[k : k + 1],
                solver="dpmpp_2m",
                steps=4,
            ).images
            torch.testing.assert_close(together[k : k + 1], alone, rtol=1e-5, atol=1e-5)


def test_gradients_flow_to_x_and_sigma(class_model: models.DiffusionModel) -> None:
    denoiser = class_model.conditioned(torch.tensor([1, 2]), 2.0)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    # between trained levels, where t(sigma) has a nonzero derivative
    sigma = (0.5 * (class_model.sigma_levels[30] + class_model.sigma_levels[31])).float().repeat(2).requires_grad_(True)
    denoised = denoiser(x, sigma)
    denoised.square().sum().backward()
    assert x.grad is not None
    assert sigma.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    assert torch.isfinite(sigma.grad).all()
    assert (sigma.grad != 0).all()
    assert not any(p.requires_grad for p in class_model.unet.parameters())  # nothing to train in the model


def test_bottleneck_feature(class_model: models.DiffusionModel) -> None:
    labels = torch.tensor([0, 1, 2])
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    sigma = torch.full((3,), 1.3)
    guided = class_model.conditioned(labels, 2.0)
    assert isinstance(guided, FeatureDenoiser)
    block = bottleneck_module(class_model.unet)
    with torch.no_grad():
        denoised, feature = guided.denoise_with_feature(x, sigma)
        assert not block._forward_hooks  # removed after the call
        torch.testing.assert_close(denoised, guided(x, sigma))
        _, conditional_feature = class_model.conditioned(labels, 1.0).denoise_with_feature(x, sigma)
        activation = block(*_block_inputs(class_model, x, sigma, labels))
    assert feature.shape == (3, 4, 4)
    assert feature.dtype == x.dtype
    torch.testing.assert_close(feature, conditional_feature, rtol=1e-5, atol=1e-6)  # the conditional half's
    torch.testing.assert_close(feature, activation.mean(dim=1), rtol=1e-5, atol=1e-6)


def _block_inputs(model: models.DiffusionModel, x: Tensor, sigma: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The middle block's inputs, captured with a pre-hook (independent of the adapter's hook)."""
    seen: list[tuple[Tensor, Tensor]] = []
    handle = model.unet.mid_block.register_forward_pre_hook(lambda _m, args: seen.append(args))
    try:
        model.unet(
            x * input_scale(sigma.view(-1, 1, 1, 1)), model.schedule.sigma_to_timestep(sigma), class_labels=labels
        )
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_keeps_the_callers_dtype(tmp_path: Path, dtype: str) -> None:
    folder = save_pipeline(tmp_path, tiny_unet())
    full, reduced = models.load(folder, device="cpu"), models.load(folder, device="cpu", dtype=dtype)
    assert reduced.unet.dtype == getattr(torch, dtype)
    assert reduced.fingerprint == full.fingerprint
    x = 5.0 * torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((2,), 4.0)
    with torch.no_grad():
        exact, approximate = full.conditioned()(x, sigma), reduced.conditioned()(x, sigma)
    assert approximate.dtype == torch.float32
    assert (approximate - exact).abs().max() < 0.1 * exact.abs().max()


def test_channels_last_gives_the_same_result(tmp_path: Path) -> None:
    folder = save_pipeline(tmp_path, tiny_unet())
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():
        plain = models.load(folder, device="cpu").conditioned()(x, sigma)
        packed = models.load(folder, device="cpu", channels_last=True).conditioned()(x, sigma)
    torch.testing.assert_close(plain, packed, rtol=1e-5, atol=1e-6)


def test_fingerprint_follows_weights_and_schedule(tmp_path: Path) -> None:
    first = save_pipeline(tmp_path / "a", tiny_unet())
    same = save_pipeline(tmp_path / "b", tiny_unet())
    other_schedule = save_pipeline(tmp_path / "c", tiny_unet(), beta_end=0.2)
    other_weights = save_pipeline(tmp_path / "d", tiny_unet(norm_num_groups=2))
    prints = [models.load(f, device="cpu").fingerprint for f in (first, same, other_schedule, other_weights)]
    assert prints[0] == prints[1]
    assert len(set(prints)) == 3


def test_embedding_conditioned_unet(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=2,
        out_channels=2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        cross_attention_dim=6,
        attention_head_dim=4,
    )
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model = models.load(save_pipeline(tmp_path, unet), device="cpu")
    assert model.cross_attention_dim == 6
    embeddings = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(7))
    null = torch.zeros(2, 3, 6)
    x = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(8))
    sigma = torch.full((2,), 2.0)
    with torch.no_grad():
        conditional = model.conditioned(embeddings=embeddings)(x, sigma)
        unconditional = model.conditioned(embeddings=null)(x, sigma)
        guided = model.conditioned(guidance=2.0, embeddings=embeddings, null_embeddings=null)
        combined = guided(x, sigma)
        _, feature = guided.denoise_with_feature(x, sigma)
    assert guided.evals_per_call == 2
    torch.testing.assert_close(combined, unconditional + 2.0 * (conditional - unconditional), rtol=1e-5, atol=1e-5)
    assert feature.shape == (2, 4, 4)
    with pytest.raises(models.InvalidConditioningError, match=r"embeddings=None .*\(B, L, 6\)"):
        model.conditioned()


def test_conditioning_errors_name_the_argument(class_model: models.DiffusionModel, tmp_path: Path) -> None:
    with pytest.raises(models.InvalidConditioningError, match=r"labels=5 .*0\.\.4"):
        class_model.conditioned(torch.tensor([0, 5]))
    with pytest.raises(models.InvalidConditioningError, match=r"labels=.*float32.*integer"):
        class_model.conditioned(torch.tensor([0.0, 1.0]))
    with pytest.raises(models.InvalidConditioningError, match=r"guidance=.*finite"):
        class_model.conditioned(torch.tensor([0, 1]), float("nan"))
    with pytest.raises(models.InvalidConditioningError, match=r"batch=.*one batch size"):
        class_model.conditioned(torch.tensor([0, 1]), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(models.InvalidConditioningError, match=r"guidance=2.0 .*labels is None"):
        class_model.conditioned(None, 2.0)
    denoiser = class_model.conditioned(torch.tensor([0, 1]))
    with pytest.raises(models.InvalidConditioningError, match=r"x='batch 3' .*batch 2"):
        denoiser(torch.zeros(3, 2, 8, 8), torch.ones(3))
    plain = models.load(save_pipeline(tmp_path, tiny_unet()), device="cpu")
    with pytest.raises(models.InvalidConditioningError, match=r"labels=.*no class embedding"):
        plain.conditioned(torch.tensor([0]))
    with pytest.raises(models.InvalidConditioningError, match=r"guidance=3.0 .*unconditional model"):
        plain.conditioned(None, 3.0)


# ---- loader errors ----------------------------------------------------------------------------


def test_missing_folder_and_unknown_name() -> None:
    with pytest.raises(
        models.ModelNotFoundError, match=r"'no-such-model' not found: .*built-in name \(mnist, mnist-flow\)"
    ):
        models.load("no-such-model")
    with pytest.raises(models.ModelNotFoundError, match=r"'./missing/folder' not found"):
        models.load("./missing/folder")


def test_hub_id_absent_from_the_cache_says_how_to_download() -> None:
    with pytest.raises(
        models.ModelNotFoundError, match=r"not in the local Hugging Face cache.*huggingface-cli download"
    ):
        models.load("sampler-tests/definitely-not-cached-model")


def test_hub_id_resolves_from_the_local_cache(tmp_path: Path) -> None:
    # The hub cache layout: models--org--name/refs/main names a snapshot folder holding the files.
    repo = tmp_path / "hub" / "models--sampler-tests--tiny-ddpm"
    revision = "0123456789abcdef0123456789abcdef01234567"
    save_pipeline(repo / "snapshots" / revision, tiny_unet())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    model = models.load("sampler-tests/tiny-ddpm", device="cpu", hub_cache=tmp_path / "hub")
    direct = models.load(repo / "snapshots" / revision, device="cpu")
    assert model.fingerprint == direct.fingerprint
    assert model.name == "sampler-tests/tiny-ddpm"
    with pytest.raises(
        models.ModelNotFoundError, match=r"'sampler-tests/other' is not in the local Hugging Face cache"
    ):
        models.load("sampler-tests/other", hub_cache=tmp_path / "hub")


def test_missing_weights(tmp_path: Path) -> None:
    folder = save_pipeline(tmp_path, tiny_unet())
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(models.ModelLoadError, match=r"diffusion_pytorch_model.safetensors: missing"):
        models.load(folder)


def test_pickle_only_weights_are_refused(tmp_path: Path) -> None:
    tiny_unet().save_pretrained(tmp_path / "unet", safe_serialization=False)
    DDPMScheduler(**SCHEDULE).save_pretrained(tmp_path / "scheduler")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(models.ModelLoadError, match=r"diffusion_pytorch_model.bin: pickle-format weights are refused"):
        models.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(tmp_path: Path, damage: str) -> None:
    folder = save_pipeline(tmp_path, tiny_unet())
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x10\x00" + data[2:100])
    with pytest.raises(models.ModelLoadError, match=r"diffusion_pytorch_model.safetensors: not a valid safetensors"):
        models.load(folder)


def test_weights_that_do_not_fit_the_config(tmp_path: Path) -> None:
    folder = save_pipeline(tmp_path, tiny_unet())
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [8, 24]
    config_path.write_text(json.dumps(config))
    with pytest.raises(models.ModelLoadError, match=r"unet.*do(es)? not fit config.json"):
        models.load(folder)


def test_unreadable_config(tmp_path: Path) -> None:
    folder = save_pipeline(tmp_path, tiny_unet())
    (folder / "unet" / "config.json").write_text("{not json")
    with pytest.raises(models.ModelLoadError, match=r"config.json: not valid JSON"):
        models.load(folder)


def test_missing_scheduler(tmp_path: Path) -> None:
    folder = save_pipeline(tmp_path, tiny_unet())
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(models.ModelLoadError, match=r"scheduler_config.json: missing"):
        models.load(folder)


def test_unknown_scheduler_and_unsupported_fields(tmp_path: Path) -> None:
    folder = save_pipeline(tmp_path, tiny_unet())
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "_class_name": "ScoreSdeVeScheduler"}))
    with pytest.raises(models.UnsupportedSchedulerError, match=r"_class_name='ScoreSdeVeScheduler' .*DDPM-family"):
        models.load(folder)
    path.write_text(json.dumps({**config, "beta_schedule": "sigmoid"}))
    with pytest.raises(models.UnsupportedSchedulerError, match=r"beta_schedule='sigmoid' .*linear"):
        models.load(folder)
    path.write_text(json.dumps({**config, "prediction_type": "flow"}))
    with pytest.raises(models.UnsupportedSchedulerError, match=r"prediction_type='flow' .*epsilon"):
        models.load(folder)


def test_unsupported_unet(tmp_path: Path) -> None:
    folder = save_pipeline(tmp_path, tiny_unet(out_channels=4))
    with pytest.raises(models.UnsupportedModelError, match=r"out_channels=4"):
        models.load(folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "_class_name": "UNet1DModel"}))
    with pytest.raises(models.UnsupportedModelError, match=r"_class_name='UNet1DModel' .*UNet2DModel"):
        models.load(folder)


def test_device_and_dtype_choices() -> None:
    with pytest.raises(models.InvalidDeviceError, match=r"device='gpu' .*auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(models.InvalidDeviceError, match=r"device='cuda:0' .*this host has 0"):
            resolve_device("cuda:0")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(models.InvalidDeviceError, match=r"dtype='int8' .*float32, float16, bfloat16, float64"):
        models.load("mnist", dtype="int8")


# ---- the models config file -------------------------------------------------------------------


def test_models_config_loads_every_model(tmp_path: Path) -> None:
    save_pipeline(tmp_path / "tiny", tiny_unet(num_class_embeds=NULL + 1))
    path = tmp_path / "models.toml"
    path.write_text(
        '[[models]]\nname = "tiny"\nsource = "tiny"\ndevice = "cpu"\nnull_class = 4\n\n'
        '[[models]]\nname = "tiny-bf16"\nsource = "./tiny"\ndtype = "bfloat16"\ndevice = "cpu"\n'
    )
    loaded = load_models(read_models_config(path))
    assert list(loaded) == ["tiny", "tiny-bf16"]
    assert loaded["tiny"].null_class == NULL
    assert loaded["tiny-bf16"].null_class is None
    assert loaded["tiny-bf16"].dtype == torch.bfloat16
    assert loaded["tiny"].fingerprint == loaded["tiny-bf16"].fingerprint


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[[models]]\nname = "a"\nsource = "mnist"\ndtype = "int8"\n',
            r"models\[0\]\.dtype='int8': Input should be",
        ),
        ('[[models]]\nname = "a b"\nsource = "mnist"\n', r"models\[0\]\.name='a b': String should match"),
        ('[[models]]\nname = "a"\nsource = "mnist"\ndevices = "cpu"\n', r"models\[0\]\.devices='cpu': Extra inputs"),
        ('[[models]]\nname = "a"\nsource = "mnist"\n[[models]]\nname = "a"\nsource = "mnist"\n', r"repeated: a"),
        ("models = []\n", r"models=\[\]: List should have at least 1 item"),
        ("[[models]\n", r"not valid TOML"),
    ],
)
def test_models_config_errors_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(ModelsConfigError, match=message):
        read_models_config(path)


def test_models_config_names_the_failing_model(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "broken"\nsource = "./nowhere"\n')
    with pytest.raises(ModelsConfigError, match=r"model 'broken' .*nowhere.* not found"):
        load_models(read_models_config(path))
    with pytest.raises(ModelsConfigError, match=r"does not exist"):
        read_models_config(tmp_path / "absent.toml")
