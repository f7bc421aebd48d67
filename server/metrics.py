"""Prometheus metrics: one registry per app (tests build many apps in one process).

Requests are labelled by route template (`/v1/items/{item_id}`, never the raw path, so the label
set stays bounded), method and status.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "simsearch_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "simsearch_http_request_seconds",
            "HTTP request latency, first byte in to last byte out",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "simsearch_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "simsearch_batch_seconds", "seconds per model call", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("simsearch_queue_depth", "images waiting for the model", registry=r)
        self.queue_rejections = Counter(
            "simsearch_queue_rejections", "requests refused because the queue was full", registry=r
        )
        self.index_items = Gauge("simsearch_index_items", "items in the index", registry=r)
        self.decode_errors = Counter(
            "simsearch_decode_errors", "uploads that could not be decoded", ["reason"], registry=r
        )
        # the live index (server/live_index.py)
        self.index_generation = Gauge(
            "simsearch_index_generation", "the index commit being served", registry=r
        )
        self.index_model_mismatch = Gauge(
            "simsearch_index_model_mismatch",
            "1 while the index belongs to another model than the one served (writes refused, not ready)",
            registry=r,
        )
        self.index_reloads = Counter(
            "simsearch_index_reloads",
            "other processes' commits picked up: new vectors, or new vectors with a new model",
            ["what"],
            registry=r,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.index_reload_seconds = Gauge(
            "simsearch_index_reload_seconds", "how long the last pick-up took (load + swap)", registry=r
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:  # labels() parses and locks each time: look each label set up once
            labels = (method, route, str(status))
            children = self._request_children[key] = (self.requests.labels(*labels), self.latency.labels(*labels))
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def bind(self, *, queue_depth: Callable[[], float], index_items: Callable[[], float]) -> None:
        """Gauges read at scrape time from the live objects."""
        self.queue_depth.set_function(queue_depth)
        self.index_items.set_function(index_items)

    def bind_index(self, *, generation: Callable[[], float], mismatch: Callable[[], float]) -> None:
        self.index_generation.set_function(generation)
        self.index_model_mismatch.set_function(mismatch)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead); counts every HTTP request, including 413s."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.observe_request(scope["method"], template, status, time.perf_counter() - start)
