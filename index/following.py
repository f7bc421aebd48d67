"""How an ImageIndex follows other processes' commits and folds its own into new base snapshots.

`refresh()` reads, on a private connection with no lock held, only what changed since the commit
the handle serves (index/generation.py: rows added, ids removed; a new base is opened memory-
mapped instead), and applies it under a short write lock, so searches never wait for a read.
A commit whose delta outgrew its threshold (index/compaction.py: `due`) starts a compaction in a
background thread; `compact()` runs one now. Both end by following the commit they published.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from embed.spec import ModelSpec
from index import compaction, identity
from index.generation import Snapshot, read_committed, same_base
from index.identity import ModelIdentity
from index.schema import META_DEFAULTS, read_meta

logger = logging.getLogger(__name__)


class FollowingCommits:
    """Mixed into ImageIndex: uses its connection, locks, metadata and vector index."""

    def peek_meta(self) -> dict[str, Any]:
        """The metadata as committed on disk now (cheap: one small query)."""
        with self._db:
            return read_meta(self._conn)

    def load_committed(self) -> Snapshot:
        """The latest commit's metadata and FAISS index, loaded with no lock held (slow part of refresh)."""
        return read_committed(self.directory)

    def swap_in(self, snapshot: Snapshot, *, model: ModelSpec | ModelIdentity | None = None) -> bool:
        """Serve `snapshot` from now on (a short write lock); `model` rebinds the handle to the
        model that wrote it. False (nothing changed) when this handle is at that commit or later,
        or has uncommitted writes of its own."""
        given = model if model is None or isinstance(model, ModelIdentity) else ModelIdentity.of_spec(model)
        if (target := given or self._model) is not None:
            identity.check(snapshot.meta, target, directory=self.directory)
        with self._rw.write():
            if self._closed or self._in_tx or snapshot.generation <= self.generation:
                return False
            if snapshot.index is None:  # the changes since a generation: only onto that generation
                if snapshot.since != self.generation or not same_base(snapshot.meta, self.meta):
                    return False
                snapshot.apply_to(self._index)
            else:
                self._index = snapshot.index
            self.meta, self.dim = {**META_DEFAULTS, **snapshot.meta}, int(snapshot.meta["dim"])
            if given is not None:
                self._model = given
        logger.debug("%s: now serving commit %d (%d vectors)", self.directory, snapshot.generation, len(self))
        return True

    def refresh(self) -> bool:
        """Pick up commits made by another process (e.g. `index build` while a server runs).

        Raises IndexModelMismatch, keeping what it has, when the new commit belongs to another
        model than the bound one (the caller decides: load that model, or report it).
        """
        if self._closed:
            return False
        meta = self.peek_meta()
        if int(meta["generation"]) == self.generation:
            return False
        self._check_model(meta)
        with self._rw.read():
            since = (dict(self.meta), self._index.last_id)
        # the changes since our commit when the base is the same (rows added, ids removed), else all
        return self.swap_in(read_committed(self.directory, since=since))

    # -- compaction: a new base snapshot -----------------------------------------------------
    def compact(self, *, retrain: bool = False) -> dict[str, Any] | None:
        """Fold every committed change into a new base snapshot now and serve it; `retrain` trains
        the index again (kind, lists, codebooks) and tunes its search parameters by measured recall.
        Commits pending changes first. Returns the published metadata updates, or None when the
        snapshot went stale (e.g. another process switched the model meanwhile)."""
        self._commit()
        self.wait_compaction()
        updates = compaction.compact(self.directory, retrain=retrain)
        self.refresh()
        return updates

    def wait_compaction(self, timeout: float | None = None) -> None:
        """Wait for this handle's background compaction, if one runs."""
        thread = self._compactor
        if thread is not None:
            thread.join(timeout)

    def _start_compaction(self, reason: str) -> None:
        with self._compact_lock:
            if self._closed or (self._compactor is not None and self._compactor.is_alive()):
                return
            self._compactor = threading.Thread(target=self._compact_in_background, args=(reason,),
                                               name="simsearch-index-compaction", daemon=True)
            self._compactor.start()

    def _compact_in_background(self, reason: str) -> None:
        logger.info("%s: compacting (%s)", self.directory, reason)
        try:
            if compaction.compact(self.directory, wait=False, should_stop=lambda: self._closed) is not None:
                self.refresh()
        except compaction.Cancelled:
            logger.info("%s: compaction cancelled (the index closed)", self.directory)
        except Exception as e:  # the delta keeps serving; the next commit tries again
            logger.warning("%s: compaction failed: %s: %s", self.directory, type(e).__name__, e)
