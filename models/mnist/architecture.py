"""The architectures of the embedded MNIST models, as data: the diffusion UNet's diffusers config,
its DDPM schedule, and the feature classifier.

The UNet is sized for a CPU: 28 -> 14 -> 7 with two downsamplings, no attention at 28x28 or 14x14
(one self-attention block in the 7x7 middle), about 0.9M parameters. Changing anything here makes
a different model: a retrained one ships under a new name (see models/builtin/README.md).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

NUM_CLASSES = 10
NULL_CLASS = 10  # the "no label" class of classifier-free guidance (label dropout at training)
IMAGE_SIZE = 28

UNET_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 48, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
    "add_attention": True,
    "num_class_embeds": NUM_CLASSES + 1,
    "time_embedding_type": "positional",
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
}

# The rectified-flow model (`mnist-flow`): x_t = (1 - t) x0 + t eps, the UNet predicts v = eps - x0
# and takes t * num_train_timesteps as its timestep, diffusers' FlowMatchEulerDiscreteScheduler
# convention (so the scheduler config alone tells a loader how to drive it). No shift: 28x28 pixels.
FLOW_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
}


class MnistClassifier(nn.Module):
    """A small CNN for 28x28 digits: three conv stages (28 -> 14 -> 7 -> 3) and a 128-d
    penultimate feature, the embedding of the in-domain Frechet distance.

    Input: images in [-1, 1], shape (B, 1, 28, 28). Output of `forward`: logits (B, 10).
    """

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(stage(1, 32), stage(32, 64), stage(64, 128))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 3 * 3, self.feature_dim))
        # Not in place: callers keep the feature they pass in (it feeds the Frechet statistics).
        self.classify = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(self.feature_dim, NUM_CLASSES))

    def features(self, images: Tensor) -> Tensor:
        """The penultimate feature (before the ReLU), shape (B, 128)."""
        return self.head(self.body(images))

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(self.features(images))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _probe() -> None:  # pragma: no cover - a manual size check: python -m models.mnist.architecture
    from diffusers.models import UNet2DModel

    unet = UNet2DModel(**UNET_CONFIG)
    print("unet parameters:", count_parameters(unet))
    print("classifier parameters:", count_parameters(MnistClassifier()))
    out = MnistClassifier()(torch.zeros(2, 1, 28, 28))
    print("classifier logits:", tuple(out.shape))


if __name__ == "__main__":
    _probe()
