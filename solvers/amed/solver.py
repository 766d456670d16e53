"""AMED-Solver and AMED-Plugin (Zhou et al., "Fast ODE-based Sampling for Diffusion Models in
Around 5 Steps", CVPR 2024), in the EDM sigma parameterisation.

Per interval [sigma_i -> sigma_{i+1}] (h = sigma_{i+1} - sigma_i), both spend two evaluations:

1. D_i at (x_i, sigma_i) through `denoise_with_feature` (the predictor's input), or the AFS
   stand-in d_0 = x_0 / sqrt(1 + sigma_0^2) with a zero feature on the first interval;
2. the predictor gives r, c, a (per sample); s_i = sigma_{i+1}^r sigma_i^(1 - r);
3. a first sub-step from sigma_i to s_i gives x_s;
4. D_s = D(x_s, a s_i), and d_s = (x_s - D_s) / s_i (a changes only the sigma the network sees);
5. a second sub-step to sigma_{i+1}, with c scaling its model terms.

`amed`: x_s = x_i + (s_i - sigma_i) d_i, x_{i+1} = x_i + c h d_s (the mean-value direction).
With r = 1/2 and c = a = 1 this is `dpm_solver_2`.

`amed_plugin`: a base solver runs on the merged grid {sigma_0, s_0, sigma_1, s_1, ...}:
- euler: both sub-steps are Euler steps; the second is x_s + c (sigma_{i+1} - s_i) d_s;
- dpm_solver_2: its own intermediate point is s_i: x_{i+1} = x_i + h [(1 - 1/(2r)) d_i + c/(2r) d_s];
- ipndm: Adams-Bashforth with the fixed equal-step weights of order min(max_order, history) on
  every merged-grid step, the intermediate directions kept in the history;
- ipndm_v: the same with variable-step weights (the integrals of the Lagrange basis through the
  history's own sigmas, per sample): what `ipndm_v` is to `ipndm`. Not in the paper; the merged
  grid is far from equal-step, which the fixed weights of order 3-4 do not survive on mnist;
- dpmpp_2m: DPM-Solver++ multistep (data predictions, orders 1-3 by `max_order`) on the merged grid.

NFE = 2 S - AFS for every variant. The interval function `amed_interval` is what sampling and the
data-free training loop (training.py) both call, so what is trained is what is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
import pydantic
import torch
from torch import Tensor

from ..adams import AB_WEIGHTS
from ..contract import CountingDenoiser, Denoiser
from ..errors import InvalidParameterError
from ..registry import Params, register
from ..stepping import Progress, afs_denoised
from .predictor import AMEDPredictor, log_interpolate

# Gauss-Legendre on [-1, 1] with 4 points: exact for the Lagrange basis of up to 4 nodes.
_GL_NODES, _GL_WEIGHTS = (tuple(float(v) for v in a) for a in np.polynomial.legendre.leggauss(4))
BASES = ("euler", "dpm_solver_2", "ipndm", "ipndm_v", "dpmpp_2m")
MAX_ORDER = {"euler": 1, "dpm_solver_2": 2, "ipndm": 4, "ipndm_v": 4, "dpmpp_2m": 3}
MULTISTEP = ("ipndm", "ipndm_v", "dpmpp_2m")


class AMEDParams(Params):
    """AMED-Solver has no free parameters: r, c (and a) come from the trained predictor."""


class AMEDPluginParams(Params):
    base: Literal["euler", "dpm_solver_2", "ipndm", "ipndm_v", "dpmpp_2m"] = "ipndm"
    """The solver run on the merged grid."""
    max_order: Annotated[int, pydantic.Field(ge=1, le=4)] | None = None
    """Multistep order limit: ipndm and ipndm_v 1-4 (default 4), dpmpp_2m 1-3 (default 2); none for
    the others."""

    def order_limit(self) -> int:
        if self.max_order is None:
            return {"ipndm": 4, "ipndm_v": 4, "dpmpp_2m": 2}.get(self.base, 1)
        return self.max_order

    @pydantic.model_validator(mode="after")
    def _check_order(self) -> AMEDPluginParams:
        if self.max_order is not None:
            limit = MAX_ORDER[self.base] if self.base in MULTISTEP else None
            if limit is None:
                raise ValueError(f"max_order only with a multistep base ({', '.join(MULTISTEP)}), not {self.base}")
            if self.max_order > limit:
                raise ValueError(f"max_order in 1..{limit} for base {self.base}")
        return self


@dataclass
class IntervalUpdate:
    """Which update an interval uses: `amed`, or a plugin base with its order limit.

    `c_scales` (dpm_solver_2 only): c multiplies the intermediate direction's term ("direction",
    what sampling uses) or the whole update ("update", the official AMED code). The two agree at
    r = 1/2; docs/amed.md says why "direction" is kept (bench amed-c-placement measures both).
    """

    kind: Literal["amed", "euler", "dpm_solver_2", "ipndm", "ipndm_v", "dpmpp_2m"]
    max_order: int = 1
    c_scales: Literal["direction", "update"] = "direction"

    @property
    def multistep(self) -> bool:
        return self.kind in MULTISTEP

    @classmethod
    def of(cls, solver: str, params: AMEDParams | AMEDPluginParams) -> IntervalUpdate:
        if isinstance(params, AMEDPluginParams):
            return cls(params.base, params.order_limit())
        return cls("amed")


@dataclass
class History:
    """Multistep memory across the merged grid: per node its sigma (B,) and its direction
    (ipndm, ipndm_v) or data prediction (dpmpp_2m), newest last."""

    sigmas: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)

    def push(self, sigma: Tensor, value: Tensor, keep: int) -> None:
        self.sigmas = [*self.sigmas, sigma][-keep:]
        self.values = [*self.values, value][-keep:]

    def detached(self) -> History:
        return History([s.detach() for s in self.sigmas], [v.detach() for v in self.values])


def _column(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) in like's dtype, for broadcasting against a state."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _ab_step(x: Tensor, t_from: Tensor, t_to: Tensor, history: History, order: int, scale: Tensor | float) -> Tensor:
    """x + scale (t_to - t_from) sum_j w_j d_{k-j} with iPNDM's equal-step weights."""
    k = min(order, len(history.values))
    weights = AB_WEIGHTS[k - 1]
    combined = sum(w * d for w, d in zip(weights, reversed(history.values[-k:]), strict=False))
    return x + scale * _column(t_to - t_from, x) * combined


