"""A seed's image does not depend on its batch beyond the network's own float arithmetic.

With the mnist network run one row per forward (`one_row_per_forward`, the diffusers UNet only),
every part of ours still sees the whole batch: the noise, the adapter's input scaling and
timesteps, classifier-free guidance, each solver's updates (AMED's per-sample predictor included).
A sample alone and in a batch must then be bit-identical in float32. What remains with the normal
batched forward is the network's batch-size-dependent kernels, amplified by the solver's steps
(measured per solver in bench/results/batch-invariance-solvers, docs/solvers.md#batch-invariance).
"""

from __future__ import annotations

import pytest
import torch

import models
import solvers
from bench.batch_invariance import one_row_per_forward
from solvers.amed import PredictorConfig, new_predictor

SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def mnist() -> models.DiffusionModel:
    return models.class_conditional(models.load("mnist", device="cpu", dtype="float32"))


def _sample(model: models.DiffusionModel, rows: list[int], solver: str) -> torch.Tensor:
    labels = torch.tensor([3, 7, 3])[rows]
    guidance = torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64)[rows]
    denoiser = model.conditioned(labels, guidance)
    noise = solvers.make_noise([SEEDS[i] for i in rows], model.sample_shape)
    spec = solvers.SOLVERS.get(solver)
    options = {}
    if spec.needs_predictor:  # table mode, away from its neutral start so r and c differ per interval
        predictor = new_predictor(PredictorConfig(dc=0.1), seed=0)
        with torch.no_grad():
            for parameter in predictor.parameters():
                parameter.add_(0.1)
        options = {"predictor": predictor, "afs": True}
    steps = max(3, spec.min_steps_of(spec.params()))
    with torch.inference_mode():
        return solvers.sample(denoiser, noise, solver=solver, steps=steps, **options).images


@pytest.mark.parametrize("solver", solvers.SOLVERS.names())
def test_a_sample_alone_and_in_a_batch_are_bit_identical_but_for_the_network(mnist, solver):
    with one_row_per_forward(mnist):
        together = _sample(mnist, [0, 1, 2], solver)
        for row in range(len(SEEDS)):
            alone = _sample(mnist, [row], solver)
            assert torch.equal(alone[0], together[row]), f"{solver}: seed {SEEDS[row]} depends on its batch"
