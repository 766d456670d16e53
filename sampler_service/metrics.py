"""Prometheus metrics on their own HTTP port (off unless `metrics_port` is set).

Label values come from closed sets (method names, status codes), so cardinality is bounded.
"""

from __future__ import annotations

from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .gen.sampler.v1 import sampler_pb2 as pb

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, port: int | None, host: str = "127.0.0.1") -> None:
        self.port = port
        self.host = host
        self.bound_port: int | None = None
        self.registry = CollectorRegistry()
        self._server: Any = None
        r = self.registry
        self.requests = Counter(
            "sampler_requests", "Requests by method and status code", ["method", "code"], registry=r
        )
        self.latency = Histogram(
            "sampler_request_seconds", "Request latency", ["method"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "sampler_queue_wait_seconds", "Time from arrival to batch start", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("sampler_admitted_requests", "Requests admitted (queued or running)", registry=r)
        self.batch_fill = Histogram(
            "sampler_batch_fill_ratio",
            "Network rows of a batch / max_batch_size",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
            registry=r,
        )
        self.cancellations = Counter(
            "sampler_cancellations", "Requests cancelled by the client or a deadline", registry=r
        )
        self.samples = Counter("sampler_samples", "Samples served", registry=r)
        self.failures = Counter(
            "sampler_request_failures",
            "Requests failed in the model or solver, by ErrorInfo reason (MODEL_ERROR, NON_FINITE_OUTPUT, ...)",
            ["reason"],
            registry=r,
        )
        self.nfe = Counter("sampler_nfe", "Denoiser calls served (per sample, summed)", registry=r)
        self.network_evals = Counter(
            "sampler_network_evals", "Network evaluations served (per sample, summed)", registry=r
        )

    def start(self) -> None:
        if self.port is not None:
            self._server, _thread = start_http_server(self.port, addr=self.host, registry=self.registry)
            self.bound_port = self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def request(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method).observe(seconds)

    def sample(self, result: pb.SampleResult) -> None:
        self.samples.inc()
        self.nfe.inc(result.nfe)
        self.network_evals.inc(result.network_evals)
        self.queue_wait.observe(result.timing.queue_seconds)

    def batch(self, rows: int, capacity: int) -> None:
        self.batch_fill.observe(rows / capacity)

    def failed(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def cancelled(self) -> None:
        self.cancellations.inc()


__all__ = ["Metrics"]
