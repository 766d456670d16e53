"""Scoring generated MNIST digits with the project's classifier: class accuracy, the digit
histogram of unconditional samples, and the in-domain Frechet distance on its 128-d feature.

Generated images are scored the way the service delivers them: clamped to [-1, 1] and quantised
to 8-bit pixel levels, exactly as the real test images are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.mnist import data
from models.mnist.architecture import NUM_CLASSES, MnistClassifier
from models.mnist.classifier import load_classifier

from .frechet import FeatureStats, features_in_batches, frechet_distance


def quantise(images: Tensor) -> Tensor:
    """[-1, 1] float images (N, 1, 28, 28) rounded to the 256 pixel levels, back in [-1, 1], float32."""
    pixels = ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return pixels / 127.5 - 1.0


@dataclass(frozen=True)
class Scores:
    """What the classifier says about a set of images.

    Attributes:
        predicted: the predicted digit of each image, int64 (N,).
        stats: mean and covariance of the 128-d features.
    """

    predicted: Tensor
    stats: FeatureStats

    def accuracy(self, labels: Tensor) -> float:
        return float((self.predicted == labels.to(self.predicted.device)).double().mean())

    def histogram(self) -> list[float]:
        """The share of each digit 0..9 among the predictions."""
        counts = torch.bincount(self.predicted, minlength=NUM_CLASSES).double()
        return (counts / counts.sum()).tolist()


_SHARED: dict[str, MnistScorer] = {}


class MnistScorer:
    """The classifier and the test set's feature statistics, computed once."""

    def __init__(self, classifier: MnistClassifier, device: torch.device | str = "cpu") -> None:
        self.classifier = classifier.to(device)
        self.device = torch.device(device)
        test = data.load("test")
        self.test_images = test.scaled()
        self.test_labels = test.labels
        self.test_features = self.features(self.test_images)
        self.test_stats = FeatureStats.of(self.test_features)

    @classmethod
    def shared(cls, device: torch.device | str = "cpu") -> MnistScorer:
        """One scorer per device and process with the shipped classifier (the 10,000 test
        features are computed once, not per sweep)."""
        key = str(torch.device(device))
        if key not in _SHARED:
            _SHARED[key] = cls(load_classifier(), device)
        return _SHARED[key]

    def features(self, images: Tensor) -> Tensor:
        """The 128-d classifier features of images in [-1, 1] (N, 1, 28, 28), on the CPU."""
        return features_in_batches(self.classifier.features, images.to(self.device)).cpu()

    def score(self, images: Tensor) -> Scores:
        """Scores of generated images in [-1, 1], shape (N, 1, 28, 28) (quantised first)."""
        features = self.features(quantise(images))
        with torch.inference_mode():
            logits = self.classifier.classify(features.to(self.device)).cpu()
        return Scores(logits.argmax(dim=1), FeatureStats.of(features))

    def frechet_to_test(self, scores: Scores) -> float:
        return frechet_distance(scores.stats, self.test_stats)

    def noise_floor(self, count: int) -> float:
        """Frechet distance of `count` real test images to the other 10,000 - count: what a
        perfect generator scores at this N."""
        head = FeatureStats.of(self.test_features[:count])
        rest = FeatureStats.of(self.test_features[count:])
        return frechet_distance(head, rest)

    def test_accuracy(self) -> float:
        with torch.inference_mode():
            logits = self.classifier.classify(self.test_features.to(self.device)).cpu()
        return float((logits.argmax(dim=1) == self.test_labels).double().mean())


__all__ = ["MnistScorer", "Scores", "quantise"]
