"""Uploaded bytes -> vectors: decode (embed.preprocess), then the model through the micro-batcher.
Per-image failures come back as `ErrorItem`s, never as exceptions.

Small images (at most `INLINE_DECODE_MAX_PIXELS`) are decoded on the event loop itself: their decode
(~0.1 ms, mostly Pillow's Python code under the GIL) costs less than the hop to a pool thread and
back (submit, wake-up, callback, resuming the request), which was ~15% of the server's interpreter
time per request for 32-pixel images. Anything larger, or anything whose header does not say, goes
to the decode pool, so a photo never holds up the loop: the size check is `max_pixels` itself,
made from the header before any pixel is decoded.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from embed.decode import DecodeError
from embed.preprocess import load_image_array
from embed.spec import ModelSpec
from server.batcher import BatcherClosed, MicroBatcher, QueueFull
from server.bodies import Upload
from server.errors import DECODE_STATUS, ApiError, ErrorItem, decode_error_item
from server.metrics import Metrics

INLINE_DECODE_MAX_PIXELS = 128 * 128


@dataclass
class Embedded:
    upload: Upload
    vector: np.ndarray
    width: int
    height: int


class EmbedPipeline:
    def __init__(
        self,
        spec: ModelSpec,
        batcher: MicroBatcher,
        metrics: Metrics,
        *,
        max_pixels: int,
        decode_workers: int,
    ) -> None:
        self.spec = spec
        self.batcher = batcher
        self.metrics = metrics
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(max_workers=decode_workers, thread_name_prefix="simsearch-decode")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _decode(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        return load_image_array(data, self.spec, max_pixels=self.max_pixels)

    def _decode_small(self, data: bytes) -> tuple[np.ndarray, tuple[int, int]] | None:
        """The decoded image when it is small enough to decode here; None: use the pool."""
        try:
            return load_image_array(data, self.spec, max_pixels=min(self.max_pixels, INLINE_DECODE_MAX_PIXELS))
        except DecodeError as e:
            if e.reason == "too_large" and self.max_pixels > INLINE_DECODE_MAX_PIXELS:
                return None  # refused from the header alone: decode it in the pool, with the real limit
            raise

    async def embed(self, uploads: list[Upload]) -> list[Embedded | ErrorItem]:
        """One result per upload, in order. Raises ApiError(503) when the model queue is full."""
        loop = asyncio.get_running_loop()
        results: list[Embedded | ErrorItem | None] = [None] * len(uploads)
        jobs: list[tuple[int, Upload, asyncio.Future[tuple[np.ndarray, tuple[int, int]]]]] = []
        for i, up in enumerate(uploads):
            if up.error is not None or up.data is None:
                results[i] = up.error or ErrorItem(reason="empty", message="no data", index=up.index)
                continue
            job: asyncio.Future[tuple[np.ndarray, tuple[int, int]]] = loop.create_future()
            try:
                small = self._decode_small(up.data)
            except DecodeError as e:
                job.set_exception(e)
            else:
                if small is None:
                    job = loop.run_in_executor(self._pool, self._decode, up.data)
                else:
                    job.set_result(small)
            jobs.append((i, up, job))
        decoded: list[tuple[int, Upload, np.ndarray, tuple[int, int]]] = []
        self.batcher.announce(len(jobs))
        try:
            for i, up, job in jobs:
                try:
                    array, (w, h) = await job
                except DecodeError as e:
                    self.metrics.decode_errors.labels(e.reason).inc()
                    results[i] = decode_error_item(e, up.index, up.filename)
                    continue
                decoded.append((i, up, array, (w, h)))
        finally:
            self.batcher.announce(-len(jobs))
        if decoded:
            vectors = await self._infer([d[2] for d in decoded])
            for (i, up, _, (w, h)), v in zip(decoded, vectors, strict=True):
                results[i] = Embedded(up, v, w, h)
        return [r for r in results if r is not None]

    async def embed_one(self, upload: Upload) -> Embedded:
        """A single image; a failure is raised as the ApiError it answers."""
        (result,) = await self.embed([upload])
        if isinstance(result, ErrorItem):
            raise error_for(result)
        return result

    async def _infer(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        try:
            return await self.batcher.submit_many(arrays)
        except QueueFull as e:
            self.metrics.queue_rejections.inc()
            raise ApiError(
                503, "queue_full", str(e), headers={"Retry-After": str(max(1, round(e.retry_after_s)))}
            ) from None
        except BatcherClosed as e:
            raise ApiError(503, "shutting_down", str(e), headers={"Retry-After": "1"}) from None
        except Exception as e:  # the model itself failed (e.g. Triton went away)
            raise ApiError(503, "backend_error", f"the model backend failed: {e}", headers={"Retry-After": "1"}) from e


def error_for(item: ErrorItem) -> ApiError:
    """The status a request answers when its only (or every) image failed."""
    status = DECODE_STATUS.get(item.reason, 422)
    name = f" {item.filename!r}" if item.filename else ""
    return ApiError(status, item.reason, f"image{name}: {item.reason}: {item.message}", errors=[item])
