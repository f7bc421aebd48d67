"""Dynamic batching: concurrent requests' images grouped into one model call.

Requests put preprocessed uint8 arrays [H, W, 3] on a bounded queue and await their vectors. One
collector task takes what is waiting (up to `max_batch_size`); when it has less than a full batch it
waits for more, at most `max_wait_s` and only while other requests have announced images that
are still being decoded (`announce`), so a lone request never waits for company that is not coming.
The model runs in a worker thread, so the event loop never blocks on inference. While one batch
runs, the next one queues up, so under load batches fill without waiting. A full queue raises
`QueueFull` at once (the route answers 503 + Retry-After).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The batch queue has no room for the request's images; retry later."""

    def __init__(self, depth: int, capacity: int, retry_after_s: float) -> None:
        super().__init__(f"the model queue is full ({depth}/{capacity} images waiting); retry later")
        self.retry_after_s = retry_after_s


class BatcherClosed(RuntimeError):
    """The batcher was stopped (the server is shutting down)."""


@dataclass
class _Pending:
    array: np.ndarray
    future: asyncio.Future[np.ndarray]


BatchObserver = Callable[[int, float], None]  # (batch size, seconds in the model)


class MicroBatcher:
    """`await submit_many(arrays)` -> one float32 vector per array, computed in batches by `fn`.

    `fn(batch uint8 [N, H, W, 3]) -> float32 [N, D]` runs in a single worker thread with N at most
    `max_batch_size`; the server passes `Backend.embed` itself. Use from one event loop: `start()`
    inside it, `stop()` before it closes.
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        queue_max: int = 512,
        on_batch: BatchObserver | None = None,
        thread_initializer: Callable[[], object] | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_max < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and queue_max must be >= 1 and max_wait_s >= 0")
        self._fn = fn
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.queue_max = queue_max
        self._on_batch = on_batch
        self._thread_initializer = thread_initializer
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._recent_batch_s = 0.01  # moving average, for Retry-After
        self._announced = 0  # images being decoded that will be submitted soon

    @property
    def depth(self) -> int:
        """Images waiting for the model (not counting the batch running now)."""
        return len(self._queue)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def announce(self, n: int) -> None:
        """`n` images are on their way (decoding); `n` < 0 withdraws them (submitted or failed)."""
        self._announced = max(0, self._announced + n)
        if n < 0 and self._wakeup is not None:
            self._wakeup.set()  # a waiting collector may stop waiting

    def start(self) -> None:
        if self.running:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="simsearch-infer", initializer=self._thread_initializer
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="simsearch-batcher")

    async def stop(self) -> None:
        """Finish the batch in flight, fail what is still queued, release the worker thread."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue:
            p = self._queue.popleft()
            if not p.future.done():
                p.future.set_exception(BatcherClosed("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, array: np.ndarray) -> np.ndarray:
        return (await self.submit_many([array]))[0]

    async def submit_many(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Queue all of `arrays` or none of them (QueueFull); await their vectors."""
        if not self.running:
            raise BatcherClosed("the batcher is not running")
        if len(self._queue) + len(arrays) > self.queue_max:
            retry = max(1.0, self._recent_batch_s * (len(self._queue) / self.max_batch_size + 1))
            raise QueueFull(len(self._queue), self.queue_max, retry)
        loop = asyncio.get_running_loop()
        pending = [_Pending(a, loop.create_future()) for a in arrays]
        self._queue.extend(pending)
        assert self._wakeup is not None
        self._wakeup.set()
        if len(pending) == 1:  # the usual case: no gather (one more future and its callbacks)
            return [await pending[0].future]
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if len(self._queue) < self.max_batch_size and self.max_wait_s > 0:
                await self._wait_for_more()
            batch = self._take()
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                stacked = np.stack([p.array for p in batch])
                vectors = await loop.run_in_executor(self._executor, self._fn, stacked)
            except asyncio.CancelledError:
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(BatcherClosed("the server is shutting down"))
                raise
            except Exception as e:  # the model failed: every request in the batch gets the error
                log.warning("batch of %d failed: %s", len(batch), e)
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            elapsed = time.perf_counter() - t0
            self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * elapsed
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)
            for p, v in zip(batch, vectors, strict=True):
                if not p.future.done():  # the client may have gone away
                    p.future.set_result(v)

    async def _wait_for_more(self) -> None:
        assert self._wakeup is not None
        deadline = time.perf_counter() + self.max_wait_s
        while len(self._queue) < self.max_batch_size and self._announced > 0:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list[_Pending]:
        batch: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch_size:
            p = self._queue.popleft()
            if not p.future.done():  # skip requests cancelled while queued
                batch.append(p)
        return batch
