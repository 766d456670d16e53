"""Loading the shipped MNIST feature classifier (models/builtin/mnist-classifier).

safetensors only; the folder's config.json names the architecture and the feature size, and a
mismatch with `MnistClassifier` is an error naming the file rather than a strict-load traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from models.errors import ModelError
from models.mnist.architecture import MnistClassifier

DEFAULT_CLASSIFIER = Path(__file__).resolve().parents[1] / "builtin" / "mnist-classifier"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "MnistClassifier"


def load_classifier(folder: Path | None = None, device: str | torch.device = "cpu") -> MnistClassifier:
    """The classifier in eval mode with gradients off, on `device`.

    Raises:
        ModelError: the folder, its config or its weights are missing or do not fit the architecture.
    """
    folder = Path(folder) if folder is not None else DEFAULT_CLASSIFIER
    config_path, weights_path = folder / "config.json", folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelError(
                f"{path} does not exist: the classifier is trained by python -m models.mnist.train_classifier"
            )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("architecture") != ARCHITECTURE or config.get("feature_dim") != MnistClassifier.feature_dim:
        raise ModelError(
            f"{config_path}: architecture {config.get('architecture')!r} with feature_dim "
            f"{config.get('feature_dim')}, expected {ARCHITECTURE!r} with {MnistClassifier.feature_dim}"
        )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise ModelError(f"{weights_path} is not a readable safetensors file: {error}") from None
    model = MnistClassifier()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{weights_path} does not fit {ARCHITECTURE}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.eval().requires_grad_(False)
    return model.to(device)


__all__ = ["DEFAULT_CLASSIFIER", "load_classifier"]
