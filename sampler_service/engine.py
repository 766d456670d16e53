"""Batching and the sampling loop, in one of two modes (`batching.mode`).

"step" (step_batcher.py): every admitted request runs its solver at once, in its own thread,
against a denoiser proxy; the model's tick loop batches the network evaluations of all active
requests, whatever their solver, steps, schedule, guidance, labels or prompts (a request's prompts
are encoded once, on its own thread, into per-row conditioning; requests of one image size share
forwards). A text model's request also encodes its init image and decodes its latents there.

"request": request-level dynamic batching: admitted jobs wait in a per-model queue;
a dispatcher merges jobs with equal merge keys into batches of at most `max_batch_size` network
rows, waiting at most `max_queue_delay_ms` for company (counted from the first job's arrival or the
end of the previous batch, whichever is later), and runs each batch on the model's worker thread
(one per model, so the event loop never runs solver or network work). With adaptive delay the wait
ends early once the expected company is here: as many requests as the previous batch held plus
those that queued while it ran. Clients that send their next request when a result arrives thus
ride in full batches without waiting out the delay; a lone request under no load starts at once;
a client that stops costs the next batch one wait of at most the delay.

Each admitted job has a `Ticket`: the worker thread posts progress, results and errors to it
through the event loop (`call_soon_threadsafe`), where they only update state and set an event.
Progress is coalesced to the latest step, so a slow stream reader never blocks a batch; results
are kept until read (bounded by the request's sample count).

Cancellation: a ticket cancelled before its batch starts is dropped from the queue; a batch whose
tickets are all cancelled stops at its next step; rows of a cancelled ticket inside a running
batch finish with it and are discarded. The admission slot is released at once either way.

Failures stay with the request that causes them (`Engine._run_batch`): a batch that raises is
re-run in halves until the failing request runs alone, out-of-memory splits by samples, and
non-finite output is checked per request; everyone else in the batch gets their samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from google.rpc import error_details_pb2

import models
import solvers
from solvers import StepInfo

from .errors import Internal, QueueFull, SampleFailed, ServiceError, from_domain
from .gen.sampler.v1 import sampler_pb2 as pb
from .imaging import encode, preview
from .jobs import Job, ServedModel, conditioning, init_latents, text_batch
from .settings import Settings
from .step_batcher import DenoiserProxy, RequestGone, StepBatcher

log = logging.getLogger("sampler_service.engine")


@dataclass(eq=False)
class Ticket:
    """An admitted job's state, shared by its RPC coroutine and the batch that runs it."""

    job: Job
    loop: asyncio.AbstractEventLoop
    arrived: float = field(default_factory=time.perf_counter)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    progress: pb.Progress | None = None
    progress_serial: int = 0
    preview: pb.Progress | None = None  # the latest progress with previews, kept until sent
    preview_serial: int = 0
    results: list[pb.SampleResult] = field(default_factory=list)
    delivered: int = 0
    error: ServiceError | None = None
    cancelled: bool = False
    scheduled: int = 0  # samples handed to batches so far
    released: bool = False
    wants_progress: bool = True  # False for unary calls: no per-step wake-ups of the event loop

    @property
    def finished(self) -> bool:
        return self.error is not None or self.delivered + len(self.results) >= self.job.num_samples

    # -- called on the event loop (through post) --------------------------------------------
    def _set_progress(self, progress: pb.Progress) -> None:
        self.progress = progress
        self.progress_serial += 1
        if progress.previews:
            self.preview = progress
            self.preview_serial = self.progress_serial
        self.changed.set()

    def _add_results(self, results: list[pb.SampleResult]) -> None:
        self.results.extend(results)
        self.changed.set()

    def _fail(self, error: ServiceError) -> None:
        if self.error is None:
            self.error = error
        self.changed.set()

    # -- called from the worker thread ------------------------------------------------------
    def post(self, action: Callable[..., None], *args: object) -> None:
        self.loop.call_soon_threadsafe(action, *args)

    async def events(self) -> AsyncIterator[pb.Progress | pb.SampleResult]:
        """Progress (coalesced) and results in index order until the job is done.

        Raises:
            ServiceError: the job failed.
        """
        sent_serial = sent_preview = 0
        pending: dict[int, pb.SampleResult] = {}
        next_index = 0
        while True:
            await self.changed.wait()
            self.changed.clear()
            if self.error is not None:
                raise self.error
            # Coalesced: only the latest step is sent, but a preview is never skipped over.
            if self.preview is not None and self.preview_serial != sent_preview:
                sent_preview = self.preview_serial
                if self.preview_serial == self.progress_serial:
                    sent_serial = self.progress_serial
                yield self.preview
            if self.progress is not None and self.progress_serial != sent_serial:
                sent_serial = self.progress_serial
                yield self.progress
            for result in self.results:
                pending[result.index] = result
            self.delivered += len(self.results)
            self.results = []
            while next_index in pending:
                yield pending.pop(next_index)
                next_index += 1
            if next_index >= self.job.num_samples:
                return


