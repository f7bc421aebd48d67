"""The long-lived objects one app holds, opened in `lifespan` and handed to routes by `get_resources`."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from embed.backends import open_backend
from embed.backends.base import Backend
from embed.embedder import Embedder
from embed.spec import ModelSpec
from index.store import ImageIndex
from server.batcher import MicroBatcher
from server.committer import Committer
from server.errors import ApiError
from server.metrics import Metrics
from server.pipeline import EmbedPipeline
from server.priority import lower_current_thread_priority
from server.settings import Settings
from server.thumbnails import ThumbnailCache
from server.upload_store import UploadStore

log = logging.getLogger(__name__)

UPLOADS_DIR = "uploads"


class IndexModelMismatch(RuntimeError):
    """The index was built with a different model than the one being served."""


@dataclass
class Resources:
    settings: Settings
    metrics: Metrics
    backend: Backend
    embedder: Embedder
    index: ImageIndex
    batcher: MicroBatcher
    pipeline: EmbedPipeline
    committer: Committer
    thumbnails: ThumbnailCache
    uploads: UploadStore
    owns_backend: bool = True
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def spec(self) -> ModelSpec:
        return self.embedder.spec


def open_backend_from(settings: Settings) -> Backend:
    if settings.model_dir is not None:
        return open_backend(
            model_dir=str(settings.model_dir),
            intra_op_threads=settings.ort_intra_op_threads,
            max_batch_size=settings.batch_size,
        )
    return open_backend(
        triton_url=settings.triton_url,
        protocol=settings.triton_protocol,
        model_name=settings.triton_model_name,
        max_batch_size=settings.batch_size,
    )


def open_index(settings: Settings, spec: ModelSpec) -> ImageIndex:
    index = ImageIndex.open_or_create(
        settings.index_dir, spec.embedding_dim, model_name=spec.name, model_version=spec.version
    )
    stats = index.stats()
    dim = stats.get("dim", spec.embedding_dim)
    name = stats.get("model_name") or spec.name
    if dim != spec.embedding_dim or name != spec.name:
        index.close()
        raise IndexModelMismatch(
            f"{settings.index_dir} holds {dim}-d vectors of model {name!r}, but the server runs "
            f"{spec.name!r} ({spec.embedding_dim}-d): use an index built with this model"
        )
    return index


def _open_backend_at_lower_priority(settings: Settings) -> Backend:
    """ONNX Runtime's thread pool inherits the priority of the thread that creates the session."""
    result: list[Backend] = []
    errors: list[BaseException] = []

    def target() -> None:
        lower_current_thread_priority(settings.inference_nice)
        try:
            result.append(open_backend_from(settings))
        except BaseException as e:  # re-raised in the caller
            errors.append(e)

    t = threading.Thread(target=target, name="simsearch-open-backend")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


def open_resources(settings: Settings, metrics: Metrics, backend: Backend | None = None) -> Resources:
    """Blocking: loads the model and opens the index (call from a worker thread)."""
    owns_backend = backend is None
    backend = backend if backend is not None else _open_backend_at_lower_priority(settings)
    try:
        embedder = Embedder(
            backend,
            batch_size=settings.batch_size,
            decode_workers=settings.decode_workers,
            max_pixels=settings.max_pixels,
        )
        index = open_index(settings, embedder.spec)
    except BaseException:
        if owns_backend:
            backend.close()
        raise
    # the backend itself: the batcher's batches are at most batch_size, the backend's own limit
    batcher = MicroBatcher(
        backend.embed,
        max_batch_size=settings.batch_size,
        max_wait_s=settings.batch_wait_ms / 1000.0,
        queue_max=settings.queue_max,
        on_batch=metrics.observe_batch,
        thread_initializer=lambda: lower_current_thread_priority(settings.inference_nice),
    )
    pipeline = EmbedPipeline(
        embedder.spec, batcher, metrics, max_pixels=settings.max_pixels, decode_workers=settings.decode_workers
    )
    metrics.bind(queue_depth=lambda: batcher.depth, index_items=lambda: len(index))
    return Resources(
        settings=settings,
        metrics=metrics,
        backend=backend,
        embedder=embedder,
        index=index,
        batcher=batcher,
        pipeline=pipeline,
        committer=Committer(index.commit, interval_s=settings.commit_interval_ms / 1000.0),
        thumbnails=ThumbnailCache(size=settings.thumbnail_size, max_pixels=settings.max_pixels),
        uploads=UploadStore(Path(settings.index_dir) / UPLOADS_DIR),
        owns_backend=owns_backend,
    )


def close_resources(res: Resources) -> None:
    """Blocking; after the batcher and committer have stopped."""
    res.pipeline.close()
    res.index.close()
    if res.owns_backend:
        res.backend.close()


async def get_resources(request: Request) -> Resources:
    # async: a plain def dependency would cost a worker-thread round trip on every request
    res: Resources | None = getattr(request.app.state, "resources", None)
    if res is None:
        raise ApiError(503, "not_ready", "the server is starting or stopping", headers={"Retry-After": "1"})
    return res
