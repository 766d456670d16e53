"""Classifier-free guidance: the one place the two passes' data predictions are combined.

Imports only torch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def guided(cond: Tensor, uncond: Tensor, weight: Tensor) -> Tensor:
    """D = D_u + w (D_c - D_u) per sample, with rows at w = 1 (w = 0) exactly D_c (D_u).

    A sample at w = 1 sampled alone runs the conditional pass only (w = 0: the unconditional), and
    D_u + 1 * (D_c - D_u) rounds differently from D_c: without the exact ends its image would
    depend on whether a guided sample shared its batch.

    Args:
        cond, uncond: the two passes' data predictions, shape (B, ...).
        weight: the guidance weights, broadcastable to cond: (B, 1, ..., 1), cond's dtype.
    Returns:
        the guided data prediction, shape and dtype of cond.
    """
    mixed = uncond + weight * (cond - uncond)
    return torch.where(weight == 1.0, cond, torch.where(weight == 0.0, uncond, mixed))


def guided_halves(denoised: Callable[[Tensor], Tensor], output: Tensor, batch: int, weights: Tensor) -> Tensor:
    """The guided data prediction of one forward over both passes: rows :batch the conditional
    pass, batch: the unconditional one, each turned into D by `denoised`, then combined by `guided`
    with the per-sample `weights` (B,) in the output's dtype."""
    w = weights.to(device=output.device, dtype=output.dtype).reshape(-1, *([1] * (output.dim() - 1)))
    return guided(denoised(output[:batch]), denoised(output[batch:]), w)


__all__ = ["guided", "guided_halves"]