@dataclass(frozen=True)
class BatchItem:
    """Samples start..stop of a ticket's job, as rows of one batch."""

    ticket: Ticket
    start: int
    stop: int


class Engine:
    """Admission, batching and execution for all served models."""

    def __init__(self, settings: Settings, served: dict[str, ServedModel]) -> None:
        self.settings = settings
        self.served = served
        self.admitted = 0
        self.queues: dict[str, deque[Ticket]] = {name: deque() for name in served}
        self.wakeups: dict[str, asyncio.Event] = {}
        self.executors = {name: ThreadPoolExecutor(1, thread_name_prefix=f"model-{name}") for name in served}
        self.dispatchers: list[asyncio.Task[None]] = []
        self.batches_run = 0
        self.last_batch_requests = dict.fromkeys(served, 0)
        # Closed-loop clients send their next request when a result arrives, so after a batch the
        # dispatcher expects the requests it held plus those that queued while it ran: (key, count).
        self.expected: dict[str, tuple[object, int] | None] = dict.fromkeys(served)
        self.free_since = dict.fromkeys(served, 0.0)  # when the worker finished its last batch
        self.sampled_at = dict.fromkeys(served, 0.0)  # when its sampling ended, before results were posted
        self.batches_stopped = 0  # stopped early because every request in them was gone
        self.on_batch: Callable[[int, int], None] | None = None  # (rows, max rows) for metrics
        self.on_failure: Callable[[str], None] | None = None  # (ErrorInfo reason) of a failed request, for metrics
        self.batchers: dict[str, StepBatcher] = {}  # step mode: the models whose evaluations are batched
        if settings.batching.mode == "step":
            for name, entry in served.items():
                self.batchers[name] = StepBatcher(
                    name,
                    entry.model,
                    max_batch_size=settings.batching.max_batch_size,
                    share_rows=settings.batching.share_rows,
                    solo_rows=settings.batching.solo_rows,
                    gather_seconds=settings.batching.max_queue_delay_ms / 1000.0,
                    on_tick=self._count_tick,
                )

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()
        for name in self.served:
            self.wakeups[name] = asyncio.Event()
            if name not in self.batchers:
                self.dispatchers.append(asyncio.create_task(self._dispatch(name), name=f"dispatch-{name}"))

    def _count_tick(self, rows: int) -> None:
        self.batches_run += 1
        if self.on_batch is not None:
            self.on_batch(rows, self.settings.batching.max_batch_size)

    async def stop(self) -> None:
        for task in self.dispatchers:
            task.cancel()
        for task in self.dispatchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for batcher in self.batchers.values():
            await asyncio.to_thread(batcher.stop)
        for executor in self.executors.values():
            executor.shutdown(wait=True, cancel_futures=True)

    def submit(self, job: Job, *, progress: bool = True) -> Ticket:
        """Admit a job; `progress=False` when nobody reads its progress events (unary calls).

        Raises:
            QueueFull: max_queued_requests jobs are already admitted.
        """
        limits = self.settings.limits
        if self.admitted >= limits.max_queued_requests:
            raise QueueFull(self.admitted, limits.retry_after_seconds)
        ticket = Ticket(job, asyncio.get_running_loop(), wants_progress=progress)
        self.admitted += 1
        batcher = self.batchers.get(job.served.name)
        if batcher is not None:
            batcher.join(ticket)  # the next tick waits for its first evaluation
            threading.Thread(
                target=self._run_request, args=(ticket, batcher), name=f"request-{job.request_id[:16]}", daemon=True
            ).start()
            return ticket
        self.queues[job.served.name].append(ticket)
        self.wakeups[job.served.name].set()
        return ticket

    def release(self, ticket: Ticket, *, cancelled: bool = False) -> None:
        """Free the ticket's admission slot (once); a cancelled ticket's pending rows are dropped."""
        if cancelled:
            ticket.cancelled = True
        if not ticket.released:
            ticket.released = True
            self.admitted -= 1
        if cancelled and ticket.job.served.name in self.batchers:
            self.batchers[ticket.job.served.name].wake()  # its pending rows leave now

    async def _dispatch(self, name: str) -> None:
        queue, wakeup = self.queues[name], self.wakeups[name]
        batching = self.settings.batching
        delay = batching.max_queue_delay_ms / 1000.0
        loop = asyncio.get_running_loop()
        while True:
            while not queue:
                wakeup.clear()
                await wakeup.wait()
            self._drop_cancelled(queue)
            if not queue:
                continue
            first = queue[0]
            # Wait for company until the batch is full or the delay is spent, counted from when the
            # first job arrived or the worker became free, whichever is later. With adaptive delay
            # the wait also ends once the expected company is here (see _expected_requests): a
            # lone request under no load starts at once, and clients that take turns merge again.
            expected = self._expected_requests(name, first) if batching.adaptive_delay else None
            start = max(first.arrived, self.free_since[name])
            while self._rows_ready(queue, first) < batching.max_batch_size:
                if expected is not None and self._requests_ready(queue, first) >= expected:
                    break
                remaining = start + delay - time.perf_counter()
                if remaining <= 0:
                    break
                wakeup.clear()
                try:
                    await asyncio.wait_for(wakeup.wait(), remaining)
                except TimeoutError:
                    break
            items = self._take_batch(queue, first)
            if not items:
                continue
            self.last_batch_requests[name] = len({id(item.ticket) for item in items})
            try:
                await loop.run_in_executor(self.executors[name], self._run_batch, items)
            except Exception:  # a bug in the isolation itself must not kill the dispatcher
                log.exception("batch failed")
                for ticket in {id(item.ticket): item.ticket for item in items}.values():
                    ticket.post(ticket._fail, Internal(ticket.job.request_id))
            self.free_since[name] = time.perf_counter()
            # company for the next batch: this batch's requests (their clients may send the next
            # one as soon as a result is out, before this coroutine resumes: those are not counted
            # twice) plus the requests that queued while it sampled
            held = len({id(item.ticket) for item in items})
            sampled = self.sampled_at[name]
            waited = self._requests_ready(queue, first, arrived_before=sampled)
            self.expected[name] = (first.job.key, held + waited)

    @staticmethod
    def _drop_cancelled(queue: deque[Ticket]) -> None:
        for ticket in [t for t in queue if t.cancelled]:
            queue.remove(ticket)

    def _expected_requests(self, name: str, first: Ticket) -> int | None:
        """How many requests like `first` the next batch can expect: those the last batch of the
        same merge key held plus those that queued while it ran; 1 after a lone batch of another
        key; None (wait the whole delay) when nothing is known."""
        known = self.expected[name]
        if known is not None and known[0] == first.job.key:
            return known[1]
        return 1 if self.last_batch_requests[name] <= 1 else None

    @staticmethod
    def _requests_ready(queue: deque[Ticket], first: Ticket, arrived_before: float = float("inf")) -> int:
        return sum(1 for t in queue if t.job.key == first.job.key and not t.cancelled and t.arrived < arrived_before)

    @staticmethod
    def _rows_ready(queue: deque[Ticket], first: Ticket) -> int:
        return sum(
            (t.job.num_samples - t.scheduled) * t.job.evals_per_call
            for t in queue
            if t.job.key == first.job.key and not t.cancelled
        )

    def _take_batch(self, queue: deque[Ticket], first: Ticket) -> list[BatchItem]:
        capacity = self.settings.batching.max_batch_size
        items: list[BatchItem] = []
        for ticket in list(queue):
            if ticket.cancelled:
                queue.remove(ticket)
                continue
            if ticket.job.key != first.job.key:
                continue
            per_sample = ticket.job.evals_per_call
            room = capacity // per_sample
            if room == 0:
                break
            take = min(room, ticket.job.num_samples - ticket.scheduled)
            items.append(BatchItem(ticket, ticket.scheduled, ticket.scheduled + take))
            ticket.scheduled += take
            capacity -= take * per_sample
            if ticket.scheduled >= ticket.job.num_samples:
                queue.remove(ticket)
            if capacity < 1:
                break
        if not items and queue:  # a single sample wider than the batch (guided, max_batch_size 1)
            ticket = queue[0]
            items.append(BatchItem(ticket, ticket.scheduled, ticket.scheduled + 1))
            ticket.scheduled += 1
            if ticket.scheduled >= ticket.job.num_samples:
                queue.popleft()
        return items

    # -- the worker thread ------------------------------------------------------------------
    def _run_batch(self, items: list[BatchItem]) -> None:
        """Run one batch so that a failure costs only the requests that cause it.

        On out-of-memory the batch is split in halves by samples and retried (down to single
        samples, which then fail alone with OUT_OF_MEMORY): smaller batches may fit. On any other
        error of the model or the solver the batch is split in halves by request and each half
        re-run until the failing request runs alone; that request fails (a domain error with its
        own status, anything else MODEL_ERROR) and every other request gets its samples. With one
        failing request among n, the others are re-run once each, in log2(n) smaller batches (n/2,
        n/4, ... requests); the halves holding the failing one fail at their first network call
        when the fault is tied to that request. The server stays SERVING.
        """
        try:
            self._sample_batch(items)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            halves = _split(items)
            if halves is None:
                self._fail(items, SampleFailed("out of memory for a single sample on this device", "OUT_OF_MEMORY"))
                return
            log.warning("out of memory with %d rows; retrying in two halves", _rows(items))
            for half in halves:
                self._run_batch(half)
        except Exception as error:  # the model's or the solver's; isolated to the request that causes it
            groups = _split_requests(items)
            if groups is None:
                self._fail(items, _request_failure(error), error)
                return
            log.warning(
                "a batch of %d requests failed (%s); retrying in two halves to isolate the failing request",
                len({id(item.ticket) for item in items}),
                type(error).__name__,
            )
            for group in groups:
                self._run_batch(group)

    def _fail(self, items: list[BatchItem], failure: ServiceError, cause: BaseException | None = None) -> None:
        """Fail the (one) request of `items`; a cause that is not the user's is logged with its traceback."""
        ticket = items[0].ticket
        if self.on_failure is not None:
            self.on_failure(_reason(failure))
        if cause is not None and isinstance(failure, SampleFailed):
            log.error(
                "request failed in the model: %s: %s",
                type(cause).__name__,
                str(cause)[:200],
                exc_info=cause,
                extra={"request_id": ticket.job.request_id},
            )
        ticket.post(ticket._fail, failure)

    def _sample_batch(self, items: list[BatchItem]) -> None:
        job = items[0].ticket.job
        model = job.served.model
        began = time.perf_counter()
        rows = _rows(items)
        self.batches_run += 1
        if self.on_batch is not None:
            self.on_batch(rows, self.settings.batching.max_batch_size)
        seeds = [seed for item in items for seed in item.ticket.job.seeds[item.start : item.stop]]
        rows_of = [(i.ticket.job, i.start, i.stop) for i in items]
        init = None
        if isinstance(model, models.TextToImageModel):
            text = text_batch(rows_of)
            denoiser: solvers.Denoiser = model.conditioned(
                text.prompts, text.negatives, text.guidance, height=text.height, width=text.width
            )
            shape = text.latent_shape
            init = init_latents(model, rows_of, shape)
        else:
            labels, guidance = conditioning(rows_of, model.device)
            denoiser = model.conditioned(labels, guidance) if labels is not None else model.conditioned()
            shape = model.sample_shape
        noise = solvers.make_noise(seeds, shape, device=model.device)
        try:
            with torch.inference_mode():
                result = _solve(job, denoiser, noise, self._callback(items), init)
                # A text model's latents become images here (the VAE, batched); a pixel model's
                # samples are sent as they are.
                text_model = isinstance(model, models.TextToImageModel)
                images = (model.decode(result.images) if text_model else result.images.float()).cpu()
        except solvers.SamplingCancelled as stopped:
            self.batches_stopped += 1
            log.info(
                "batch stopped after %d of %d steps: its requests are gone",
                stopped.completed_steps,
                stopped.total_steps,
            )
            return
        sampling_seconds = time.perf_counter() - began
        self.sampled_at[job.served.name] = began + sampling_seconds  # before any result is posted
        self._post_results(items, images, result, began, sampling_seconds, rows)

    def _callback(self, items: list[BatchItem]) -> solvers.StepCallback:
        """Progress and previews for the requests of `items`; stops the run once all of them are gone."""
        model = items[0].ticket.job.served.model

        def callback(info: StepInfo) -> bool:
            if all(item.ticket.cancelled for item in items):
                return True
            offset = 0
            for item in items:
                count = item.stop - item.start
                ticket = item.ticket
                if ticket.wants_progress and not ticket.cancelled:
                    progress = pb.Progress(step=info.step, total=info.total, sigma=info.sigma)
                    every = ticket.job.preview_every
                    if every and info.step % every == 0:
                        rows = info.denoised[offset : offset + count]
                        if isinstance(model, models.TextToImageModel):
                            rows = model.decode(rows)
                        progress.previews.extend(preview(rows))
                    ticket.post(ticket._set_progress, progress)
                offset += count
            return False

        return callback

    def _post_results(
        self,
        items: list[BatchItem],
        images: torch.Tensor,
        result: solvers.SampleResult,
        began: float,
        sampling_seconds: float,
        rows: int,
    ) -> None:
        """Each request's samples (a request with non-finite output fails alone)."""
        offset = 0
        for item in items:
            ticket, count = item.ticket, item.stop - item.start
            block = images[offset : offset + count]
            offset += count
            if ticket.cancelled:
                continue
            if not bool(torch.isfinite(block).all()):
                self._fail([item], SampleFailed("the model produced non-finite values", "NON_FINITE_OUTPUT"))
                continue
            per_sample_evals = result.nfe * ticket.job.evals_per_call
            results = []
            for k in range(count):
                index = item.start + k
                timing = pb.Timing(
                    queue_seconds=began - ticket.arrived,
                    sampling_seconds=sampling_seconds,
                    total_seconds=time.perf_counter() - ticket.arrived,
                    batch_rows=rows,
                )
                labels_of = ticket.job.labels
                results.append(
                    pb.SampleResult(
                        index=index,
                        seed=ticket.job.seeds[index],
                        label=labels_of[index] if labels_of is not None else -1,
                        guidance=ticket.job.guidance[index],
                        nfe=result.nfe,
                        network_evals=per_sample_evals,
                        sigmas=result.sigmas.tolist(),
                        timing=timing,
                        image=encode(block[k], ticket.job.output_format),
                        request_id=ticket.job.request_id,
                        dropped_tokens=ticket.job.text.dropped_tokens[index] if ticket.job.text is not None else 0,
                    )
                )
            ticket.post(ticket._add_results, results)

    # -- step mode: a request's own thread ---------------------------------------------------
    def _run_request(self, ticket: Ticket, batcher: StepBatcher) -> None:
        """Run one request's solver against a proxy of the model's step batcher; its failure is its own."""
        job = ticket.job
        model = batcher.model
        item = BatchItem(ticket, 0, job.num_samples)
        began = time.perf_counter()
        try:
            try:
                if ticket.cancelled:
                    return
                with torch.inference_mode():
                    proxy, noise, init = self._request_inputs(ticket, batcher)
                    result = _solve(job, proxy, noise, self._callback([item]), init)
            finally:
                batcher.leave(ticket)
            with torch.inference_mode():
                images = (model.decode(result.images) if job.text is not None else result.images.float()).cpu()
        except (RequestGone, solvers.SamplingCancelled):
            self.batches_stopped += 1
            log.info("request stopped: it is gone", extra={"request_id": job.request_id})
            return
        except ServiceError as failure:  # decided by the batcher (out of memory for one sample)
            self._fail([item], failure)
            return
        except Exception as error:  # the model's or the solver's, for this request only
            self._fail([item], _request_failure(error), error)
            return
        sampling_seconds = time.perf_counter() - began
        rows = round(proxy.rows_seen / proxy.ticks) if proxy.ticks else 0
        self._post_results([item], images, result, began, sampling_seconds, rows)

    @staticmethod
    def _request_inputs(
        ticket: Ticket, batcher: StepBatcher
    ) -> tuple[DenoiserProxy, torch.Tensor, torch.Tensor | None]:
        """A step-mode request's proxy (its conditioning encoded once, as per-row inputs), noise and
        init latents (img2img), on its own thread."""
        job = ticket.job
        model = batcher.model
        whole = [(job, 0, job.num_samples)]
        init = None
        if isinstance(model, models.TextToImageModel):
            assert job.text is not None  # a text model's jobs always carry it (build_job)
            text = text_batch(whole)
            size = (text.height, text.width)
            rows = model.sample_rows(text.prompts, text.negatives, text.guidance, height=size[0], width=size[1])
            noise_range = model.noise_range(*size)
            shape = text.latent_shape
            init = init_latents(model, whole, shape)

            def bound() -> solvers.Denoiser:  # only AMED asks: the bottleneck feature, in its own forward
                return model.conditioned(text.prompts, text.negatives, text.guidance, height=size[0], width=size[1])

        else:
            labels, guidance = conditioning(whole, model.device)
            rows = model.sample_rows(labels, guidance, count=job.num_samples)
            size, shape = model.default_size, model.sample_shape
            noise_range = (model.sigma_min, model.sigma_max, model.sigma_levels)

            def bound() -> solvers.Denoiser:  # only AMED asks: the bottleneck feature, in its own forward
                return model.conditioned(labels, guidance) if labels is not None else model.conditioned()

        proxy = DenoiserProxy(
            batcher,
            ticket,
            ticket.arrived,
            rows,
            size,
            noise_range,
            job.evals_per_call,
            lambda: ticket.cancelled,
            bound=bound,
        )
        noise = solvers.make_noise(job.seeds, shape, device=model.device)
        return proxy, noise, init


