"""Per-row conditioning: what lets one forward hold rows of many requests.

A sample with guidance w needs its conditional pass when w != 0 and its unconditional pass when
w != 1. A step-level batcher puts these passes of many requests, at different sigmas, into one
unguided forward and combines each guided sample's two rows afterwards (models.guidance.guided).
For that, every row carries its own conditioning:

- `PassRows`: one pass's conditioning for n rows, whatever the model needs: class labels, or
  prompt states, pooled vectors and (a guidance-distilled network) the guidance input. Rows of
  different requests select (`take`) and concatenate (`cat`) like tensors.
- `SampleRows`: a request's samples as the model encodes them once: the conditional and the
  unconditional pass's rows (None when no sample needs that pass) and the weights that combine
  them (1: the conditional row alone, 0: the unconditional row alone).

A model gives `sample_rows(...)` (its own arguments: labels, or prompts) and
`rows_denoiser(rows, height, width)`, the unguided denoiser whose row k runs row k's pass. Imports
only torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PassRows:
    """The conditioning of `size` network rows, one pass each.

    Attributes:
        size: the number of rows.
        labels: class labels (size,), int64, or None (a model without labels, or a text model).
        hidden: prompt states (size, L, D), or None.
        pooled: pooled prompt vectors (size, P), or None.
        scale: the guidance input of a guidance-distilled network (size,), float64, or None.
    """

    size: int
    labels: Tensor | None = None
    hidden: Tensor | None = None
    pooled: Tensor | None = None
    scale: Tensor | None = None

    def take(self, index: Tensor) -> PassRows:
        """The rows at `index` (a 1-d int64 tensor), in that order."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, index.to(t.device))

        return PassRows(int(index.shape[0]), pick(self.labels), pick(self.hidden), pick(self.pooled), pick(self.scale))

    @staticmethod
    def cat(parts: Sequence[PassRows]) -> PassRows:
        """The rows of `parts` one after another (parts of one model: the same fields are set)."""
        if len(parts) == 1:
            return parts[0]

        def join(values: list[Tensor | None]) -> Tensor | None:
            if values[0] is None:
                return None
            return torch.cat([v for v in values if v is not None])

        return PassRows(
            sum(p.size for p in parts),
            join([p.labels for p in parts]),
            join([p.hidden for p in parts]),
            join([p.pooled for p in parts]),
            join([p.scale for p in parts]),
        )


@dataclass(frozen=True)
class SampleRows:
    """The conditioning of n samples for step-level batching.

    Attributes:
        cond: the conditional pass's rows (n), or None when no sample needs it (every w is 0).
        uncond: the unconditional pass's rows (n), or None when no sample needs it.
        weights: (n,) float64 on the CPU: D = D_u + w (D_c - D_u); a sample runs the conditional
            row when w != 0 and the unconditional one when w != 1 (a guidance-distilled model's
            samples have weight 1: their guidance is the network's input, `cond.scale`).
    """

    cond: PassRows | None
    uncond: PassRows | None
    weights: Tensor

    @property
    def size(self) -> int:
        return int(self.weights.shape[0])

    def passes(self) -> tuple[Tensor, Tensor]:
        """Boolean masks (n,) of the samples that run the conditional and the unconditional row."""
        w = self.weights
        cond = (w != 0) if self.cond is not None else torch.zeros_like(w, dtype=torch.bool)
        uncond = (w != 1) if self.uncond is not None else torch.zeros_like(w, dtype=torch.bool)
        return cond, uncond


__all__ = ["PassRows", "SampleRows"]
