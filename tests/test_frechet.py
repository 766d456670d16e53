"""The Frechet distance against its closed form on Gaussians and against SciPy's sqrtm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg

from bench.frechet import FeatureStats, frechet_distance


def _reference(a: FeatureStats, b: FeatureStats) -> float:
    covmean = linalg.sqrtm(a.cov @ b.cov).real
    diff = a.mean - b.mean
    return float(diff @ diff + np.trace(a.cov + b.cov - 2 * covmean))


def test_identical_sets_are_at_distance_zero() -> None:
    features = np.random.default_rng(0).normal(size=(500, 6))
    stats = FeatureStats.of(features)
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-9)


def test_closed_form_for_isotropic_gaussians() -> None:
    # N(m1, s1^2 I) vs N(m2, s2^2 I): d^2 = |m1 - m2|^2 + D (s1 - s2)^2
    dim = 4
    a = FeatureStats(np.zeros(dim), 4.0 * np.eye(dim), 10)
    b = FeatureStats(np.full(dim, 1.0), 1.0 * np.eye(dim), 10)
    assert frechet_distance(a, b) == pytest.approx(dim * 1.0 + dim * (2.0 - 1.0) ** 2)


def test_matches_scipy_sqrtm_on_random_covariances() -> None:
    rng = np.random.default_rng(1)
    a = FeatureStats.of(rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)))
    b = FeatureStats.of(rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 0.5)
    assert frechet_distance(a, b) == pytest.approx(_reference(a, b), rel=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)


def test_rank_deficient_covariance_stays_finite() -> None:
    rng = np.random.default_rng(2)
    low_rank = rng.normal(size=(50, 2)) @ rng.normal(size=(2, 10))  # rank 2 in 10 dimensions
    value = frechet_distance(FeatureStats.of(low_rank), FeatureStats.of(rng.normal(size=(50, 10))))
    assert np.isfinite(value)
    assert value > 0
