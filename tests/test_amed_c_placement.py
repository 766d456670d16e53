"""AMED-Plugin on DPM-Solver-2 scales the whole update by c, as the official code does (issue 18,
item 7; docs/amed.md): one interval checked against the formula written out."""

from __future__ import annotations

import pytest
import torch

import solvers
from solvers.amed import IntervalUpdate, PredictorConfig, amed_interval
from solvers.amed.training import new_predictor
from solvers.contract import CountingDenoiser


def _away_from_neutral():
    """A table predictor with r != 1/2 and c != 1, so the two placements of c differ."""
    net = new_predictor(PredictorConfig(dc=0.2), seed=0).double()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return net.eval()


@pytest.mark.parametrize("c_scales", ["update", "direction"])
def test_dpm_solver_2_plugin_places_c(gmm, c_scales):
    predictor = _away_from_neutral()
    x = solvers.make_noise([0, 1, 2], (2, 2, 2), dtype=torch.float64) * 20.0
    sigma, sigma_next = 20.0, 4.0
    result = amed_interval(
        CountingDenoiser(gmm),
        predictor,
        x,
        sigma,
        sigma_next,
        update=IntervalUpdate("dpm_solver_2", c_scales=c_scales),
        history=solvers.amed.History(),
        use_afs=False,
        predictor_grad=False,
    )
    r, c = result.r.reshape(-1, 1, 1, 1), result.c.reshape(-1, 1, 1, 1)
    assert (r - 0.5).abs().min() > 0.01  # the placements differ here
    assert (c - 1).abs().min() > 1e-3
    sigma_s = sigma_next**r * sigma ** (1 - r)
    d = (x - gmm(x, torch.full((3,), sigma, dtype=torch.float64))) / sigma
    x_s = x + (sigma_s - sigma) * d
    d_s = (x_s - gmm(x_s, sigma_s.flatten())) / sigma_s
    h = sigma_next - sigma
    if c_scales == "update":
        expected = x + c * h * ((1 - 0.5 / r) * d + (0.5 / r) * d_s)
    else:
        expected = x + h * ((1 - 0.5 / r) * d + c * (0.5 / r) * d_s)
    torch.testing.assert_close(result.x, expected, rtol=1e-12, atol=1e-12)


def test_sampling_scales_the_whole_update():
    assert IntervalUpdate("dpm_solver_2").c_scales == "update"
    assert (
        IntervalUpdate.of(
            "amed_plugin", solvers.SOLVERS.get("amed_plugin").parse_params({"base": "dpm_solver_2"})
        ).c_scales
        == "update"
    )
