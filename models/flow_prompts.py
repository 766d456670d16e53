"""Prompt encoding for the rectified-flow transformers: SD3 (CLIP-L, CLIP-G and T5) and Flux (CLIP and T5).

Both follow diffusers' pipelines token for token, so a prompt means here what it means there:

- SD3: each CLIP encoder's penultimate hidden states (77 tokens) side by side, zero-padded on the
  feature axis to T5's width, then T5's last hidden state (256 tokens) appended along the sequence;
  the pooled vector is both CLIP encoders' projected outputs side by side. A folder saved without
  its T5 encoder gets zeros in T5's place (width: the transformer's joint_attention_dim), as
  diffusers does.
- Flux: T5's last hidden state (512 tokens) is the sequence, CLIP's pooled output the vector.

The texts go through `PromptBatch` like SD's: hidden (B, L, D) and pooled (B, P), cached per text.
Depends on transformers only through the objects it is given.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .prompts import PromptBatch, PromptCache, PromptEmbedding, clip_dropped_tokens, encode_cached

# diffusers' max_sequence_length defaults: the T5 tokens a pipeline keeps.
SD3_T5_TOKENS = 256
FLUX_T5_TOKENS = 512


class T5Text:
    """A T5 tokenizer and encoder cut at `tokens` tokens (the end token included, as T5 pads and truncates)."""

    def __init__(self, tokenizer: Any, encoder: Any, tokens: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.tokens = tokens
        self.width = int(encoder.config.d_model)

    def dropped_tokens(self, text: str) -> int:
        count = len(self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
        return max(0, count - (self.tokens - 1))  # room for the end token

    def ids(self, texts: list[str]) -> Tensor:
        return self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.tokens,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids

    def hidden(self, ids: Tensor, device: torch.device) -> Tensor:
        return self.encoder(ids.to(device))[0]


class _TransformerPrompts:
    """What the SD3 and Flux encoders share: the cache, the locks, the token accounting."""

    def __init__(
        self, clip_tokenizers: Sequence[Any], t5: T5Text | None, *, fingerprint: str, cache: PromptCache
    ) -> None:
        self.clip_tokenizers = list(clip_tokenizers)
        self.t5 = t5
        self.fingerprint = fingerprint
        self.cache = cache
        # The context a prompt is cut to: T5's where there is one (longer), else CLIP's.
        self.max_tokens = t5.tokens if t5 is not None else min(int(t.model_max_length) for t in self.clip_tokenizers)
        self._lock = threading.Lock()  # one encoder call at a time (the modules are shared)
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not re-entrant (see ClipPromptEncoder)

    def dropped_tokens(self, text: str) -> int:
        """Tokens cut from the longest-context encoder (T5 when present, else CLIP); what CLIP
        alone cuts past its 77 tokens is what every SD3 / Flux prompt over ~60 words loses, and
        T5 carries it."""
        with self._tokenizer_lock:
            if self.t5 is not None:
                return self.t5.dropped_tokens(text)
            return max(clip_dropped_tokens(t, text) for t in self.clip_tokenizers)

    def encode(self, texts: Sequence[str]) -> PromptBatch:
        return encode_cached(self.cache, self.fingerprint, texts, self._run)

    def _clip_ids(self, texts: list[str]) -> list[Tensor]:
        return [
            t(
                texts, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            for t in self.clip_tokenizers
        ]

    def _run(self, texts: list[str]) -> list[PromptEmbedding]:
        raise NotImplementedError


class SD3PromptEncoder(_TransformerPrompts):
    """StableDiffusion3Pipeline's text side (see the module docstring).

    Args:
        clip_tokenizers, clip_encoders: CLIP-L and CLIP-G (CLIPTextModelWithProjection), in order.
        t5: the T5 encoder, or None for a folder saved without it.
        joint_width: the transformer's joint_attention_dim (T5's width; the zeros' width without T5).
    """

    def __init__(
        self,
        clip_tokenizers: Sequence[Any],
        clip_encoders: Sequence[torch.nn.Module],
        t5: T5Text | None,
        *,
        joint_width: int,
        fingerprint: str,
        cache: PromptCache,
    ) -> None:
        super().__init__(clip_tokenizers, t5, fingerprint=fingerprint, cache=cache)
        self.clip_encoders = list(clip_encoders)
        self.joint_width = joint_width
        self.device = next(iter(self.clip_encoders[0].parameters())).device
        # Without T5 the sequence still has its T5 part, all zeros (diffusers' max_sequence_length).
        self.t5_tokens = t5.tokens if t5 is not None else SD3_T5_TOKENS

    def _run(self, texts: list[str]) -> list[PromptEmbedding]:
        with self._tokenizer_lock:
            clip_ids = self._clip_ids(texts)
            t5_ids = self.t5.ids(texts) if self.t5 is not None else None
        with self._lock, torch.no_grad():
            states, pooled = [], []
            for ids, encoder in zip(clip_ids, self.clip_encoders, strict=True):
                output = encoder(ids.to(self.device), output_hidden_states=True)
                states.append(output.hidden_states[-2])
                pooled.append(output[0])
            clip = torch.cat(states, dim=-1)
            if t5_ids is not None and self.t5 is not None:
                t5 = self.t5.hidden(t5_ids, self.device).to(clip.dtype)
            else:
                t5 = torch.zeros(len(texts), self.t5_tokens, self.joint_width, dtype=clip.dtype, device=self.device)
            # diffusers pads (or, were T5 narrower, cuts) CLIP's features to T5's width.
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            hidden = torch.cat([clip, t5], dim=-2)
            vector = torch.cat(pooled, dim=-1)
        return [PromptEmbedding(hidden[k].clone(), vector[k].clone()) for k in range(len(texts))]


class FluxPromptEncoder(_TransformerPrompts):
    """FluxPipeline's text side: T5's hidden states, CLIP's pooled output (CLIPTextModel)."""

    def __init__(
        self, clip_tokenizer: Any, clip_encoder: torch.nn.Module, t5: T5Text, *, fingerprint: str, cache: PromptCache
    ) -> None:
        super().__init__([clip_tokenizer], t5, fingerprint=fingerprint, cache=cache)
        self.clip_encoder = clip_encoder
        self.t5_text = t5
        self.device = next(iter(clip_encoder.parameters())).device

    def _run(self, texts: list[str]) -> list[PromptEmbedding]:
        with self._tokenizer_lock:
            (clip_ids,) = self._clip_ids(texts)
            t5_ids = self.t5_text.ids(texts)
        with self._lock, torch.no_grad():
            vector = self.clip_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output
            hidden = self.t5_text.hidden(t5_ids, self.device)
        return [PromptEmbedding(hidden[k].clone(), vector[k].clone()) for k in range(len(texts))]


__all__ = ["FLUX_T5_TOKENS", "SD3_T5_TOKENS", "FluxPromptEncoder", "SD3PromptEncoder", "T5Text"]
