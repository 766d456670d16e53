"""FID: the Frechet distance on the standard Inception-v3 pool features (2048-d), opt-in.

The network is pytorch-fid's port of the TensorFlow FID Inception (`pip install -e '.[fid]'`).
Its weights are the one documented exception to "safetensors only": the standard
`pt_inception-2015-12-05-6726825d.pth` is a pickled state dict, so it is loaded only

1. from a local path (`--fid-weights`) or the torch hub cache (where pytorch-fid keeps it),
   never downloaded at run time;
2. after its SHA-256 is checked against the prefix in its name (torch hub's convention; the
   same check `torch.hub.download_url_to_file(..., hash_prefix=...)` performs on download);
3. with `torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.

Without the library or the weights the harness leaves the `fid` column empty, says how to get
them and completes the rest. Reference statistics (mean and covariance of the real images'
features) are computed once per (reference, weights) and cached as a plain .npz (no pickle).

Images enter as the service delivers them: 8-bit levels, in [0, 1], grey repeated to RGB; the
network resizes to 299 x 299 (bilinear) itself. TF32 is switched off while features are computed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from models.mnist import data

from .frechet import FeatureStats

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
FEATURE_DIM = 2048
HOW_TO_GET = (
    "FID needs pytorch-fid (pip install -e '.[fid]') and the standard Inception weights: download "
    f"{WEIGHTS_URL} once (e.g. `curl -LO {WEIGHTS_URL}`) and pass --fid-weights PATH, or place it in "
    f"the torch hub cache as {Path(torch.hub.get_dir()) / 'checkpoints' / WEIGHTS_NAME}"
)


class FidUnavailable(Exception):
    """The FID network cannot be built here (library or weights missing); the message says why."""


class FidWeightsRejected(Exception):
    """A weights file failed its integrity check: it is never unpickled."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def locate_weights(path: str | os.PathLike[str] | None) -> Path:
    """The weights file: `path` when given (it must exist), else the torch hub cache copy."""
    if path is not None:
        candidate = Path(path).expanduser()
        if not candidate.is_file():
            raise FidUnavailable(f"--fid-weights {candidate}: no such file. {HOW_TO_GET}")
        return candidate
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME
    if not candidate.is_file():
        raise FidUnavailable(f"no Inception weights at {candidate}. {HOW_TO_GET}")
    return candidate


def load_verified_state(path: Path, sha256_prefix: str = WEIGHTS_SHA256_PREFIX) -> dict[str, Tensor]:
    """The state dict in `path`, after its SHA-256 matched `sha256_prefix`; weights_only loading."""
    digest = sha256_of(path)
    if not digest.startswith(sha256_prefix.lower()):
        raise FidWeightsRejected(
            f"{path}: SHA-256 {digest} does not start with {sha256_prefix}, so it is not the standard "
            f"FID Inception weights ({WEIGHTS_NAME}); refusing to load it. {HOW_TO_GET}"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FidWeightsRejected(f"{path}: not a state dict of tensors")
    return state


def build_inception(state: dict[str, Tensor], device: torch.device | str = "cpu") -> nn.Module:
    """pytorch-fid's FID Inception with `state` loaded (its own download hook is bypassed)."""
    try:
        from pytorch_fid import inception
    except Exception as error:  # ImportError, or torchvision failing to load its extension
        raise FidUnavailable(
            f"pytorch-fid cannot be imported ({type(error).__name__}: {error}). {HOW_TO_GET}"
        ) from None
    with mock.patch.object(inception, "load_state_dict_from_url", return_value=state):
        network = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]])
    return network.eval().to(device)


@contextmanager
def tf32_off() -> Iterator[None]:
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def to_unit_rgb(images: Tensor) -> Tensor:
    """[-1, 1] images (N, C, H, W), C in {1, 3}, quantised to 8 bits, in [0, 1], 3 channels, float32."""
    pixels = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round() / 255.0
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


class FidExtractor:
    """Inception pool features of [-1, 1] images, and the cached reference statistics."""

    def __init__(
        self,
        weights: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        sha256_prefix: str = WEIGHTS_SHA256_PREFIX,
        batch_size: int = 200,
    ) -> None:
        path = locate_weights(weights)
        self.weights_sha256 = sha256_of(path)
        self.network = build_inception(load_verified_state(path, sha256_prefix), device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def features(self, images: Tensor) -> Tensor:
        """(N, 2048) float64 features of images in [-1, 1], shape (N, C, H, W), on the CPU."""
        parts = []
        with torch.inference_mode(), tf32_off():
            for start in range(0, images.shape[0], self.batch_size):
                batch = to_unit_rgb(images[start : start + self.batch_size]).to(self.device)
                parts.append(self.network(batch)[0].flatten(1).double().cpu())
        return torch.cat(parts)

    def reference_stats(self, reference: str | None, cache: Path) -> FeatureStats:
        """Statistics of the reference set: `None` = the MNIST test set, an .npz with `mu` and
        `sigma`, or a folder of images (scaled to [-1, 1]). Cached per (reference, weights)."""
        if reference is not None and reference.endswith(".npz"):
            return load_stats(Path(reference))
        name = reference or "mnist-test"
        key = hashlib.sha256(f"{Path(name).resolve() if reference else name}|{self.weights_sha256}".encode())
        path = cache / f"fid-reference-{key.hexdigest()[:20]}.npz"
        if path.is_file():
            return load_stats(path)
        images = data.load("test").scaled() if reference is None else load_image_folder(Path(reference))
        stats = FeatureStats.of(self.features(images))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, mu=stats.mean, sigma=stats.cov, count=np.array(stats.count))
        return stats


def load_stats(path: Path) -> FeatureStats:
    """`mu` (D,) and `sigma` (D, D) from an .npz (the pytorch-fid format), without pickle."""
    with np.load(path, allow_pickle=False) as stored:
        count = int(stored["count"]) if "count" in stored.files else 0
        return FeatureStats(np.asarray(stored["mu"], np.float64), np.asarray(stored["sigma"], np.float64), count)


def load_image_folder(folder: Path) -> Tensor:
    """Every PNG/JPEG in `folder` as a float tensor in [-1, 1], (N, C, H, W) (all the same size)."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg"})
    if len(files) < 2:
        raise FidUnavailable(f"--fid-reference {folder}: fewer than 2 images (.png, .jpg)")
    arrays = []
    for file in files:
        with Image.open(file) as image:
            array = np.asarray(image.convert("L" if image.mode in {"L", "1", "P"} else "RGB"), np.float32)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(arrays)) / 127.5 - 1.0


__all__ = [
    "FEATURE_DIM",
    "WEIGHTS_NAME",
    "WEIGHTS_SHA256_PREFIX",
    "FidExtractor",
    "FidUnavailable",
    "FidWeightsRejected",
    "load_stats",
    "load_verified_state",
    "locate_weights",
    "sha256_of",
    "to_unit_rgb",
]
