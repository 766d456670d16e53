"""Prompt encoding for text-to-image models: CLIP text encoders, truncation as diffusers does it,
and an LRU cache of encoded prompts.

A `PromptEncoder` turns texts into what a denoising network reads: per-token hidden states
(B, L, D) and, for models that take one, a pooled vector (B, P). `ClipPromptEncoder` covers
Stable Diffusion (one CLIP encoder, its last hidden state) and SDXL (two encoders, their
penultimate hidden states side by side, the second one's projected pooled output); SD3's and
Flux's, with their T5 encoders, are in flow_prompts.py behind the same protocol.

Prompts are encoded once per request, never per step, and cached by (encoder fingerprint, text),
so a server that sees the same prompt (or the empty negative prompt) again does no text work.
Depends on transformers only through the objects it is given; imports nothing of the service.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from .errors import InvalidConditioningError

DEFAULT_CACHE_SIZE = 256


@dataclass(frozen=True, eq=False)
class PromptEmbedding:
    """One text, encoded.

    Attributes:
        hidden: per-token hidden states (L, D), on the encoder's device and dtype.
        pooled: the pooled vector (P,), or None when the model takes none.
    """

    hidden: Tensor
    pooled: Tensor | None


@dataclass(frozen=True, eq=False)
class PromptBatch:
    """Texts of one pass, encoded, as the denoiser binds them.

    Attributes:
        hidden: (B, L, D).
        pooled: (B, P) or None.
    """

    hidden: Tensor
    pooled: Tensor | None

    @classmethod
    def stack(cls, items: Sequence[PromptEmbedding]) -> PromptBatch:
        pooled = [item.pooled for item in items if item.pooled is not None]
        return cls(
            torch.stack([item.hidden for item in items]),
            torch.stack(pooled) if len(pooled) == len(items) else None,
        )


class PromptCache:
    """A thread-safe LRU map (encoder fingerprint, text) -> PromptEmbedding.

    One cache may serve several models: the fingerprint keeps their encoders apart, and models that
    share an encoder (fine-tunes of one base) share its entries. Size 0 disables caching.
    """

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidConditioningError("prompt_cache_size", size, "an integer >= 0")
        self.size = size
        self._entries: OrderedDict[tuple[str, str], PromptEmbedding] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, fingerprint: str, text: str) -> PromptEmbedding | None:
        with self._lock:
            entry = self._entries.get((fingerprint, text))
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end((fingerprint, text))
            self.hits += 1
            return entry

    def put(self, fingerprint: str, text: str, entry: PromptEmbedding) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._entries[(fingerprint, text)] = entry
            self._entries.move_to_end((fingerprint, text))
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class PromptEncoder(Protocol):
    """What a text-to-image model needs from its text side.

    Attributes:
        fingerprint: identifies the encoders and tokenizers (cache key).
        max_tokens: the tokenizers' context length, special tokens included.
        device: where the encoders run.
        cache: where encoded texts are kept.
    """

    fingerprint: str
    max_tokens: int
    device: torch.device
    cache: PromptCache

    def dropped_tokens(self, text: str) -> int:
        """How many of the text's tokens do not fit the context and are cut (0 when it fits)."""
        ...

    def encode(self, texts: Sequence[str]) -> PromptBatch:
        """The texts' embeddings (B, L, D) and pooled vectors, each text encoded at most once
        while cached."""
        ...


def encode_cached(
    cache: PromptCache, fingerprint: str, texts: Sequence[str], run: Callable[[list[str]], list[PromptEmbedding]]
) -> PromptBatch:
    """The texts' embeddings, each distinct text not in the cache encoded once by `run` (all
    missing ones in one call) and cached."""
    found: dict[str, PromptEmbedding] = {}
    missing: list[str] = []
    for text in dict.fromkeys(texts):
        entry = cache.get(fingerprint, text)
        if entry is None:
            missing.append(text)
        else:
            found[text] = entry
    if missing:
        for text, entry in zip(missing, run(missing), strict=True):
            cache.put(fingerprint, text, entry)
            found[text] = entry
    return PromptBatch.stack([found[text] for text in texts])


