"""Embedder: files in, vectors out, decoding overlapped with inference.

`iter_embed` streams: worker threads load and decode items (Pillow releases the GIL while
decoding) while the calling thread runs the backend on the previous batch. At most
`2 * batch_size` decoded items are in flight, so memory stays bounded whatever the number of
items, and results come out in input order, one per item, a failed decode as its `DecodeError`.
Arrays already decoded go straight to `backend.embed`, which takes any batch size.
"""

from __future__ import annotations

import logging
import os
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
Decoded = tuple[np.ndarray, tuple[int, int]]
Result = tuple[Any, "np.ndarray | DecodeError", "tuple[int, int] | None"]


class Embedder:
    """Batches images through a `Backend` with `decode_workers` decoding threads."""

    def __init__(
        self,
        backend: Backend,
        *,
        batch_size: int = 64,
        decode_workers: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        if batch_size < 1 or decode_workers < 1:
            raise ValueError(f"batch_size and decode_workers must be >= 1, got {batch_size}, {decode_workers}")
        self.backend = backend
        self.batch_size = batch_size
        self.decode_workers = decode_workers
        self.max_pixels = max_pixels

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

    def iter_embed(
        self, items: Iterable[T], load: Callable[[T], Source] | None = None
    ) -> Iterator[tuple[T, np.ndarray | DecodeError, tuple[int, int] | None]]:
        """Yield `(item, vector or DecodeError, original (width, height) or None)` in input order.

        `load(item)` gives the bytes or path to decode (default: the item itself); it runs in the
        worker threads, so it may read files. An `OSError` from it is reported as "unreadable".
        """
        window = max(2 * self.batch_size, self.decode_workers)
        pending: deque[tuple[Any, Future[Decoded]]] = deque()
        batch: list[tuple[Any, np.ndarray | DecodeError, tuple[int, int] | None]] = []
        n_ok = 0
        it = iter(items)
        exhausted = False
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool:
            try:
                while True:
                    while not exhausted and len(pending) < window:
                        try:
                            item = next(it)
                        except StopIteration:
                            exhausted = True
                            break
                        pending.append((item, pool.submit(self._decode, item, load)))
                    if not pending:
                        break
                    item, future = pending.popleft()
                    try:
                        array, size = future.result()
                        batch.append((item, array, size))
                        n_ok += 1
                    except DecodeError as e:
                        batch.append((item, e, None))
                    if n_ok >= self.batch_size or (exhausted and not pending):
                        yield from self._flush(batch)
                        batch, n_ok = [], 0
                yield from self._flush(batch)
            finally:
                for _, future in pending:
                    future.cancel()

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


def default_decode_workers() -> int:
    """One decoding thread per core, leaving one for inference; at least one."""
    return max(1, (os.cpu_count() or 2) - 1)