def _lagrange_ab_step(
    x: Tensor, t_from: Tensor, t_to: Tensor, history: History, order: int, scale: Tensor | float
) -> Tensor:
    """x + scale sum_j w_j d_j with w_j = int_{t_from}^{t_to} l_j(t) dt, l_j the Lagrange basis
    through the last k history sigmas (per sample; t_from is the newest), by 4-point Gauss-Legendre."""
    k = min(order, len(history.values))
    nodes = history.sigmas[-k:]
    half, mid = (t_to - t_from) / 2, (t_to + t_from) / 2
    points = mid[:, None] + half[:, None] * half.new_tensor(_GL_NODES)  # (B, 4)
    weights = half.new_tensor(_GL_WEIGHTS)
    combined = torch.zeros_like(x)
    for j in range(k):
        basis = torch.ones_like(points)
        for m in range(k):
            if m != j:
                basis = basis * (points - nodes[m][:, None]) / (nodes[j] - nodes[m])[:, None]
        combined = combined + _column(half * (basis * weights).sum(1), x) * history.values[-k + j]
    return x + scale * combined


def _dpmpp_step(x: Tensor, t_from: Tensor, t_to: Tensor, history: History, order: int, scale: Tensor | float) -> Tensor:
    """DPM-Solver++ multistep from t_from to t_to (per-sample sigmas) with the data predictions in
    `history` (its newest node is t_from); `scale` multiplies the model terms."""
    lam = [-torch.log(s) for s in history.sigmas]
    h = torch.log(t_from) - torch.log(t_to)
    phi_1 = torch.expm1(-h)
    k = min(order, len(history.values))
    d0 = history.values[-1]
    if k == 1:
        model = -_column(phi_1, x) * d0
    elif k == 2:
        r = (lam[-1] - lam[-2]) / h
        model = -_column(phi_1, x) * (d0 + _column(0.5 / r, x) * (d0 - history.values[-2]))
    else:
        r0, r1 = (lam[-1] - lam[-2]) / h, (lam[-2] - lam[-3]) / h
        d1_0 = (d0 - history.values[-2]) / _column(r0, x)
        d1_1 = (history.values[-2] - history.values[-3]) / _column(r1, x)
        d1 = d1_0 + _column(r0 / (r0 + r1), x) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / _column(r0 + r1, x)
        phi_2 = phi_1 / h + 1.0
        phi_3 = phi_2 / h - 0.5
        model = -_column(phi_1, x) * d0 + _column(phi_2, x) * d1 - _column(2.0 * phi_3, x) * d2
    return _column(t_to / t_from, x) * x + scale * model


