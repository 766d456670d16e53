"""The counting wrapper, the feature method and the predictor argument of `solvers.sample`."""

from __future__ import annotations

import pytest
import torch

import solvers
from solvers import CountingDenoiser, FeatureDenoiser, InvalidParameterError


class FeatureGMM:
    """The exact GMM denoiser plus a fake 'bottleneck' feature (the per-sample mean over dims)."""

    def __init__(self, inner):
        self.inner = inner
        self.sigma_min, self.sigma_max = inner.sigma_min, inner.sigma_max
        self.sigma_levels, self.evals_per_call = None, 2

    def __call__(self, x, sigma):
        return self.inner(x, sigma)

    def denoise_with_feature(self, x, sigma):
        out = self.inner(x, sigma)
        return out, out.reshape(x.shape[0], 2, -1).mean(-1, keepdim=True)


def test_counting_wrapper_forwards_the_feature_and_counts_it(gmm):
    model = FeatureGMM(gmm)
    assert isinstance(model, FeatureDenoiser)
    counter = CountingDenoiser(model)
    x = torch.randn(3, 8, dtype=torch.float64)
    sigma = torch.full((3,), 2.0, dtype=torch.float64)
    plain = counter(x, sigma)
    with_feature, feature = counter.denoise_with_feature(x, sigma)
    assert torch.equal(plain, with_feature)
    assert feature.shape == (3, 2, 1)
    assert counter.calls == 2
    assert counter.network_evals == 4  # two evaluations per call, as under guidance
    assert counter.has_feature


def test_counting_wrapper_refuses_feature_of_a_plain_denoiser(gmm):
    counter = CountingDenoiser(gmm)
    assert not counter.has_feature
    with pytest.raises(TypeError, match="denoise_with_feature"):
        counter.denoise_with_feature(torch.zeros(1, 8, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
    assert counter.calls == 0


def test_network_evals_follow_evals_per_call(gmm):
    result = solvers.sample(FeatureGMM(gmm), solvers.make_noise([0], (8,), dtype=torch.float64), solver="heun", steps=3)
    assert result.nfe == 6
    assert result.network_evals == 12


def test_a_predictor_is_refused_by_training_free_solvers(gmm):
    with pytest.raises(InvalidParameterError, match="uses no predictor") as err:
        solvers.sample(
            gmm, solvers.make_noise([0], (8,), dtype=torch.float64), solver="euler", steps=3, predictor=object()
        )
    assert err.value.field == "predictor"


def test_gmm_denoiser_is_exact_at_small_sigma(gmm):
    """At sigma -> 0 the exact denoiser returns its input; at huge sigma, the data mean."""
    x = gmm.sample_data(5, seed=3)
    tiny = torch.full((5,), 1e-6, dtype=torch.float64)
    torch.testing.assert_close(gmm(x, tiny), x, rtol=0, atol=1e-9)
    huge = torch.full((5,), 1e6, dtype=torch.float64)
    mean = (gmm.log_weights.exp()[:, None] * gmm.means).sum(0)
    torch.testing.assert_close(gmm(x, huge), mean.expand(5, -1), rtol=0, atol=1e-6)


def test_gmm_denoiser_matches_a_monte_carlo_posterior_mean(gmm):
    """E[x0 | x] by importance weighting exact data samples: agrees with the closed form."""
    data = gmm.sample_data(200_000, seed=11)
    sigma = 0.8
    x = data[:3] + sigma * torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    log_w = -((x[:, None, :] - data[None]) ** 2).sum(-1) / (2 * sigma**2)
    w = torch.softmax(log_w, dim=1)
    monte_carlo = w @ data
    exact = gmm(x, torch.full((3,), sigma, dtype=torch.float64))
    torch.testing.assert_close(exact, monte_carlo, rtol=0, atol=0.05)
