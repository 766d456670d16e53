"""The MNIST IDX files: reading, checking and turning them into tensors.

The training set is read from the shared data folder (../shared/data/mnist from the project root,
or any folder given); the test set (1.6 MB) is also bundled in models/mnist/t10k/ so the tests
and the model card work on a fresh clone anywhere. Every file is checked against the published
MD5 of its decompressed bytes, so a truncated or different copy is an error, not silently worse
numbers.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from models.errors import ModelError

Split = Literal["train", "test"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_ROOT = REPO_ROOT.parent / "shared" / "data" / "mnist"
BUNDLED_TEST_ROOT = Path(__file__).resolve().parent / "t10k"

_FILES: dict[Split, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# MD5 of the decompressed bytes, as the data set's README publishes them.
_MD5 = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


class MnistDataError(ModelError):
    """An MNIST file is missing, corrupt or not the published one; the message names the file."""


@dataclass(frozen=True)
class Mnist:
    """One split.

    Attributes:
        images: uint8, shape (N, 28, 28), 0 = background, 255 = ink.
        labels: int64, shape (N,), digits 0..9.
    """

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def scaled(self) -> Tensor:
        """The images as float32 in [-1, 1], shape (N, 1, 28, 28): the diffusion model's data space."""
        return self.images.to(torch.float32).div(127.5).sub(1.0).unsqueeze(1)


def default_root(split: Split) -> Path:
    """Where `load` looks when given no folder: the bundled copy for the test set, the shared
    data folder for the training set."""
    return BUNDLED_TEST_ROOT if split == "test" else SHARED_ROOT


def load(split: Split, root: Path | None = None) -> Mnist:
    """Read and check one split.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        root: the folder holding the four IDX .gz files (default: `default_root(split)`).
    Raises:
        MnistDataError: a file is missing, is not the published one, or is malformed.
    """
    folder = Path(root) if root is not None else default_root(split)
    image_name, label_name = _FILES[split]
    images = _read_idx(folder / image_name, _IMAGE_MAGIC)
    labels = _read_idx(folder / label_name, _LABEL_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise MnistDataError(f"{folder}: {images.shape[0]} images but {labels.shape[0]} labels")
    return Mnist(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def _read_idx(path: Path, magic: int) -> np.ndarray:
    if not path.is_file():
        raise MnistDataError(
            f"{path} does not exist: MNIST is read from the IDX files in {SHARED_ROOT} "
            "(or the folder given with --data)"
        )
    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as error:
        raise MnistDataError(f"{path} is not a readable gzip file: {error}") from None
    digest = hashlib.md5(raw, usedforsecurity=False).hexdigest()
    if digest != _MD5[path.name]:
        raise MnistDataError(f"{path} is not the published MNIST file: md5 {digest}, expected {_MD5[path.name]}")
    dims = 3 if magic == _IMAGE_MAGIC else 1
    header = struct.unpack(f">{1 + dims}I", raw[: 4 * (1 + dims)])
    if header[0] != magic:
        raise MnistDataError(f"{path}: magic number {header[0]}, expected {magic}")
    shape = header[1:]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 * (1 + dims))
    return data.reshape(shape)


__all__ = ["BUNDLED_TEST_ROOT", "SHARED_ROOT", "Mnist", "MnistDataError", "default_root", "load"]
