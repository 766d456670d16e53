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

`amed_plugin`: a base solver (bases.py holds the list) runs on the merged grid
{sigma_0, s_0, sigma_1, s_1, ...}, whose points s_i the predictor chooses per sample at run time.
Each sub-step is the base solver's own step rule (`euler_step`, `dpm_solver_2_step`,
`adams_bashforth_step` with `ipndm_coefficients` / `ipndm_v_coefficients`, `dpmpp_step`), the very
functions the base's loop calls, here given per-sample sigmas and c as their `scale`:
- euler: both sub-steps are Euler steps; the second is x_s + c (sigma_{i+1} - s_i) d_s;
- dpm_solver_2: its own intermediate point is s_i: x_{i+1} = x_i + c h [(1 - 1/(2r)) d_i + d_s/(2r)],
  c on the whole update as in the official code (docs/amed.md says why; `IntervalUpdate.c_scales`);
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
from typing import Literal

import torch
from torch import Tensor

from ..adams import adams_bashforth_step, ipndm_coefficients, ipndm_v_coefficients
from ..contract import CountingDenoiser, Denoiser
from ..dpm_solver import dpm_solver_2_step, dpmpp_step
from ..errors import InvalidParameterError
from ..euler_heun import euler_step
from ..registry import register
from ..stepping import Progress, Sigma, afs_denoised, coefficient, direction
from .bases import BASES, MULTISTEP, PLUGIN_BASES, AMEDParams, AMEDPluginParams
from .predictor import AMEDPredictor, log_interpolate


@dataclass
class IntervalUpdate:
    """Which update an interval uses: `amed`, or a plugin base with its order limit.

    `c_scales` (dpm_solver_2 only): c multiplies the whole update ("update", the official AMED code
    and what sampling uses) or only the intermediate direction's term ("direction"). The two agree
    at r = 1/2; bench amed-c-placement measures both and docs/amed.md says why "update" is kept.
    """

    kind: str
    """"amed", or a name from PLUGIN_BASES."""
    max_order: int = 1
    c_scales: Literal["direction", "update"] = "update"

    def __post_init__(self) -> None:
        if self.kind != "amed" and self.kind not in PLUGIN_BASES:
            raise ValueError(f"update {self.kind!r}: expected amed or one of {', '.join(BASES)}")

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


def _ab_coefficients(kind: str, history: History, sigma_next: Tensor, scale: Tensor | float) -> list[Sigma]:
    """The Adams-Bashforth coefficients of base `kind` from the history's newest sigma to sigma_next,
    per sample, at the order the history allows (its length is capped at the order limit)."""
    if kind == "ipndm":
        return ipndm_coefficients(history.sigmas[-1], sigma_next, len(history.values), scale)
    return ipndm_v_coefficients(history.sigmas, sigma_next, scale)


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
    d_cur = direction(x, denoised, sigma_cur)
    kind, order = update.kind, update.max_order
    # First sub-step, sigma_i -> s_i: the base's own rule (multistep bases with sigma_i in their history).
    if kind in ("ipndm", "ipndm_v"):
        history.push(cur, d_cur, order)
        x_s = adams_bashforth_step(x, history.values, _ab_coefficients(kind, history, s, 1.0))
    elif kind == "dpmpp_2m":
        history.push(cur, denoised, order)
        x_s = dpmpp_step(x, history.values, history.sigmas, s, min(order, len(history.values)))
    else:  # amed, euler, dpm_solver_2: an Euler step to the intermediate point
        x_s = euler_step(x, d_cur, sigma_cur, s)
    denoised_s = denoiser(x_s, (a * s).to(x.dtype))
    d_s = direction(x_s, denoised_s, s)
    # Second sub-step, s_i -> sigma_{i+1}, with c scaling the model terms.
    if kind == "amed":  # the mean-value direction: d_s over the whole interval
        x_next = euler_step(x, d_s, sigma_cur, sigma_next, scale=c)
    elif kind == "euler":
        x_next = euler_step(x_s, d_s, s, sigma_next, scale=c)
    elif kind == "dpm_solver_2" and update.c_scales == "update":  # the official code: c on the whole update
        x_next = x + coefficient(c, x) * (dpm_solver_2_step(x, d_cur, d_s, sigma_cur, sigma_next, r) - x)
    elif kind == "dpm_solver_2":  # s_i is DPM-Solver-2's own intermediate point, at its r
        x_next = dpm_solver_2_step(x, d_cur, d_s, sigma_cur, sigma_next, r, scale=c)
    elif kind in ("ipndm", "ipndm_v"):
        history.push(s, d_s, order)
        x_next = adams_bashforth_step(x_s, history.values, _ab_coefficients(kind, history, nxt, c))
    else:
        history.push(s, denoised_s, order)
        x_next = dpmpp_step(x_s, history.values, history.sigmas, nxt, min(order, len(history.values)), scale=c)
    return IntervalResult(x_next, denoised_s, history, r, c, a)


def run_intervals(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    update: IntervalUpdate,
    afs: bool,
    progress: Progress,
    predictor: AMEDPredictor,
) -> Tensor:
    """Run `update` over every interval of `sigmas` from x (AFS on the first one if asked), reporting each
    step to `progress`: the loop of sample_amed and of AMED-Plugin."""
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
    return run_intervals(
        denoiser, x, sigmas, update=IntervalUpdate("amed"), afs=afs, progress=progress, predictor=predictor
    )


@register(
    "amed_plugin",
    description=f"AMED-Plugin: a base solver ({', '.join(BASES)}) on the grid merged with "
    "learned intermediate times; a trained predictor reads the U-Net bottleneck; 2 calls per step",
    params=AMEDPluginParams,
    evals_per_step=2,
    order=lambda p: PLUGIN_BASES[p.base].order,
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
    return run_intervals(denoiser, x, sigmas, update=update, afs=afs, progress=progress, predictor=predictor)


__all__ = [
    "History",
    "IntervalResult",
    "IntervalUpdate",
    "amed_interval",
    "run_intervals",
    "sample_amed",
    "sample_amed_plugin",
]
