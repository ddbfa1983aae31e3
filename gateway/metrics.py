"""The gateway's Prometheus metrics: what a client of the serving system experiences.

TTFT, TPOT and end-to-end latency are measured here, at the edge, because that is what the SLOs in the
benchmarks are about (TTFT 2 s, TPOT 50 ms by default). The metrics live in a private registry rather
than prometheus_client's global one, so several apps in one process (tests) never clash, and
`/metrics` shows only what this app owns plus what the backend adds.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("epd.gateway.metrics")

PREFIX = "epd_gateway"
# Seconds; fine steps below a second for TTFT, a wide tail for long generations.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 40, 80, 160)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)  # fmt: skip


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests by endpoint and outcome status (the error's status for a stream that failed after "
            "the 200 was sent; 499 when the client went away).",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Arrival of the request to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Arrival of the request to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of admitted requests (images included).", registry=r
        )
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens.", registry=r)
        self.running = Gauge(f"{PREFIX}_running_requests", "Requests being generated now.", registry=r)
        self.preprocess = Histogram(
            f"{PREFIX}_preprocess_seconds",
            "Arrival of an admitted request to its prompt being ready: body read, validation, image "
            "loading, chat template.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.open_connections = Gauge(
            f"{PREFIX}_open_connections", "Client connections open now (HTTP).", registry=r
        )
        self.connections_closed = Counter(
            f"{PREFIX}_connections_closed",
            "Client connections the gateway closed on its own, by reason: limit (over max_connections, "
            "answered 503), header_timeout (no complete request head in time).",
            ["reason"],
            registry=r,
        )

        self._backend_text: Any = None  # a backend whose metrics_text() is appended to the exposition

    def add_backend(self, backend: Any) -> None:
        """Register the backend's collectors (the cluster's per-instance figures and stage timings) in
        this registry, so /metrics is one exposition, names and escaping done by prometheus_client. A
        backend without `collectors()` has its `metrics_text()` appended instead."""
        collectors = getattr(backend, "collectors", None)
        if not callable(collectors):
            self._backend_text = backend
            return
        for collector in collectors():
            self.registry.register(collector)

    def record_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def record_generation(
        self, *, prompt_tokens: int, output_tokens: int, ttft: float | None, tpot: float | None, e2e: float
    ) -> None:
        """One finished (or ended) generation; TTFT/TPOT only when there was a first / a second token."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.e2e.observe(e2e)

    def exposition(self) -> bytes:
        """This registry's text, then the text of a backend without collectors; a failing backend only
        loses its own part."""
        body = generate_latest(self.registry)
        if self._backend_text is not None:
            try:
                body += self._backend_text.metrics_text()
            except Exception:
                log.exception("backend metrics failed")
        return body
