"""The live index: a running server follows the commits other processes make to its index.

A watcher thread polls the committed generation in SQLite every `POLL_S` (0.25 s; one small
query). On a new commit it reads, on its own connection and with no lock held, only what changed
since the commit it serves (`ImageIndex.refresh`, index/generation.py): the rows added (ids above
the largest it has) and the ids removed (the `removed` log), and applies them to its in-memory
delta under a short write lock (a copy of the new rows; searches never wait for SQLite). When the
commit published a new base snapshot (a compaction, a retrain, a re-embedding), the new base is
opened memory-mapped instead, which takes milliseconds whatever its size, and swapped in. Latency:
a commit is searchable within `POLL_S` + the time to read its new rows, well inside 2 s, at any
index size; nothing is re-read in proportion to the collection.

When a commit changes the model the index belongs to (a `--reembed` switch), the index handle
refuses it (it is bound to the server's model). The watcher then loads the model again from the
settings (the model directory is published atomically by export, so after a re-export it holds
the new model; over Triton, what the server serves now) and, when that model is the index's,
swaps the model and the index in together. When it is not, the server keeps answering searches
from what it has (the old model and the old vectors, which agree), reports itself not ready and
mismatched (`/readyz`, `simsearch_index_model_mismatch`), logs the one-line error, refuses writes
(503 `model_mismatch`, from the store itself), and tries again every `RETRY_S` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embed.backends.base import Backend
from embed.spec import ModelDirError, ModelSpec, model_dir_fingerprint
from index import identity
from index.identity import IndexModelMismatch, ModelIdentity
from index.store import ImageIndex
from server.metrics import Metrics

log = logging.getLogger(__name__)

POLL_S = 0.25
RETRY_S = 5.0  # a mismatched server tries its model again this often
OLD_MODEL_GRACE_S = 30.0  # a replaced backend is closed this long after the swap (batches in flight)


class LiveBackend:
    """The Backend protocol over a model that can be replaced while requests run."""

    def __init__(self, backend: Backend, *, owned: bool) -> None:
        self._backend = backend
        self._owned = owned

    @property
    def current(self) -> Backend:
        return self._backend

    @property
    def spec(self) -> ModelSpec:
        return self._backend.spec

    @property
    def max_batch_size(self) -> int:
        return self._backend.max_batch_size

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self._backend.embed(batch)

    def ready(self) -> bool:
        return self._backend.ready()

    def swap(self, backend: Backend) -> tuple[Backend, bool]:
        """Serve `backend` (owned) from now on; returns the old one and whether it is ours to close."""
        old, owned = self._backend, self._owned
        self._backend, self._owned = backend, True
        return old, owned

    def close(self) -> None:
        if self._owned:
            self._backend.close()


class IndexWatcher:
    """Polls the index for other processes' commits and follows them (see the module docstring)."""

    def __init__(self, index: ImageIndex, backend: LiveBackend, *, load_model: Callable[[], Backend],
                 model_dir: Path | None, on_model: Callable[[ModelSpec], None], metrics: Metrics,
                 thread_initializer: Callable[[], object] = lambda: None, poll_s: float = POLL_S) -> None:
        self.index, self.backend = index, backend
        self._load_model, self._model_dir, self._on_model = load_model, model_dir, on_model
        self._metrics, self._init, self.poll_s = metrics, thread_initializer, poll_s
        self.mismatch: str | None = None  # the one-line error while the model is not the index's
        self._retry_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timers: list[threading.Timer] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="simsearch-index-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for timer in self._timers:
            timer.cancel()
            timer.function()  # close the replaced backends now

    def _run(self) -> None:
        self._init()
        last_error = ""
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
                last_error = ""
            except Exception as e:  # e.g. a file system hiccup: keep serving, try again next poll
                if str(e) != last_error:
                    log.warning("following %s: %s: %s", self.index.directory, type(e).__name__, e)
                last_error = str(e)

    def tick(self) -> None:
        """One poll: pick up a new commit, or retry a mismatched model."""
        if self.mismatch is not None and time.monotonic() < self._retry_at:
            return
        meta = self.index.peek_meta()
        if int(meta["generation"]) == self.index.generation:
            return
        started = time.perf_counter()
        try:
            if self.index.refresh():
                self._metrics.index_reloads.labels("vectors").inc()
                self._metrics.index_reload_seconds.set(time.perf_counter() - started)
            self._set_mismatch(None)
        except IndexModelMismatch as e:
            self._follow_model(meta, str(e))

    def _follow_model(self, meta: dict, error: str) -> None:
        """The index now belongs to another model: serve that model too, if the settings give it."""
        self._retry_at = time.monotonic() + RETRY_S
        wanted = ModelIdentity.of_index(meta)
        if not self._might_be(wanted):
            self._set_mismatch(error)
            return
        started = time.perf_counter()
        try:
            new = self._load_model()
        except Exception as e:  # a half-published or unreachable model: report, retry later
            self._set_mismatch(f"{error} (reloading the model failed: {e})")
            return
        try:
            snapshot = self.index.load_committed()
            identity.check(snapshot.meta, new.spec, directory=self.index.directory)
            if not self.index.swap_in(snapshot, model=new.spec):
                raise IndexModelMismatch("the index has uncommitted writes of the old model; retrying")
        except IndexModelMismatch as e:
            new.close()
            self._set_mismatch(str(e))
            return
        old, owned = self.backend.swap(new)
        self._on_model(new.spec)
        if owned:
            timer = threading.Timer(OLD_MODEL_GRACE_S, old.close)
            timer.daemon = True
            timer.start()
            self._timers.append(timer)
        self._metrics.index_reloads.labels("model").inc()
        self._metrics.index_reload_seconds.set(time.perf_counter() - started)
        log.info("%s switched to %s: now serving that model (%.2f s)", self.index.directory,
                 ModelIdentity.of_spec(new.spec).describe(), time.perf_counter() - started)
        self._set_mismatch(None)

    def _might_be(self, wanted: ModelIdentity) -> bool:
        """Cheap look at the model directory (no model load): could it hold the index's model?"""
        if self._model_dir is None:
            return True  # Triton: only asking it tells
        try:
            found = model_dir_fingerprint(self._model_dir.resolve())
        except (ModelDirError, OSError):
            return True  # mid-publish or unreadable: loading reports the real error
        return found == wanted.fingerprint or not wanted.fingerprint

    def _set_mismatch(self, message: str | None) -> None:
        if message != self.mismatch:
            if message is not None:
                log.error("%s", message)
            elif self.mismatch is not None:
                log.info("the model matches %s again", self.index.directory)
        self.mismatch = message
