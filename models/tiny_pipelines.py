"""Tiny random-weight Stable Diffusion, SDXL, SD3 and Flux pipelines, built offline from seeded configs.

Tests and benchmarks need real pipeline folders (model_index.json, unet/ or transformer/, vae/,
text_encoder*/, tokenizer*/, scheduler/) without downloading anything. `save_tiny_pipeline(kind,
folder)` builds one with diffusers and transformers from fixed configs and a fixed seed, with CLIP
tokenizers whose byte-level BPE vocabulary is learned here from a few sentences and, for SD3 and
Flux, a T5 tokenizer (a Unigram vocabulary of the same sentences' words and characters, tokenizers
library), and writes it with `save_pretrained(safe_serialization=True)`: the folder is then loaded
exactly as a user's would be.

Kinds: "sd", "sdxl" (UNets, DDPM schedule); "sd3" (SD3Transformer2DModel, CLIP-L + CLIP-G + T5,
shift 3); "sd3-no-t5" (the same saved without its T5, as diffusers allows); "flux" (a
guidance-distilled FluxTransformer2DModel, like FLUX.1-dev) and "flux-cfg" (one without the guidance
embedding, run with true CFG), both with dynamic shift.

Same arguments, same bytes: the weights come from one seeded generator, the tokenizer from a fixed
corpus. Needs the `text` extra (transformers, tokenizers). Depends on nothing else of ours.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import torch

TinyKind = Literal["sd", "sdxl", "sd3", "sd3-no-t5", "flux", "flux-cfg"]
TINY_KINDS: tuple[TinyKind, ...] = ("sd", "sdxl")  # the UNet pipelines (the session fixture saves these)
FLOW_KINDS: tuple[TinyKind, ...] = ("sd3", "sd3-no-t5", "flux", "flux-cfg")
ALL_KINDS: tuple[TinyKind, ...] = (*TINY_KINDS, *FLOW_KINDS)

# A real CLIP context: 75 prompt tokens between start and end, so truncation behaves as with SD.
MAX_TOKENS = 77
VOCAB_SIZE = 1000  # the text encoders' embedding table; the tokenizer uses the first ~560 ids
# The sentences the tokenizer's merges are learned from: a few prompts' worth of English.
CORPUS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a painting of a red fox in the snow, highly detailed",
    "the city at night with neon lights and rain on the street",
    "a watercolor of mountains and a lake at sunrise",
    "blurry, low quality, bad anatomy, watermark, text",
    "a cat sitting on a chair next to the window",
)
NUM_MERGES = 48
# The UNet's default latent size; with the VAE's factor 4 the default image is 32 x 32.
SAMPLE_SIZE = 8
SEED = 0

# Stable Diffusion's trained schedule (SD 1.x, 2.x and SDXL all share it).
SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: each byte as a printable character (printable ASCII and
    Latin-1 map to themselves, the rest to code points from 256 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def learn_bpe(corpus: tuple[str, ...], merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style byte-level BPE vocabulary: 256 bytes, the same with the end-of-word mark
    "</w>", `merges` pair merges learned greedily from `corpus` (ties broken by the pair's text, so
    the result is fixed), then the start and end tokens.

    Returns:
        (vocab token -> id, the merged pairs in merge order).
    """
    alphabet = list(bytes_to_unicode().values())
    words: Counter[tuple[str, ...]] = Counter()
    for text in corpus:
        for word in text.lower().replace(",", " ").split():
            chars = [bytes_to_unicode()[b] for b in word.encode("utf-8")]
            words[(*chars[:-1], chars[-1] + "</w>")] += 1
    learned: list[tuple[str, str]] = []
    for _ in range(merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in pairwise(symbols):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        learned.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in learned)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return vocab, learned


def make_tokenizer(pad_token: str = "<|endoftext|>") -> Any:
    """A CLIPTokenizer over the learned vocabulary (SD's first tokenizer pads with the end token,
    SD 2 / SDXL's second one with "!"), read from vocab.json and merges.txt as real SD folders
    carry them."""
    from transformers import CLIPTokenizer

    vocab, merges = learn_bpe(CORPUS, NUM_MERGES)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
        (Path(folder) / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=MAX_TOKENS)


