"""Step-level batching: the network evaluations of all active requests of one model share forwards.

Each active request runs its solver in its own thread against a `DenoiserProxy`. A proxy call posts
the request's rows (x, per-row sigma, the request's per-row conditioning) to the model's
`StepBatcher` and blocks until they are denoised. The batcher's thread runs ticks: a tick gathers
the pending evaluations, whatever solver, steps, schedule, AFS, guidance, labels or prompts they come from
(rows at different sigmas), runs one forward of at most `max_batch_size` network rows, and hands
each evaluation its rows. Requests join at the next tick and leave when their solver returns.

Network rows: a sample with guidance w needs the conditional pass when w != 0 and the
unconditional one (the null class, the negative or empty prompt) when w != 1; each pass is one
row of an unguided forward, and
D = D_u + w (D_c - D_u) is formed here, in the solver's dtype, by the adapters' own function. So a
guided sample costs two rows and an unguided one one row, whoever shares the tick.

Gathering: after a tick the requests whose rows it served compute their next step and post again;
the next tick waits for every active request to have posted, at most `max_queue_delay_ms` from the
first pending evaluation, so that requests stay in one tick instead of splitting into cohorts.

Selection: evaluations are served in the order they were posted (ties: the older request first),
so nobody starves. While other requests are active, one evaluation takes at most as many rows of a
tick as the largest other pending evaluation (and at least `share_rows`); the rest of it waits for
the next tick, at the front. A large request thus shares the model with small ones in small ticks
(forward time grows with rows on a CPU), and requests of similar size are never split. A request
alone takes at most `solo_rows` rows per tick, so that a newcomer waits at most one such tick for
its first step instead of a whole large evaluation.

Faults stay with the request that causes them: a tick that runs out of memory is re-run in halves
by samples (a single sample fails alone with OUT_OF_MEMORY); a tick that raises anything else is
re-run in halves by request until the failing one runs alone, and that request gets the error.
Evaluations that need the U-Net's bottleneck feature (AMED's predictor) run as their own forward
with the request's bound denoiser. A cancelled request's pending rows leave at the next tick, and
its thread stops at its next proxy call (`RequestGone`).

Conditioning is per row (models.rows): a request's prompts or labels are encoded once when it
joins, into the rows of its conditional and unconditional passes, and a tick concatenates the rows
it holds and binds them with `model.rows_denoiser(rows, height, width)`. So text-to-image requests
mix prompts, negative prompts, guidance (a distilled model's guidance input included), solvers and
steps in one forward like class-conditional ones; only evaluations of one image size (one latent
shape) share a forward: a tick serves the size of its oldest pending evaluation. This module knows
models only through `rows_denoiser` and the Denoiser contract.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import models
import solvers
from models.guidance import guided as combine_guidance
from models.rows import PassRows, SampleRows

from .errors import SampleFailed

log = logging.getLogger("sampler_service.step_batcher")


class RequestGone(Exception):
    """The request was cancelled, expired or the server stopped: its solver thread ends here."""


@dataclass(eq=False)
class Evaluation:
    """One denoiser call of one request: `x` (n, ...) at `sigma` (n,), per-sample conditioning.

    `bound` is set for evaluations that must run alone with the request's own denoiser (the
    bottleneck feature of AMED); the others are merged into shared forwards."""

    owner: object  # the request (its ticket): isolation and cancellation are per owner
    age: float  # when the request arrived: ties in the tick order go to the older
    x: Tensor
    sigma: Tensor
    rows: SampleRows  # per-sample conditioning: each pass's rows and the guidance weights
    group: tuple[int, int]  # (height, width): only evaluations of one size share a forward
    cancelled: Callable[[], bool]
    bound: solvers.Denoiser | None = None
    posted: float = field(default_factory=time.perf_counter)
    taken: int = 0  # samples handed to ticks so far
    finished: int = 0  # samples denoised so far
    out: Tensor | None = None
    feature: Tensor | None = None
    error: BaseException | None = None
    rows_seen: int = 0  # network rows of the ticks this evaluation was part of (for timing)
    ticks: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    _masks: tuple[Tensor, Tensor] | None = None

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    def rows_of(self, start: int, stop: int) -> int:
        """Network rows of samples start..stop (1 or 2 each)."""
        cond, uncond = self.masks
        return int(cond[start:stop].sum()) + int(uncond[start:stop].sum())

    @property
    def masks(self) -> tuple[Tensor, Tensor]:
        """Which samples run the conditional and which the unconditional row (SampleRows.passes)."""
        if self._masks is None:
            self._masks = self.rows.passes()
        return self._masks

    def fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.done.set()


@dataclass(frozen=True)
class Chunk:
    """Samples start..stop of an evaluation, as rows of one tick."""

    evaluation: Evaluation
    start: int
    stop: int

    @property
    def rows(self) -> int:
        e = self.evaluation
        return e.size if e.bound is not None else e.rows_of(self.start, self.stop)


class StepBatcher:
    """The tick loop of one model (its own thread) and the registry of its active requests."""

    def __init__(
        self,
        name: str,
        model: models.Model,
        *,
        max_batch_size: int,
        share_rows: int,
        solo_rows: int,
        gather_seconds: float,
        on_tick: Callable[[int], None] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.max_batch_size = max_batch_size
        self.share_rows = share_rows
        self.solo_rows = solo_rows
        self.gather_seconds = gather_seconds
        self.on_tick = on_tick
        self.lock = threading.Condition()
        self.pending: list[Evaluation] = []
        self.active: set[int] = set()  # ids of the requests whose solver threads are running
        self.stopping = False
        self.ticks = 0
        self.shared_ticks = 0  # forwards that held rows of more than one request
        self.rows = 0
        self.tick_ended = 0.0
        self._bound_labels: tuple[tuple[int, ...] | None, solvers.Denoiser] | None = None
        self.thread = threading.Thread(target=self._loop, name=f"ticks-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            for evaluation in self.pending:
                evaluation.fail(RequestGone("the server is stopping"))
            self.pending.clear()
            self.lock.notify_all()
        self.thread.join(timeout=30)

    def join(self, owner: object) -> None:
        """A request's solver thread starts: ticks wait for its evaluations."""
        with self.lock:
            self.active.add(id(owner))
            self.lock.notify_all()

    def leave(self, owner: object) -> None:
        with self.lock:
            self.active.discard(id(owner))
            self.lock.notify_all()

    def wake(self) -> None:
        """Something changed outside (a request was cancelled): look at the pending rows again."""
        with self.lock:
            self.lock.notify_all()

    def evaluate(self, evaluation: Evaluation) -> Evaluation:
        """Post an evaluation and wait until its rows are denoised.

        Raises:
            RequestGone: the request was cancelled or the server stopped.
            Exception: what the forward raised for this request (after isolation).
        """
        with self.lock:
            if self.stopping:
                raise RequestGone("the server is stopping")
            self.pending.append(evaluation)
            self.lock.notify_all()
        evaluation.done.wait()
        if evaluation.error is not None:
            raise evaluation.error
        return evaluation

    # -- the tick thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.lock:
                chunks = self._next_tick()
                if chunks is None:
                    return
            if chunks:
                try:
                    self._run(chunks)
                except BaseException as error:  # a bug here must fail these requests, not hang them
                    log.exception("tick failed")
                    for chunk in chunks:
                        chunk.evaluation.fail(error)
                self.tick_ended = time.perf_counter()

    def _next_tick(self) -> list[Chunk] | None:
        """Under the lock: wait for work, gather, drop the cancelled, select. None when stopping."""
        while not self.stopping:
            self._drop_cancelled()
            if not self.pending:
                self.lock.wait()
                continue
            # Wait for every active request to post (they are computing their next step), at
            # most gather_seconds from the first pending evaluation or the end of the last tick,
            # whichever is later (a split evaluation stays pending from an earlier tick).
            first = max(min(e.posted for e in self.pending), self.tick_ended)
            while not self.stopping:
                waiting = {id(e.owner) for e in self.pending}
                if self.active <= waiting:
                    break
                remaining = first + self.gather_seconds - time.perf_counter()
                if remaining <= 0:
                    break
                self.lock.wait(remaining)
            self._drop_cancelled()
            if self.pending:
                return self._select()
        return None

    def _drop_cancelled(self) -> None:
        gone = [e for e in self.pending if e.cancelled() or e.error is not None]
        for evaluation in gone:  # cancelled, or failed in an earlier tick with rows still pending
            self.pending.remove(evaluation)
            evaluation.fail(RequestGone("cancelled"))

    def _select(self) -> list[Chunk]:
        """Rows of this tick: evaluations in posting order (older request first on ties); while
        other requests are active, one evaluation takes at most as many rows as the largest other
        pending one, and at least share_rows; alone, at most solo_rows; what does not fit keeps its
        place for the next tick."""
        budget = self.max_batch_size
        shared = len(self.active | {id(e.owner) for e in self.pending}) > 1
        ordered = sorted(self.pending, key=lambda e: (e.posted, e.age))
        group = ordered[0].group  # one image size per forward: the oldest evaluation's
        ordered = [e for e in ordered if e.group == group]
        remaining = {id(e): e.rows_of(e.taken, e.size) for e in ordered}
        chunks: list[Chunk] = []
        for evaluation in ordered:
            if budget <= 0:
                break
            if evaluation.bound is not None:  # runs whole, in its own forward
                rows = evaluation.size * evaluation.bound.evals_per_call
                if rows <= budget or not chunks:
                    chunks.append(Chunk(evaluation, 0, evaluation.size))
                    evaluation.taken = evaluation.size
                    budget -= rows
                continue
            if shared:
                others = [remaining[id(e)] for e in ordered if e.owner is not evaluation.owner]
                cap = min(budget, max([self.share_rows, *others]))
            else:  # alone: bounded, so that a newcomer waits at most one such forward
                cap = min(budget, self.solo_rows)
            start = stop = evaluation.taken
            rows = 0
            while stop < evaluation.size:
                more = evaluation.rows_of(stop, stop + 1)
                if rows + more > cap and (rows > 0 or chunks):
                    break
                rows += more
                stop += 1
            if stop > start:
                chunks.append(Chunk(evaluation, start, stop))
                evaluation.taken = stop
                budget -= rows
        for chunk in chunks:
            if chunk.evaluation.taken >= chunk.evaluation.size and chunk.evaluation in self.pending:
                self.pending.remove(chunk.evaluation)
        return chunks

    def _run(self, chunks: list[Chunk]) -> None:
        """One tick, so that a failure costs only the request that causes it (see the module doc)."""
        merged = [c for c in chunks if c.evaluation.bound is None]
        for chunk in chunks:
            if chunk.evaluation.bound is not None:
                self._isolated([chunk], self._forward_bound)
        if merged:
            self._isolated(merged, self._forward)

    def _isolated(self, chunks: list[Chunk], forward: Callable[[list[Chunk]], None]) -> None:
        try:
            forward(chunks)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            halves = _split_samples(chunks)
            if halves is None:
                chunks[0].evaluation.fail(
                    SampleFailed("out of memory for a single sample on this device", "OUT_OF_MEMORY")
                )
                return
            log.warning("out of memory with %d rows; retrying the tick in two halves", sum(c.rows for c in chunks))
            for half in halves:
                self._isolated(half, forward)
        except Exception as error:  # the model's; isolated to the request that causes it
            groups = _split_owners(chunks)
            if groups is None:
                for chunk in chunks:
                    chunk.evaluation.fail(error)
                return
            log.warning(
                "a tick of %d requests failed (%s); retrying in two halves", _owners(chunks), type(error).__name__
            )
            for group in groups:
                self._isolated(group, forward)

    def _count(self, chunks: list[Chunk], rows: int) -> None:
        self.ticks += 1
        self.shared_ticks += _owners(chunks) > 1
        self.rows += rows
        if self.on_tick is not None:
            self.on_tick(rows)
        for chunk in chunks:
            chunk.evaluation.rows_seen += rows
            chunk.evaluation.ticks += 1

    def _forward_bound(self, chunks: list[Chunk]) -> None:
        evaluation = chunks[0].evaluation
        bound = evaluation.bound
        assert bound is not None  # only bound evaluations come here
        self._count(chunks, evaluation.size * bound.evals_per_call)
        with torch.inference_mode():
            if isinstance(bound, solvers.FeatureDenoiser):
                evaluation.out, evaluation.feature = bound.denoise_with_feature(evaluation.x, evaluation.sigma)
            else:
                evaluation.out = bound(evaluation.x, evaluation.sigma)
        evaluation.finished = evaluation.size
        evaluation.done.set()

    def _denoiser(self, rows: PassRows, group: tuple[int, int]) -> solvers.Denoiser:
        """The unguided denoiser of these rows; for a label-only model the last one is reused while
        the labels stay the same (binding costs about 0.5 ms, 6% of a one-row forward of the mnist
        model on a CPU). Prompt rows are bound every tick: their states differ from tick to tick."""
        height, width = group
        if rows.hidden is not None or rows.scale is not None:
            return self.model.rows_denoiser(rows, height, width)
        key = tuple(rows.labels.tolist()) if rows.labels is not None else None
        if self._bound_labels is None or self._bound_labels[0] != key:
            self._bound_labels = (key, self.model.rows_denoiser(rows, height, width))
        return self._bound_labels[1]

    def _forward(self, chunks: list[Chunk]) -> None:
        """One forward of the chunks' network rows; each evaluation's rows are combined with its guidance."""
        xs: list[Tensor] = []
        sigmas: list[Tensor] = []
        parts: list[PassRows] = []
        layout: list[tuple[Chunk, Tensor, Tensor]] = []  # chunk, conditional mask, unconditional mask
        for chunk in chunks:
            e, a, b = chunk.evaluation, chunk.start, chunk.stop
            x, sigma = e.x[a:b], e.sigma[a:b]
            cond_all, uncond_all = e.masks
            cond, uncond = cond_all[a:b], uncond_all[a:b]
            layout.append((chunk, cond, uncond))
            for mask, rows in ((cond, e.rows.cond), (uncond, e.rows.uncond)):
                if rows is None or not bool(mask.any()):
                    continue
                if bool(mask.all()):  # the common case: no gather, a view
                    xs.append(x)
                    sigmas.append(sigma)
                    whole = torch.arange(a, b)
                    parts.append(rows if (a, b) == (0, rows.size) else rows.take(whole))
                    continue
                index = mask.nonzero().squeeze(1)
                xs.append(x.index_select(0, index.to(x.device)))
                sigmas.append(sigma.index_select(0, index.to(sigma.device)))
                parts.append(rows.take(index + a))
        x_all = torch.cat(xs) if len(xs) > 1 else xs[0]
        self._count(chunks, int(x_all.shape[0]))
        group = chunks[0].evaluation.group
        with torch.inference_mode():
            out = self._denoiser(PassRows.cat(parts), group)(x_all, torch.cat(sigmas) if len(sigmas) > 1 else sigmas[0])
        offset = 0
        for chunk, cond, uncond in layout:
            e, a, b = chunk.evaluation, chunk.start, chunk.stop
            n_cond, n_uncond = int(cond.sum()), int(uncond.sum())
            d_cond = out[offset : offset + n_cond]
            d_uncond = out[offset + n_cond : offset + n_cond + n_uncond]
            offset += n_cond + n_uncond
            if n_cond == b - a and n_uncond == 0 and e.size == b - a:  # one pass, the whole evaluation
                e.out = d_cond
                e.finished = e.size
                e.done.set()
                continue
            if e.out is None:
                e.out = torch.empty_like(e.x)
            block = e.out[a:b]
            both = cond & uncond
            # The adapters' combination (models.guidance), in x's dtype; one pass when w is 1 or 0.
            cond_at = torch.cumsum(cond.long(), 0) - 1
            uncond_at = torch.cumsum(uncond.long(), 0) - 1
            only_cond = (cond & ~uncond).nonzero().squeeze(1)
            only_uncond = (uncond & ~cond).nonzero().squeeze(1)
            if len(only_cond):
                block[only_cond.to(block.device)] = d_cond[cond_at[only_cond].to(d_cond.device)]
            if len(only_uncond):
                block[only_uncond.to(block.device)] = d_uncond[uncond_at[only_uncond].to(d_uncond.device)]
            guided = both.nonzero().squeeze(1)
            if len(guided):
                c = d_cond[cond_at[guided].to(d_cond.device)]
                u = d_uncond[uncond_at[guided].to(d_uncond.device)]
                weights = e.rows.weights[a:b][guided]
                w = weights.to(device=u.device, dtype=u.dtype).reshape(-1, *([1] * (u.dim() - 1)))
                block[guided.to(block.device)] = combine_guidance(c, u, w)
            e.finished += b - a
            if e.finished >= e.size:
                e.done.set()


