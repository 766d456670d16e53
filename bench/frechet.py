"""The Frechet distance between Gaussians fitted to two feature sets (the FID formula; which
features go in is the caller's choice: the project's MNIST classifier here, Inception for FID).

    d^2 = |mu_1 - mu_2|^2 + tr(C_1 + C_2 - 2 (C_1^1/2 C_2 C_1^1/2)^1/2)

The matrix square root goes through symmetric eigendecompositions in float64: C_1^1/2 from
eigh(C_1), then the eigenvalues of the symmetric PSD product C_1^1/2 C_2 C_1^1/2, whose square
roots sum to the trace term. That never produces the complex or NaN results a general sqrtm
gives on nearly singular covariances, and negative round-off eigenvalues are clipped to zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class FeatureStats:
    """Mean (D,) and covariance (D, D) of N feature vectors, float64 NumPy."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @classmethod
    def of(cls, features: Tensor | np.ndarray) -> FeatureStats:
        """Statistics of features (N, D), N >= 2 (unbiased covariance)."""
        values = (
            features.detach().cpu().double().numpy()
            if isinstance(features, Tensor)
            else np.asarray(features, np.float64)
        )
        if values.ndim != 2 or values.shape[0] < 2:
            raise ValueError(f"features must have shape (N >= 2, D), got {values.shape}")
        return cls(values.mean(axis=0), np.cov(values, rowvar=False), values.shape[0])


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """The squared Frechet distance d^2 (what FID reports), >= 0."""
    root = _sqrt_psd(a.cov)
    product = root @ b.cov @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    diff = a.mean - b.mean
    value = float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def features_in_batches(function: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 1000) -> Tensor:
    """function(images[i:i+batch]) concatenated, under inference mode."""
    with torch.inference_mode():
        return torch.cat([function(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])


__all__ = ["FeatureStats", "features_in_batches", "frechet_distance"]
