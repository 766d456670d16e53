"""Reading model files safely: JSON configs, safetensors weights (pickle refused), fingerprints.

Shared by the UNet loader (loading.py) and the pipeline loader (pipelines.py). Every problem is a
`ModelLoadError` naming the file. Imports nothing of ours but the errors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class WeightNames:
    """How a library names a component's weights: one file, or a shard index listing several."""

    single: str
    index: str
    library: str

    def variant(self, name: str | None) -> WeightNames:
        """The names of a precision variant, as diffusers and transformers save them
        (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`); itself for None."""
        if name is None:
            return self
        stem, _, suffix = self.single.rpartition(".")
        index_stem, _, index_suffix = self.index.rpartition(".")
        return WeightNames(f"{stem}.{name}.{suffix}", f"{index_stem}.{name}.{index_suffix}", self.library)


DIFFUSERS_WEIGHTS = WeightNames(
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json", "diffusers"
)
TRANSFORMERS_WEIGHTS = WeightNames("model.safetensors", "model.safetensors.index.json", "transformers")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or a ModelLoadError naming it."""
    if not path.is_file():
        raise ModelLoadError(path, "missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(path, f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ModelLoadError(path, f"expected a JSON object, found {type(value).__name__}")
    return value


def weight_files(
    folder: Path, names: WeightNames = DIFFUSERS_WEIGHTS, what: str = "UNet", variant: str | None = None
) -> list[Path]:
    """A component's safetensors files (one, or the shards of an index), each checked to be readable;
    those of a precision variant ("fp16") when `variant` is given.

    Raises:
        ModelLoadError: no safetensors weights (pickle-only weights are named and refused), a shard
            index naming missing files, or a file that is not valid safetensors.
    """
    names = names.variant(variant)
    single, index = folder / names.single, folder / names.index
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise ModelLoadError(index, "has an empty weight_map")
        files = [folder / name for name in shards]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(file, f"missing (listed in {index.name})")
    else:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
        if pickled:
            raise ModelLoadError(
                folder / pickled[0],
                "pickle-format weights are refused (loading them can run arbitrary code); convert them to "
                f"{names.single} on a trusted machine ({names.library}: save_pretrained(..., safe_serialization=True))",
            )
        raise ModelLoadError(single, f"missing: no {what} weights in this folder")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                    handle.get_slice(key)  # checks each tensor's header and bounds; reads no data
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelLoadError(file, f"not a valid safetensors file ({error})") from None
    return files


def digest(weights: Iterable[Path], configs: Iterable[Path], *, raw: Iterable[Path] = ()) -> str:
    """SHA-256 over weight files' bytes, JSON configs (canonical, without diffusers' bookkeeping
    keys such as _diffusers_version) and other files' bytes (tokenizer vocabularies), in the order
    given. Predictors, caches and benchmark rows are keyed by it."""
    hasher = hashlib.sha256()
    for path in weights:
        hasher.update(path.name.encode())
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                hasher.update(chunk)
    for path in configs:
        config = {k: v for k, v in read_json(path).items() if not k.startswith("_")}
        hasher.update(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    for path in raw:
        hasher.update(path.name.encode())
        hasher.update(path.read_bytes())
    return hasher.hexdigest()


__all__ = [
    "DIFFUSERS_WEIGHTS",
    "PICKLE_SUFFIXES",
    "TRANSFORMERS_WEIGHTS",
    "WeightNames",
    "digest",
    "read_json",
    "weight_files",
]
