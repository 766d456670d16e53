"""Random-weight pipelines with the real Stable Diffusion 1.5 and SDXL architectures, for speed
benchmarks on accelerators (nothing downloaded: the configs are the published ones, the weights are
random, the tokenizer is the tiny one of tiny_pipelines.py, whose ids fit CLIP's vocabulary).

They are large: SD 1.5's UNet has 860 M parameters, SDXL's 2.57 G (about 1.7 and 5.1 GB in float16),
plus text encoders (123 M; 123 M + 695 M) and a VAE (84 M). `save_full_size_pipeline(kind, folder,
dtype=torch.float16)` builds on the CPU and writes safetensors in `dtype`, so `models.load` and
diffusers read them as they read a real folder. Numbers measured on them are speeds, never quality.
Depends on nothing else of ours but tiny_pipelines' tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from .tiny_pipelines import MAX_TOKENS, SD_SCHEDULE, make_tokenizer

FullSizeKind = Literal["sd15", "sdxl"]
FULL_SIZE_KINDS: tuple[FullSizeKind, ...] = ("sd15", "sdxl")
CLIP_VOCAB = 49408


def unet_config(kind: FullSizeKind) -> dict[str, Any]:
    """The UNet2DConditionModel config of SD 1.5 or SDXL base (architecture fields only)."""
    if kind == "sd15":
        return {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        }
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }


def _clip(tokenizer: Any, *, big: bool) -> Any:
    from transformers import CLIPTextConfig

    # (hidden, intermediate, layers, heads): OpenCLIP bigG (SDXL's second encoder) or CLIP ViT-L
    hidden, intermediate, layers, heads = (1280, 5120, 32, 20) if big else (768, 3072, 12, 12)
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=hidden,
        hidden_act="gelu" if big else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_full_size_pipeline(kind: FullSizeKind, *, seed: int = 0) -> Any:
    """A StableDiffusionPipeline ("sd15") or StableDiffusionXLPipeline ("sdxl") with the real
    architecture and random weights from `seed`, float32, on the CPU (several GB of memory)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in FULL_SIZE_KINDS:
        raise ValueError(f"kind={kind!r} is not supported: expected one of {', '.join(FULL_SIZE_KINDS)}")
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512 if kind == "sd15" else 1024,
            scaling_factor=0.18215 if kind == "sd15" else 0.13025,
            force_upcast=kind == "sdxl",
        )
        unet = UNet2DConditionModel(**unet_config(kind))
        tokenizer = make_tokenizer()
        text_encoder = CLIPTextModel(_clip(tokenizer, big=False))
        if kind == "sd15":
            return StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        tokenizer_2 = make_tokenizer(pad_token="!")
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=CLIPTextModelWithProjection(_clip(tokenizer_2, big=True)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )


def save_full_size_pipeline(
    kind: FullSizeKind, folder: Path, *, dtype: torch.dtype = torch.float16, seed: int = 0
) -> Path:
    """Build (see build_full_size_pipeline) and save in `dtype`, safetensors only; returns the folder."""
    pipeline = build_full_size_pipeline(kind, seed=seed).to(dtype=dtype)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)


__all__ = ["FULL_SIZE_KINDS", "FullSizeKind", "build_full_size_pipeline", "save_full_size_pipeline", "unet_config"]