def _text_config(tokenizer: Any, **overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=32,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def _vae(sample_size: int = SAMPLE_SIZE, scaling: float = 0.18215, **flow: Any) -> Any:
    """The tiny autoencoder: three blocks, a spatial factor of 4 (SD's has four: 8). `flow`: SD3's
    and Flux's extras (a shift as well as a scale, no quant convs)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * 4,
        scaling_factor=scaling,
        **flow,
    )


# The T5 side: SD3 and Flux read T5's last hidden state. Its vocabulary is the corpus's words and
# characters as SentencePiece-style pieces ("▁" marks a word start), scored so that whole words win.
T5_WIDTH = 64  # = the transformers' joint_attention_dim (SD3 pads its CLIP states to this width)
T5_MAX_LENGTH = 512  # the tokenizer's model_max_length; the pipelines cut at 256 (SD3) / 512 (Flux)
# The latents of the flow pipelines' VAE: SD3 / Flux VAEs carry a shift as well as a scale.
FLOW_SCALING, FLOW_SHIFT = 1.5305, 0.0609  # SD3's values (Flux's are 0.3611 and 0.1159)
FLUX_SCALING, FLUX_SHIFT = 0.3611, 0.1159
# The transformers' default latent side (pixels: x 4 for the VAE). Flux's transformer config has no
# sample_size: its default image size is the VAE's sample_size, as in real Flux folders (1024).
FLOW_SAMPLE_SIZE = 8


def t5_vocabulary(corpus: tuple[str, ...] = CORPUS) -> list[tuple[str, float]]:
    """A Unigram vocabulary (piece, log-probability): T5's <pad>, </s>, <unk> first (ids 0, 1, 2),
    then the word-start mark, every word of `corpus` with and without it, and the single characters
    (so any ASCII text tokenizes without <unk>). Scores: words -2, characters -6."""
    words = sorted({w for text in corpus for w in text.lower().replace(",", " ").split()})
    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -2.0) for w in words]
    pieces += [(w, -2.5) for w in words]
    pieces += [(f"▁{c}", -6.0) for c in characters] + [(c, -6.5) for c in characters]
    seen: dict[str, float] = {}
    for piece, score in pieces:
        seen.setdefault(piece, score)
    return list(seen.items())


def make_t5_tokenizer() -> Any:
    """A T5 tokenizer (tokenizers-backed Unigram, transformers' T5Tokenizer / T5TokenizerFast)
    over `t5_vocabulary()`, no sentinel ids: it saves as tokenizer.json + tokenizer_config.json, the
    files real SD3 / Flux folders carry."""
    from transformers import T5Tokenizer  # transformers 5: tokenizers-backed (T5TokenizerFast is its alias)

    return T5Tokenizer(vocab=t5_vocabulary(), extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5_encoder(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=VOCAB_SIZE,
        d_model=T5_WIDTH,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3 and Flux use
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _flow_vae(scaling: float, shift: float) -> Any:
    return _vae(FLOW_SAMPLE_SIZE, scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False)


def _build_sd3(with_t5: bool) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, tokenizer_2, tokenizer_3 = make_tokenizer(), make_tokenizer(pad_token="!"), make_t5_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=FLOW_SAMPLE_SIZE,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=32,  # = heads x head dim
        pooled_projection_dim=64,  # CLIP-L's and CLIP-G's pooled outputs side by side
        pos_embed_max_size=16,
    )
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
    text_encoder_3 = _t5_encoder(tokenizer_3)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_flow_vae(FLOW_SCALING, FLOW_SHIFT),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3 if with_t5 else None,
        tokenizer_3=tokenizer_3 if with_t5 else None,
    )


def _build_flux(distilled: bool) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, tokenizer_2 = make_tokenizer(), make_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2 x 2
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=32,  # CLIP's pooled output
        guidance_embeds=distilled,
        axes_dims_rope=(4, 6, 6),  # sums to the head dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=_flow_vae(FLUX_SCALING, FLUX_SHIFT),
        text_encoder=CLIPTextModel(_text_config(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_pipeline(kind: TinyKind, *, prediction_type: str = "epsilon", seed: int = SEED) -> Any:
    """A StableDiffusionPipeline ("sd"), StableDiffusionXLPipeline ("sdxl"),
    StableDiffusion3Pipeline ("sd3", "sd3-no-t5") or FluxPipeline ("flux": guidance-distilled,
    "flux-cfg": not) with random weights drawn from `seed`, float32, on the CPU. `prediction_type`
    is the UNet pipelines' (the flow ones predict velocity). The global torch generator is left as it was."""
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if kind not in ALL_KINDS:
        raise ValueError(f"kind={kind!r} is not supported: expected one of {', '.join(ALL_KINDS)}")
    if kind in FLOW_KINDS:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if kind.startswith("sd3"):
                return _build_sd3(with_t5=kind == "sd3")
            return _build_flux(distilled=kind == "flux")
    scheduler = EulerDiscreteScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "sd":
            tokenizer = make_tokenizer()
            unet = UNet2DConditionModel(
                sample_size=SAMPLE_SIZE,
                in_channels=4,
                out_channels=4,
                block_out_channels=(16, 32),
                layers_per_block=1,
                norm_num_groups=8,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=4,
            )
            text_encoder = CLIPTextModel(_text_config(tokenizer))
            return StableDiffusionPipeline(
                vae=_vae(),
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        tokenizer, tokenizer_2 = make_tokenizer(), make_tokenizer(pad_token="!")
        unet = UNet2DConditionModel(
            sample_size=SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=64,  # 32 + 32: both encoders' penultimate states side by side
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + encoder 2's pooled output
        )
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
        return StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )


def save_tiny_pipeline(kind: TinyKind, folder: Path, *, prediction_type: str = "epsilon", seed: int = SEED) -> Path:
    """Build a tiny pipeline (see build_tiny_pipeline) and save it, safetensors only, into `folder`
    (created); returns the folder."""
    folder = Path(folder)
    pipeline = build_tiny_pipeline(kind, prediction_type=prediction_type, seed=seed)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    # The VAE keeps force_upcast's default (True), as SDXL's own does; recorded for readers.
    config = json.loads((folder / "vae" / "config.json").read_text())
    if not config.get("force_upcast", True):
        raise AssertionError("the tiny VAE lost force_upcast")  # pragma: no cover - diffusers default changed
    return folder


__all__ = [
    "ALL_KINDS",
    "FLOW_KINDS",
    "TINY_KINDS",
    "TinyKind",
    "build_tiny_pipeline",
    "bytes_to_unicode",
    "learn_bpe",
    "make_t5_tokenizer",
    "save_tiny_pipeline",
    "t5_vocabulary",
]