def _solve(
    job: Job,
    denoiser: solvers.Denoiser,
    noise: torch.Tensor,
    callback: solvers.StepCallback,
    init: torch.Tensor | None,
) -> solvers.SampleResult:
    """The job's solver over `noise` with `denoiser` (a bound model, or a step-mode proxy)."""
    if job.sampling is None:  # require_predictor refuses such jobs before admission
        raise RuntimeError(f"request {job.request_id}: no sampling plan (its learned grid is missing)")
    predictor = None
    if job.predictor is not None:
        predictor = job.served.predictors.find(job.predictor, job.served.name, device=job.served.model.device)
    return solvers.sample(denoiser, noise, plan=job.sampling, predictor=predictor, callback=callback, init=init)


def _rows(items: list[BatchItem]) -> int:
    return sum((i.stop - i.start) * i.ticket.job.evals_per_call for i in items)


def _split(items: list[BatchItem]) -> tuple[list[BatchItem], list[BatchItem]] | None:
    """Two batches of about half the samples each, or None for a single sample."""
    samples = [(item.ticket, k) for item in items for k in range(item.start, item.stop)]
    if len(samples) < 2:
        return None
    middle = len(samples) // 2

    def regroup(part: list[tuple[Ticket, int]]) -> list[BatchItem]:
        grouped: list[BatchItem] = []
        for ticket, k in part:
            if grouped and grouped[-1].ticket is ticket and grouped[-1].stop == k:
                grouped[-1] = BatchItem(ticket, grouped[-1].start, k + 1)
            else:
                grouped.append(BatchItem(ticket, k, k + 1))
        return grouped

    return regroup(samples[:middle]), regroup(samples[middle:])


def _split_requests(items: list[BatchItem]) -> tuple[list[BatchItem], list[BatchItem]] | None:
    """Two batches of about half the requests each (a request's rows stay together), or None for
    the rows of a single request."""
    order: list[int] = []
    for item in items:
        if id(item.ticket) not in order:
            order.append(id(item.ticket))
    if len(order) < 2:
        return None
    first = set(order[: len(order) // 2])
    return [i for i in items if id(i.ticket) in first], [i for i in items if id(i.ticket) not in first]


def _request_failure(error: Exception) -> ServiceError:
    """What a request that fails alone is told: the status of a domain error (a request the
    validation let through but the solver or model refuses), else MODEL_ERROR."""
    try:
        return from_domain(error)
    except TypeError:
        return SampleFailed(
            f"the model failed on this request ({type(error).__name__}); the server log has the details",
            "MODEL_ERROR",
        )


def _reason(error: ServiceError) -> str:
    """The ErrorInfo reason of an error (its status code's name when it has none)."""
    for detail in error.details:
        if isinstance(detail, error_details_pb2.ErrorInfo):
            return detail.reason
    return error.code.name


__all__ = ["BatchItem", "Engine", "Ticket"]