@dataclass(frozen=True)
class IntervalResult:
    x: Tensor
    denoised: Tensor
    history: History
    r: Tensor
    c: Tensor
    a: Tensor


def amed_interval(
    denoiser: CountingDenoiser,
    predictor: AMEDPredictor,
    x: Tensor,
    sigma_cur: float,
    sigma_next: float,
    *,
    update: IntervalUpdate,
    history: History,
    use_afs: bool,
    predictor_grad: bool = True,
) -> IntervalResult:
    """One AMED interval (see the module docstring): two evaluations, or one with AFS.

    Args:
        x: the state at sigma_cur, shape (B, ...).
        history: the multistep memory (empty for single-step variants).
        predictor_grad: whether the predictor's outputs carry gradients (training); sampling
            passes False, so results never drag the predictor's autograd graph along.
    Returns:
        the state at sigma_next, the last data prediction, the updated history and the predictions.
    """
    batch = x.shape[0]
    config = predictor.config
    cur = torch.full((batch,), sigma_cur, dtype=torch.float64, device=x.device)
    nxt = torch.full((batch,), sigma_next, dtype=torch.float64, device=x.device)
    if use_afs:
        denoised = afs_denoised(x, sigma_cur)
        shape = config.feature_shape
        feature = None if shape is None else x.new_zeros(batch, *shape)
    elif config.table_mode:
        denoised, feature = denoiser(x, cur.to(x.dtype)), None
    else:
        if not denoiser.has_feature:
            raise InvalidParameterError(
                "predictor", "reads the bottleneck feature", "a table-mode predictor: this model gives no feature"
            )
        denoised, feature = denoiser.denoise_with_feature(x, cur.to(x.dtype))
    with torch.set_grad_enabled(predictor_grad and torch.is_grad_enabled()):
        prediction = predictor(feature.detach() if feature is not None else None, cur, nxt)
    r, c, a = prediction.r, prediction.c, prediction.a
    s = log_interpolate(sigma_cur, sigma_next, r)
    d_cur = (x - denoised) / sigma_cur
    keep = update.max_order
    ab_step = _lagrange_ab_step if update.kind == "ipndm_v" else _ab_step
    if update.kind in ("ipndm", "ipndm_v"):
        history.push(cur, d_cur, keep)
        x_s = ab_step(x, cur, s, history, update.max_order, 1.0)
    elif update.kind == "dpmpp_2m":
        history.push(cur, denoised, keep)
        x_s = _dpmpp_step(x, cur, s, history, update.max_order, 1.0)
    else:
        x_s = x + _column(s - sigma_cur, x) * d_cur
    denoised_s = denoiser(x_s, (a * s).to(x.dtype))
    d_s = (x_s - denoised_s) / _column(s, x)
    c_col = _column(c, x)
    h = sigma_next - sigma_cur
    if update.kind == "amed":
        x_next = x + c_col * h * d_s
    elif update.kind == "euler":
        x_next = x_s + c_col * _column(nxt - s, x) * d_s
    elif update.kind == "dpm_solver_2":
        inv = _column(0.5 / r, x)
        if update.c_scales == "update":
            x_next = x + c_col * h * ((1.0 - inv) * d_cur + inv * d_s)
        else:
            x_next = x + h * ((1.0 - inv) * d_cur + c_col * inv * d_s)
    elif update.kind in ("ipndm", "ipndm_v"):
        history.push(s, d_s, keep)
        x_next = ab_step(x_s, s, nxt, history, update.max_order, c_col)
    else:
        history.push(s, denoised_s, keep)
        x_next = _dpmpp_step(x_s, s, nxt, history, update.max_order, c_col)
    return IntervalResult(x_next, denoised_s, history, r, c, a)


