"""Shared fixtures: the exact Gaussian-mixture model and the registered solvers."""

from __future__ import annotations

import os

import pytest

# No network at test time: hub ids must resolve from the local cache only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import solvers
from models.analytic import GaussianMixtureDenoiser

TRAINING_FREE = [spec.name for spec in solvers.list_solvers() if not spec.needs_predictor]


@pytest.fixture(scope="session")
def gmm() -> GaussianMixtureDenoiser:
    """A smooth 8-dimensional mixture on sigma in [0.002, 80] (samples of shape (B, 2, 2, 2))."""
    return GaussianMixtureDenoiser.smooth(dim=8, components=3, seed=0)


@pytest.fixture(scope="session")
def gmm_small() -> GaussianMixtureDenoiser:
    """A 4-dimensional mixture, cheap enough for the step-by-step counting tests."""
    return GaussianMixtureDenoiser.smooth(dim=4, components=2, seed=1)
