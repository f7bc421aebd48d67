"""Prometheus metrics: one registry per app (tests build many apps in one process).

Requests are labelled by route template (`/v1/items/{item_id}`, never the raw path, so the label
set stays bounded), method and status.

Several worker processes (`serve --workers N`) report as one server through prometheus_client's
multiprocess mode: the supervisor points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before it
spawns the workers (server/workers.py), each worker's counters and histograms go to files there,
and `/metrics`, whichever worker answers it, adds them all up. Gauges are then set every second
from the live objects (they cannot be read at scrape time in another process): queue depths add
up over the live workers, the index's size, commit and mismatch take the largest.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time
from collections.abc import Callable
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as mp
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GAUGE_REFRESH_S = 1.0

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def multiprocess_dir() -> str | None:
    """The multiprocess directory when this process reports through one (set before prometheus_client
    was imported, which is when prometheus_client itself looks)."""
    return os.environ.get(MULTIPROC_ENV) or None


class Metrics:
    def __init__(self, *, multiprocess: bool = False) -> None:
        self.multiprocess = multiprocess and multiprocess_dir() is not None
        self._gauge_sources: list[tuple[Gauge, Callable[[], float]]] = []
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        def gauge(name: str, doc: str, mode: Literal["livesum", "livemax", "livemostrecent"]) -> Gauge:
            return Gauge(name, doc, registry=r, multiprocess_mode=mode)

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
        self.queue_depth = gauge("simsearch_queue_depth", "images waiting for the model", "livesum")
        self.queue_rejections = Counter(
            "simsearch_queue_rejections", "requests refused because the queue was full", registry=r
        )
        self.index_items = gauge("simsearch_index_items", "items in the index", "livemax")
        self.decode_errors = Counter(
            "simsearch_decode_errors", "uploads that could not be decoded", ["reason"], registry=r
        )
        # the live index (server/live_index.py)
        self.index_generation = gauge("simsearch_index_generation", "the index commit being served", "livemax")
        self.index_model_mismatch = gauge(
            "simsearch_index_model_mismatch",
            "1 while the index belongs to another model than the one served (writes refused, not ready)",
            "livemax",
        )
        self.index_reloads = Counter(
            "simsearch_index_reloads",
            "other processes' commits picked up: new vectors, or new vectors with a new model",
            ["what"],
            registry=r,
        )
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self.index_reload_seconds = gauge(
            "simsearch_index_reload_seconds", "how long the last pick-up took (load + swap)", "livemostrecent"
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
        """Gauges read from the live objects (at scrape time; every second with several workers)."""
        self._bind(self.queue_depth, queue_depth)
        self._bind(self.index_items, index_items)

    def bind_index(self, *, generation: Callable[[], float], mismatch: Callable[[], float]) -> None:
        self._bind(self.index_generation, generation)
        self._bind(self.index_model_mismatch, mismatch)

    def _bind(self, gauge: Gauge, source: Callable[[], float]) -> None:
        if self.multiprocess:
            self._gauge_sources.append((gauge, source))
        else:
            gauge.set_function(source)

    def refresh(self) -> None:
        """Multiprocess mode: write this worker's gauges now."""
        for gauge, source in self._gauge_sources:
            gauge.set(source())

    async def refresh_forever(self) -> None:
        """Multiprocess mode: keep this worker's gauges current (a task for the app's lifetime)."""
        while True:
            self.refresh()
            await asyncio.sleep(GAUGE_REFRESH_S)

    def exposition(self) -> bytes:
        """The /metrics text: this app's registry, or every worker's files added up."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        self.refresh()
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
        return generate_latest(registry)

    def forget_dead_workers(self, *, stopping: bool = False) -> None:
        """Multiprocess mode: drop the live gauges of workers that are gone (a killed one leaves its
        files behind), and this process's own when `stopping` (never before: its gauges write to
        those files for as long as it runs)."""
        directory = multiprocess_dir()
        if not self.multiprocess or directory is None:
            return
        for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
            pid = int(path.rsplit("_", 1)[1].split(".")[0])
            if (stopping and pid == os.getpid()) or (pid != os.getpid() and not _alive(pid)):
                mp.mark_process_dead(pid, directory)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