def clip_dropped_tokens(tokenizer: Any, text: str) -> int:
    """What tokenizer(truncation=True, max_length=model_max_length) cuts of a CLIP tokenizer's
    text: its tokens past the room left by the start and end tokens (0 when it fits)."""
    count = len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
    return max(0, count - (int(tokenizer.model_max_length) - 2))


class ClipPromptEncoder:
    """One or two CLIP text encoders with their tokenizers, as Stable Diffusion pipelines use them.

    Args:
        tokenizers, encoders: CLIPTokenizer(s) and CLIPTextModel / CLIPTextModelWithProjection(s),
            in the pipeline's order; eval mode, gradients off, on one device.
        layer: "last" (SD 1.x / 2.x: the last hidden state, after the final layer norm) or
            "penultimate" (SDXL: the second-to-last layer's states, no final norm).
        pooled: take the pooled vector (the projected text embedding) of the last encoder (SDXL).
        fingerprint: digest of the encoders' and tokenizers' files.
        cache: where encoded texts are kept (shared or per model).
    """

    def __init__(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[torch.nn.Module],
        *,
        layer: Literal["last", "penultimate"],
        pooled: bool,
        fingerprint: str,
        cache: PromptCache,
    ) -> None:
        if len(tokenizers) != len(encoders) or not tokenizers:
            raise ValueError("one tokenizer per text encoder, at least one")
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)
        self.layer = layer
        self.pooled = pooled
        self.fingerprint = fingerprint
        self.cache = cache
        self.max_tokens = min(int(t.model_max_length) for t in self.tokenizers)
        first = next(iter(self.encoders[0].parameters()))
        self.device = first.device
        self._lock = threading.Lock()  # one encoder call at a time (the modules are shared)
        # A fast tokenizer switches its padding / truncation state on every call: two threads in it
        # at once fail ("Already borrowed"). Validation counts tokens on the event loop while a
        # worker encodes, so every tokenizer call takes this short lock (not the encoders' one).
        self._tokenizer_lock = threading.Lock()

    def dropped_tokens(self, text: str) -> int:
        dropped = 0
        for tokenizer in self.tokenizers:
            # What tokenizer(truncation=True, max_length=model_max_length) cuts: the text's tokens
            # past the room left by the start and end tokens.
            with self._tokenizer_lock:
                dropped = max(dropped, clip_dropped_tokens(tokenizer, text))
        return dropped

    def encode(self, texts: Sequence[str]) -> PromptBatch:
        return encode_cached(self.cache, self.fingerprint, texts, self._run)

    def _run(self, texts: list[str]) -> list[PromptEmbedding]:
        with self._tokenizer_lock:
            ids = [
                tokenizer(
                    texts,
                    padding="max_length",
                    max_length=tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids
                for tokenizer in self.tokenizers
            ]
        states: list[Tensor] = []
        pooled: Tensor | None = None
        with self._lock, torch.no_grad():
            for token_ids, encoder in zip(ids, self.encoders, strict=True):
                output = encoder(token_ids.to(self.device), output_hidden_states=self.layer == "penultimate")
                if self.layer == "last":
                    states.append(output[0])
                else:
                    states.append(output.hidden_states[-2])
                if self.pooled:
                    pooled = output[0] if output[0].dim() == 2 else None
        if self.pooled and pooled is None:
            raise InvalidConditioningError("text_encoder", type(self.encoders[-1]).__name__, "a projection encoder")
        hidden = torch.cat(states, dim=-1)
        return [
            PromptEmbedding(hidden[k].clone(), None if pooled is None else pooled[k].clone()) for k in range(len(texts))
        ]


__all__ = [
    "DEFAULT_CACHE_SIZE",
    "ClipPromptEncoder",
    "PromptBatch",
    "PromptCache",
    "PromptEmbedding",
    "PromptEncoder",
    "clip_dropped_tokens",
    "encode_cached",
]
