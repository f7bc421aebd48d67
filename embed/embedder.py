"""Embedder: files in, vectors out, decoding overlapped with inference.

`iter_embed` streams: worker threads load and decode items (Pillow releases the GIL while
decoding) while the calling thread runs the backend on the previous batch. At most
`2 * batch_size` decoded items are in flight, so memory stays bounded whatever the number of
items, and results come out in input order, one per item, a failed decode as its `DecodeError`.
Arrays already decoded go straight to `backend.embed`, which takes any batch size.

How many threads decode at once adapts to the folder (`max_decode_workers`): it starts at
`decode_workers` (by default one per core but one, which leaves a core to inference). When the
calling thread has spent more than `STARVED_FRACTION` of a stretch of batches waiting for decoded
images and a decode takes `MIN_DECODE_S` of CPU or more, one more thread may decode for the next stretch,
and it stays only if that stretch ran at least `GAIN` faster; otherwise the count goes back and
stays. Waiting alone does not prove that a thread would help: Pillow parses a file in Python, under
the interpreter lock that the other threads need too, and for small files (CIFAR's 32 px: ~0.1 ms a
decode) that parsing is most of the decode, so a second thread made the build slower; a photo's
decode is mostly libjpeg's, without the lock. On 2 cores, large photos for a small model gain a
second thread (1,000 photos of 1-2 MP: 1.3-1.4x as fast).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from embed.backends.base import Backend
from embed.decode import DEFAULT_MAX_PIXELS, DecodeError, Source
from embed.preprocess import load_image_array
from embed.spec import ModelSpec

logger = logging.getLogger(__name__)

T = TypeVar("T")
STARVED_FRACTION = 0.3  # of the calling thread's time spent waiting for decodes: try one more thread
MIN_DECODE_S = 0.001  # of CPU: decodes this long are mostly libjpeg's, which runs without the GIL
GAIN = 1.05  # the images/s a stretch with one more decoding thread must beat the previous one by
_STRETCH_BATCHES, _STRETCH_S = 3, 0.5  # a stretch: at least this many batches and seconds
Decoded = tuple[np.ndarray, tuple[int, int]]
Result = tuple[Any, "np.ndarray | DecodeError", "tuple[int, int] | None"]


class Embedder:
    """Batches images through a `Backend` with `decode_workers` decoding threads, more (up to
    `max_decode_workers`; default: no more) while decoding is what the batches wait for."""

    def __init__(
        self,
        backend: Backend,
        *,
        batch_size: int = 64,
        decode_workers: int = 2,
        max_decode_workers: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if batch_size < 1 or decode_workers < 1:
            raise ValueError(f"batch_size and decode_workers must be >= 1, got {batch_size}, {decode_workers}")
        self.backend = backend
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.max_decode_workers = max(decode_workers, max_decode_workers or decode_workers)
        self.max_pixels = max_pixels
        self.decoding_threads = decode_workers  # how many decoded at once at the end of the last run

    @property
    def spec(self) -> ModelSpec:
        return self.backend.spec

    def embed_sources(self, sources: list[Source]) -> list[np.ndarray | DecodeError]:
        """One result per source: its vector [D], or the `DecodeError` that stopped it."""
        return [vec for _, vec, _ in self.iter_embed(sources)]

    def _decode(self, item: Any, load: Callable[[Any], Source] | None) -> Decoded:
        try:
            source = item if load is None else load(item)
        except OSError as e:
            raise DecodeError("unreadable", f"{item}: {e.strerror or e}") from None
        return load_image_array(source, self.spec, max_pixels=self.max_pixels)

    def _decode_timed(self, item: Any, load: Callable[[Any], Source] | None, tuner: _Tuner) -> Decoded:
        t0 = time.thread_time()  # CPU time: not the time spent waiting for the GIL
        try:
            return self._decode(item, load)
        finally:
            tuner.decoded(time.thread_time() - t0)

    def iter_embed(
        self, items: Iterable[T], load: Callable[[T], Source] | None = None
    ) -> Iterator[tuple[T, np.ndarray | DecodeError, tuple[int, int] | None]]:
        """Yield `(item, vector or DecodeError, original (width, height) or None)` in input order.

        `load(item)` gives the bytes or path to decode (default: the item itself); it runs in the
        worker threads, so it may read files. An `OSError` from it is reported as "unreadable".
        """
        window = max(2 * self.batch_size, self.max_decode_workers)
        pending: deque[tuple[Any, Future[Decoded]]] = deque()
        batch: list[tuple[Any, np.ndarray | DecodeError, tuple[int, int] | None]] = []
        n_ok = 0
        it = iter(items)
        exhausted = False
        tuner = _Tuner(self.decode_workers, self.max_decode_workers)
        pools = [ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode")]

        def submit(item: Any) -> Future[Decoded]:
            if tuner.settled:
                return pools[-1].submit(self._decode, item, load)
            return pools[-1].submit(self._decode_timed, item, load, tuner)

        try:
            while True:
                while not exhausted and len(pending) < window:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append((item, submit(item)))
                if not pending:
                    break
                item, future = pending.popleft()
                try:
                    array, size = tuner.wait(future)
                    batch.append((item, array, size))
                    n_ok += 1
                except DecodeError as e:
                    batch.append((item, e, None))
                if n_ok >= self.batch_size or (exhausted and not pending):
                    yield from self._flush(batch)
                    threads = tuner.batch_done(len(batch))
                    batch, n_ok = [], 0
                    if threads is not None:  # a pool of that many threads takes the items not started yet
                        pools.append(ThreadPoolExecutor(threads, thread_name_prefix="decode"))
                        pending = deque((i, submit(i) if f.cancel() else f) for i, f in pending)
            yield from self._flush(batch)
        finally:
            for _, future in pending:
                future.cancel()
            for pool in pools:
                pool.shutdown(wait=True)
            self.decoding_threads = tuner.threads

    def _flush(self, batch: list[Result]) -> Iterator[Result]:
        ok = [i for i, (_, r, _) in enumerate(batch) if isinstance(r, np.ndarray)]
        vectors = self.backend.embed(np.stack([batch[i][1] for i in ok])) if ok else None
        row = {i: k for k, i in enumerate(ok)}
        for i, (item, result, size) in enumerate(batch):
            if isinstance(result, np.ndarray):
                assert vectors is not None
                yield item, vectors[row[i]], size
            else:
                yield item, result, None


class _Tuner:
    """Decides, stretch by stretch of batches, how many threads decode (`threads`)."""

    def __init__(self, threads: int, most: int) -> None:
        self.threads, self.most = threads, most
        self.settled = threads >= most
        self.first = True  # the first batch waits for the pipeline to fill: not measured
        self.trial_of: tuple[int, float] | None = None  # (the previous count, its images/s) during a trial
        self._lock = threading.Lock()
        self.decode_s, self.n_decoded = 0.0, 0
        self._restart()

    def _restart(self) -> None:
        self.batches, self.images, self.waited, self.since = 0, 0, 0.0, time.perf_counter()

    def decoded(self, cpu_s: float) -> None:
        """A decoding thread spent `cpu_s` of CPU on one item."""
        with self._lock:
            self.decode_s += cpu_s
            self.n_decoded += 1

    def wait(self, future: Future[Decoded]) -> Decoded:
        """The future's result, counting the time spent waiting for it."""
        if self.settled or future.done():
            return future.result()
        t0 = time.perf_counter()
        try:
            return future.result()
        finally:
            self.waited += time.perf_counter() - t0

    def batch_done(self, n: int) -> int | None:
        """After each batch of `n` items: the number of threads to decode with from now on, or None
        to go on as before."""
        if self.settled:
            return None
        if self.first:
            self.first = False
            self._restart()
            return None
        self.batches += 1
        self.images += n
        elapsed = time.perf_counter() - self.since
        if self.batches < _STRETCH_BATCHES or elapsed < _STRETCH_S:
            return None
        with self._lock:
            mean_decode_s = self.decode_s / self.n_decoded if self.n_decoded else 0.0
            self.decode_s, self.n_decoded = 0.0, 0
        rate, waited = self.images / elapsed, self.waited / elapsed
        self._restart()
        if self.trial_of is not None:
            previous, previous_rate = self.trial_of
            self.trial_of = None
            if rate < GAIN * previous_rate:  # no better with one more: back, and stay there
                logger.debug("decoding threads: %d (%d gave %.0f images/s against %.0f)", previous, self.threads,
                             rate, previous_rate)
                self.threads, self.settled = previous, True
                return previous
        if waited > STARVED_FRACTION and mean_decode_s >= MIN_DECODE_S and self.threads < self.most:
            self.trial_of = (self.threads, rate)
            self.threads += 1
            logger.debug("decoding threads: trying %d (waited %.0f%% of %.2f s; %.2f ms of CPU a decode)",
                         self.threads, 100 * waited, elapsed, 1000 * mean_decode_s)
            return self.threads
        self.settled = self.threads >= self.most
        return None


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_decode_workers() -> int:
    """One decoding thread per core, leaving one for inference; at least one."""
    return max(1, available_cores() - 1)


def default_max_decode_workers() -> int:
    """As many decoding threads as cores, when decoding is what inference waits for."""
    return available_cores()