def _run(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    update: IntervalUpdate,
    afs: bool,
    progress: Progress,
    predictor: AMEDPredictor,
) -> Tensor:
    counter = denoiser if isinstance(denoiser, CountingDenoiser) else CountingDenoiser(denoiser)
    s = sigmas.tolist()
    history = History()
    for i in range(len(s) - 1):
        result = amed_interval(
            counter,
            predictor,
            x,
            s[i],
            s[i + 1],
            update=update,
            history=history,
            use_afs=afs and i == 0,
            predictor_grad=False,
        )
        x, history = result.x, result.history
        progress(i, s[i + 1], result.denoised, x)
    return x


@register(
    "amed",
    description="AMED-Solver: per interval one Euler step to a learned intermediate time s_i, whose direction "
    "(scaled by a learned c) makes the step; a trained predictor reads the U-Net bottleneck; 2 calls per step",
    params=AMEDParams,
    evals_per_step=2,
    order=2,
    needs_predictor=True,
)
def sample_amed(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    params: AMEDParams,
    afs: bool,
    progress: Progress,
    predictor: AMEDPredictor,
) -> Tensor:
    """AMED-Solver.

    Args:
        x: noise scaled to sigmas[0], shape (B, ...).
        sigmas: decreasing, float64, shape (S + 1,), last entry > 0.
        predictor: the trained AMEDPredictor for this model, NFE, schedule and guidance.
    Returns:
        the state at sigmas[-1], shape and dtype of x.
    """
    return _run(denoiser, x, sigmas, update=IntervalUpdate("amed"), afs=afs, progress=progress, predictor=predictor)


@register(
    "amed_plugin",
    description="AMED-Plugin: a base solver (euler, dpm_solver_2, ipndm, ipndm_v, dpmpp_2m) on the grid merged with "
    "learned intermediate times; a trained predictor reads the U-Net bottleneck; 2 calls per step",
    params=AMEDPluginParams,
    evals_per_step=2,
    order=lambda p: {"euler": 1}.get(p.base, 2),
    needs_predictor=True,
)
def sample_amed_plugin(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    params: AMEDPluginParams,
    afs: bool,
    progress: Progress,
    predictor: AMEDPredictor,
) -> Tensor:
    """AMED-Plugin on `params.base` (shapes as in sample_amed)."""
    update = IntervalUpdate(params.base, params.order_limit())
    return _run(denoiser, x, sigmas, update=update, afs=afs, progress=progress, predictor=predictor)


__all__ = [
    "BASES",
    "MULTISTEP",
    "AMEDParams",
    "AMEDPluginParams",
    "History",
    "IntervalResult",
    "IntervalUpdate",
    "amed_interval",
    "sample_amed",
    "sample_amed_plugin",
]
