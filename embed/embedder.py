"""Embedder: files in, vectors out, decoding overlapped with inference.

`iter_embed` streams: worker threads load and decode items (Pillow releases the GIL while
decoding) while the calling thread runs the backend on the previous batch. At most
`2 * batch_size` decoded items are in flight, so memory stays bounded whatever the number of
items, and results come out in input order, one per item, a failed decode as its `DecodeError`.
Arrays already decoded go straight to `backend.embed`, which takes any batch size.

How many threads decode at once adapts to the folder (`max_decode_workers`): it starts at
`decode_workers` (by default one per core but one, which leaves a core to inference), and whenever
the calling thread has spent more than `STARVED_FRACTION` of a stretch of batches waiting for
decoded images, a core sits idle while decoding is the bottleneck, so one more thread may decode,
up to `max_decode_workers`. Large photos for a small model are such a case: on 2 cores, a second
decoding thread indexed 1,000 photos of 1-2 MP 1.3x as fast (bench/index_folder.py), while 32-px
images, whose inference costs more than their decoding, keep one thread (a second one made them
5% slower).
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
STARVED_FRACTION = 0.3  # of the calling thread's time spent waiting for decodes: one more thread decodes
_JUDGE_EVERY = 2  # batches in a stretch, after the first one (which always waits: the pipeline fills)
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

    def _decode(self, item: Any, load: Callable[[Any], Source] | None, slots: _Slots | None = None) -> Decoded:
        if slots is not None:
            with slots:
                return self._decode(item, load)
        try:
            source = item if load is None else load(item)
        except OSError as e:
            raise DecodeError("unreadable", f"{item}: {e.strerror or e}") from None
        return load_image_array(source, self.spec, max_pixels=self.max_pixels)

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
        slots = _Slots(self.decode_workers) if self.max_decode_workers > self.decode_workers else None
        starved = _Starvation()
        with ThreadPoolExecutor(self.max_decode_workers, thread_name_prefix="decode") as pool:
            try:
                while True:
                    while not exhausted and len(pending) < window:
                        try:
                            item = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        pending.append((item, pool.submit(self._decode, item, load, slots)))
                    if not pending:
                        break
                    item, future = pending.popleft()
                    try:
                        array, size = starved.wait(future)
                        batch.append((item, array, size))
                        n_ok += 1
                    except DecodeError as e:
                        batch.append((item, e, None))
                    if n_ok >= self.batch_size or (exhausted and not pending):
                        yield from self._flush(batch)
                        batch, n_ok = [], 0
                        if slots is not None and slots.limit < self.max_decode_workers and starved.judge():
                            slots.raise_limit(slots.limit + 1)
                            logger.debug("decoding is the bottleneck: %d decoding threads", slots.limit)
                yield from self._flush(batch)
            finally:
                for _, future in pending:
                    future.cancel()
                self.decoding_threads = slots.limit if slots is not None else self.decode_workers

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


class _Slots:
    """A semaphore whose number of slots can grow: how many pool threads may decode at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._busy = 0
        self._cond = threading.Condition()

    def __enter__(self) -> None:
        with self._cond:
            while self._busy >= self.limit:
                self._cond.wait()
            self._busy += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._busy -= 1
            self._cond.notify()

    def raise_limit(self, limit: int) -> None:
        with self._cond:
            self.limit = limit
            self._cond.notify_all()


class _Starvation:
    """How much of the calling thread's time goes to waiting for decoded images, batch by batch."""

    def __init__(self) -> None:
        self.batches = -1  # the first batch waits for the pipeline to fill: not judged
        self.waited = 0.0
        self.since = time.perf_counter()

    def wait(self, future: Future[Decoded]) -> Decoded:
        if future.done():
            return future.result()
        t0 = time.perf_counter()
        try:
            return future.result()
        finally:
            self.waited += time.perf_counter() - t0

    def judge(self) -> bool:
        """Called after each batch: True when the stretch of batches that just ended spent more than
        STARVED_FRACTION of its time waiting for decodes (then a new stretch starts)."""
        self.batches += 1
        if self.batches < _JUDGE_EVERY:
            if self.batches == 0:
                self.waited, self.since = 0.0, time.perf_counter()
            return False
        now = time.perf_counter()
        starved = self.waited > STARVED_FRACTION * (now - self.since)
        self.batches, self.waited, self.since = 0, 0.0, now
        return starved


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
