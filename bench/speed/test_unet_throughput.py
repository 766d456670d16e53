"""Throughput of the embedded `mnist` UNet: network evaluations per second at batch 256 (the
issue's goal on CPU: >= 200 img-evals/s), through the adapter (input scaling, timestep lookup,
eps -> D), conditional pass only and with classifier-free guidance (two halves in one forward).

    make bench-unet     # pytest-benchmark JSON in bench/results/unet-throughput-raw.json

extra_info["images"] is the batch; img-evals/s = images * evals_per_call / time.
"""

from __future__ import annotations

import pytest
import torch

import models

BATCH = 256
SETTINGS = {"warmup": True, "warmup_iterations": 1, "min_rounds": 5}


@pytest.fixture(scope="module")
def mnist() -> models.DiffusionModel:
    return models.class_conditional(models.load("mnist"))


@pytest.mark.parametrize("guidance", [1.0, 2.0], ids=["conditional", "guided"])
def test_mnist_unet_throughput(benchmark, mnist: models.DiffusionModel, guidance: float) -> None:
    labels = torch.arange(BATCH) % 10
    denoiser = mnist.conditioned(labels, guidance)
    x = torch.randn(BATCH, *mnist.sample_shape, generator=torch.Generator().manual_seed(0)).to(mnist.device)
    sigma = torch.full((BATCH,), 1.0, device=mnist.device)

    def forward() -> None:
        with torch.inference_mode():
            denoiser(x, sigma)
        if mnist.device.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info.update(
        images=BATCH,
        evals_per_call=denoiser.evals_per_call,
        device=str(mnist.device),
        torch_threads=torch.get_num_threads(),
        fingerprint=mnist.fingerprint,
    )
    benchmark.pedantic(forward, rounds=SETTINGS["min_rounds"], warmup_rounds=SETTINGS["warmup_iterations"])