class DenoiserProxy:
    """A request's denoiser in step mode: each call becomes an `Evaluation` of the model's batcher.

    Conditioning is the request's per-sample rows (models.rows), encoded once; its evaluations are
    denoised in shared ticks of its image size. `bound` is the request's own conditioned denoiser,
    used only for the bottleneck feature. `noise_range` is the denoiser's (sigma_min, sigma_max,
    sigma_levels) at this size (a size-dependent shift moves it).
    """

    def __init__(
        self,
        batcher: StepBatcher,
        owner: object,
        age: float,
        rows: SampleRows,
        group: tuple[int, int],
        noise_range: tuple[float, float, Tensor | None],
        evals_per_call: int,
        cancelled: Callable[[], bool],
        bound: Callable[[], solvers.Denoiser] | None = None,
    ) -> None:
        self.batcher = batcher
        self.owner = owner
        self.age = age
        self.rows = rows
        self.group = group
        self.masks = rows.passes()
        self.cancelled = cancelled
        self._bound_factory = bound
        self._bound: solvers.Denoiser | None = None
        self.sigma_min, self.sigma_max, self.sigma_levels = noise_range
        self.evals_per_call = evals_per_call
        self.rows_seen = 0
        self.ticks = 0

    def _evaluate(self, x: Tensor, sigma: Tensor, bound: solvers.Denoiser | None) -> Evaluation:
        if self.cancelled():
            raise RequestGone("cancelled")
        evaluation = Evaluation(
            self.owner, self.age, x, sigma, self.rows, self.group, self.cancelled, bound=bound, _masks=self.masks
        )
        self.batcher.evaluate(evaluation)
        self.rows_seen += evaluation.rows_seen
        self.ticks += evaluation.ticks
        return evaluation

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        out = self._evaluate(x, sigma, None).out
        assert out is not None  # set by the tick before done
        return out

    def denoise_with_feature(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        if self._bound is None:
            if self._bound_factory is None:
                raise TypeError("this request's denoiser provides no bottleneck feature")
            self._bound = self._bound_factory()
        evaluation = self._evaluate(x, sigma, self._bound)
        assert evaluation.out is not None  # set by the tick before done
        assert evaluation.feature is not None
        return evaluation.out, evaluation.feature


def _owners(chunks: list[Chunk]) -> int:
    return len({id(c.evaluation.owner) for c in chunks})


def _split_samples(chunks: list[Chunk]) -> tuple[list[Chunk], list[Chunk]] | None:
    """Two ticks of about half the samples each, or None for a single sample (or a bound evaluation)."""
    samples = [(c.evaluation, k) for c in chunks for k in range(c.start, c.stop)]
    if len(samples) < 2 or any(c.evaluation.bound is not None for c in chunks):
        return None
    middle = len(samples) // 2

    def regroup(part: list[tuple[Evaluation, int]]) -> list[Chunk]:
        grouped: list[Chunk] = []
        for evaluation, k in part:
            if grouped and grouped[-1].evaluation is evaluation and grouped[-1].stop == k:
                grouped[-1] = Chunk(evaluation, grouped[-1].start, k + 1)
            else:
                grouped.append(Chunk(evaluation, k, k + 1))
        return grouped

    return regroup(samples[:middle]), regroup(samples[middle:])


def _split_owners(chunks: list[Chunk]) -> tuple[list[Chunk], list[Chunk]] | None:
    """Two ticks of about half the requests each, or None for the rows of a single request."""
    order: list[int] = []
    for chunk in chunks:
        if id(chunk.evaluation.owner) not in order:
            order.append(id(chunk.evaluation.owner))
    if len(order) < 2:
        return None
    first = set(order[: len(order) // 2])
    return (
        [c for c in chunks if id(c.evaluation.owner) in first],
        [c for c in chunks if id(c.evaluation.owner) not in first],
    )


__all__ = ["DenoiserProxy", "Evaluation", "RequestGone", "StepBatcher"]
