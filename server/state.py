"""The long-lived objects one app holds, opened in `lifespan` and handed to routes by `get_resources`.

The index handle is bound to the served model (index/identity.py): an index of another model is
refused at start with the one-line IndexModelMismatch, and writes are refused by the store when the
index changes hands while the server runs. The model is a LiveBackend, so the index watcher
(server/live_index.py) can replace it together with the index after a `--reembed` switch.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import Request

from embed.backends import open_backend
from embed.backends.base import Backend
from embed.embedder import Embedder
from embed.spec import ModelDirError, ModelSpec, model_dir_fingerprint
from index import identity, whitening
from index.identity import IndexModelMismatch
from index.schema import DB_FILE, UPLOADS_DIR, read_meta
from index.store import ImageIndex
from server.batcher import MicroBatcher
from server.committer import Committer
from server.errors import ApiError
from server.live_index import IndexWatcher, LiveBackend
from server.metrics import Metrics
from server.pipeline import EmbedPipeline
from server.priority import lower_current_thread_priority
from server.settings import Settings
from server.thumbnails import ThumbnailCache
from server.upload_store import UploadStore

log = logging.getLogger(__name__)

__all__ = ["UPLOADS_DIR", "IndexModelMismatch", "Resources", "get_resources", "open_resources", "preflight"]


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
    watcher: IndexWatcher
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
    """The index, bound to the served model; a new one (none at `index_dir` yet) adopts it."""
    if (Path(settings.index_dir) / DB_FILE).is_file():
        index = ImageIndex.open(settings.index_dir)
    else:
        index = ImageIndex.create(settings.index_dir, spec.embedding_dim, model_name=spec.name,
                                  model_version=spec.version, memory_budget=settings.index_memory_budget,
                                  whiten=whitening.DEFAULT_MODE)  # as `index build` creates one
    try:
        index.bind_model(spec)  # IndexModelMismatch: the one-line error `simsearch serve` exits with
    except BaseException:
        index.close()
        raise
    return index


def served_spec(settings: Settings) -> ModelSpec:
    """The spec (with its fingerprint) of the model `settings` serve, without an inference session
    for a model directory."""
    if settings.model_dir is not None:
        model_dir = Path(settings.model_dir).resolve()
        spec = ModelSpec.load(model_dir)
        return spec if spec.fingerprint else replace(spec, fingerprint=model_dir_fingerprint(model_dir, spec))
    backend = open_backend_from(settings)
    try:
        return backend.spec
    finally:
        backend.close()


def prepare_index(settings: Settings) -> None:
    """Create the index (or bind an old one to the served model) once, before several worker
    processes open it: N processes creating one directory at the same moment would race."""
    open_index(settings, served_spec(settings)).close()


def preflight(settings: Settings) -> str | None:
    """The one-line reason the server cannot serve this index with this model, checked before
    uvicorn starts (so it exits with that line, not a traceback); None when it can."""
    if settings.model_dir is not None:  # a mistyped --model: its one line, before any index work
        try:
            ModelSpec.load(Path(settings.model_dir))
        except ModelDirError as e:
            return str(e)
    db = Path(settings.index_dir) / DB_FILE
    if not db.is_file():
        return None
    try:
        spec = served_spec(settings)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            meta = read_meta(conn)
        finally:
            conn.close()
        identity.check(meta, spec, directory=settings.index_dir)
    except IndexModelMismatch as e:
        return str(e)
    except Exception as e:  # anything else surfaces where it always did, when the app starts
        log.debug("preflight skipped: %s", e)
    return None


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
    # replaceable while serving: the watcher swaps in the new model after a --reembed switch
    backend = LiveBackend(backend if backend is not None else _open_backend_at_lower_priority(settings),
                          owned=owns_backend)
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

    def on_model(spec: ModelSpec) -> None:
        pipeline.spec = spec  # uploads are decoded for the new model from now on

    watcher = IndexWatcher(
        index, backend, load_model=lambda: open_backend_from(settings), model_dir=settings.model_dir,
        on_model=on_model, metrics=metrics,
        thread_initializer=lambda: lower_current_thread_priority(settings.inference_nice),
    )
    metrics.bind_index(generation=lambda: index.generation, mismatch=lambda: float(watcher.mismatch is not None))
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
        watcher=watcher,
        owns_backend=owns_backend,
    )


def close_resources(res: Resources) -> None:
    """Blocking; after the batcher and committer have stopped."""
    res.watcher.stop()
    res.pipeline.close()
    res.index.close()
    res.backend.close()  # a LiveBackend: closes only what the server opened itself


async def get_resources(request: Request) -> Resources:
    # async: a plain def dependency would cost a worker-thread round trip on every request
    res: Resources | None = getattr(request.app.state, "resources", None)
    if res is None:
        raise ApiError(503, "not_ready", "the server is starting or stopping", headers={"Retry-After": "1"})
    return res
