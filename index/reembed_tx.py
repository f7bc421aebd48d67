"""The model an index belongs to, and the re-embedding transactions that change it (driven by
index/reembed.py): two parts of ImageIndex.

`bind_model` declares the model whose vectors a handle writes (index/identity.py decides whether
the index is that model's); from then on every write of the handle is refused once the index
belongs to another model, e.g. after another process's switch.

A re-embedding fills the table `reembed_vectors` in committed batches (`begin_reembed`,
`stage_reembed`) that readers never see; `switch_reembed` then swaps every vector, the model
identity and the vector generation in one transaction, with a new base snapshot trained on the
new vectors (index/compaction.py), so readers go from the old model's vectors to the new ones in
one commit.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np

from embed.spec import ModelSpec
from index import compaction, identity
from index.faiss_file import remove_stale
from index.generation import load_index
from index.identity import ModelIdentity
from index.records import IndexedFile
from index.schema import IndexDirError, ensure_reembed_table, read_meta, write_meta

logger = logging.getLogger(__name__)

# what the item a re-embedding could not embed again becomes: dropped, with this record in the summary
Dropped = dict[str, Any]  # {"id", "path", "reason", "message"}
Staged = tuple[int, "np.ndarray | None", "Dropped | None"]


class ModelBinding:
    """Mixed into ImageIndex: uses its connection, locks, metadata and write path."""

    def bind_model(self, spec: ModelSpec | ModelIdentity) -> str:
        """Declare the model whose vectors this handle writes; returns the verdict of `identity.check`.

        Raises IndexModelMismatch when the index belongs to another model. An index with no
        fingerprint yet (just created, or built before fingerprints existed) records this one's.
        From now on every write on this handle is refused once the index belongs to another model.
        """
        given = spec if isinstance(spec, ModelIdentity) else ModelIdentity.of_spec(spec)
        with self._rw.write(), self._db:
            verdict = identity.check(self.meta, given, directory=self.directory)
            self._model = given
            fresh = not self.meta.get("model_history") and self._index.ntotal == 0
        if verdict == identity.ADOPT:
            if not fresh:
                identity.warn_if_unverified(verdict, self.directory, given)
            self._adopt(given, adopted=not fresh)
        else:
            identity.warn_if_unverified(verdict, self.directory, given)
        return verdict

    def _adopt(self, given: ModelIdentity, *, adopted: bool) -> None:
        try:
            self._acquire_tx()
            with self._rw.write(), self._db:
                self._begin()  # re-checks against the latest commit
                if not self.meta.get("model_fingerprint"):
                    updates = {"model_fingerprint": given.fingerprint, "vector_generation": 1,
                               "model_history": [history_entry(given, 1, self.generation, adopted=adopted)]}
                    write_meta(self._conn, updates)
                    self.meta.update(updates)
            self.commit()
        except sqlite3.OperationalError as e:  # a read-only index still serves
            self.rollback()
            logger.warning("cannot record the model fingerprint in %s: %s", self.directory, e)

    def _check_model(self, meta: Mapping[str, Any]) -> None:
        if self._model is not None:
            identity.check(meta, self._model, directory=self.directory)


class ReembedTransactions:
    """Mixed into ImageIndex: uses its connection, locks, metadata and write path."""

    @contextmanager
    def _side_tx(self, target: ModelIdentity) -> Iterator[sqlite3.Connection]:
        """A transaction on the side table only: no generation, readers see nothing of it."""
        with self._db:
            if self._closed or self._in_tx:
                raise IndexDirError(f"{self.directory}: finish (commit) the pending changes before re-embedding")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                ensure_reembed_table(self._conn)
                current = read_meta(self._conn).get("reembed") or {}
                if current and current.get("target") != target.as_meta():
                    raise IndexDirError(f"{self.directory}: another re-embedding (into "
                                        f"{ModelIdentity.of_index(current['target']).describe()}) started meanwhile")
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def begin_reembed(self, spec: ModelSpec) -> int:
        """Start re-embedding every item with `spec`'s model, or resume the one already started for
        it; returns how many items have their new vector already. Another model's unfinished
        re-embedding is discarded."""
        target = ModelIdentity.of_spec(spec)
        with self._db:
            current = read_meta(self._conn).get("reembed") or {}
        if current and current.get("target") != target.as_meta():
            logger.warning("%s: discarding an unfinished re-embedding into %s", self.directory,
                           ModelIdentity.of_index(current["target"]).describe())
            with self._db:
                self._conn.execute("BEGIN IMMEDIATE")
                ensure_reembed_table(self._conn)
                self._conn.execute("DELETE FROM reembed_vectors")
                write_meta(self._conn, {"reembed": {}})
                self._conn.execute("COMMIT")
        with self._side_tx(target) as conn:
            if not (read_meta(conn).get("reembed") or {}):
                conn.execute("DELETE FROM reembed_vectors")
                state = {"target": target.as_meta(), "started_at": time.time()}
                write_meta(conn, {"reembed": state})
                self.meta["reembed"] = state
            return int(conn.execute("SELECT COUNT(*) FROM reembed_vectors r JOIN items i ON i.id = r.id")
                       .fetchone()[0])

    def reembed_pending(self) -> list[IndexedFile]:
        """Items that have no vector of the new model yet (items added meanwhile included)."""
        with self._rw.read():
            rows = self._query("SELECT i.id, i.path, i.size, i.mtime, i.sha256 FROM items i "
                               "LEFT JOIN reembed_vectors r ON r.id = i.id WHERE r.id IS NULL ORDER BY i.id")
        return [IndexedFile(*r) for r in rows]

    def stage_reembed(self, spec: ModelSpec, staged: Iterable[Staged]) -> int:
        """Store new vectors (or the reason an item is dropped) in one committed batch."""
        target = ModelIdentity.of_spec(spec)
        with self._side_tx(target) as conn:
            return self._stage(conn, target, staged)

    def _stage(self, conn: sqlite3.Connection, target: ModelIdentity, staged: Iterable[Staged]) -> int:
        n = 0
        for item_id, vector, dropped in staged:
            if vector is not None:
                vector = np.asarray(vector, dtype="<f4")
                if vector.shape != (target.dim,):
                    raise ValueError(f"expected a vector of {target.dim} values, got {list(vector.shape)}")
            conn.execute("INSERT OR REPLACE INTO reembed_vectors (id, vector, error) VALUES (?, ?, ?)",
                         (int(item_id), None if vector is None else vector.tobytes(),
                          None if vector is not None else json.dumps(dropped or {})))
            n += 1
        return n

    def switch_reembed(self, spec: ModelSpec, embed_missing: Callable[[list[IndexedFile]], list[Staged]]) -> dict[str, Any]:
        """The atomic switch: one transaction swaps every vector, the model identity and the vector
        generation. Items still without a new vector (added meanwhile, e.g. by a server) are embedded
        here, under the write lock, by `embed_missing`; items that could not be embedded are dropped.
        Returns {"reembedded", "dropped": [...], "vector_generation"}; this handle is then bound to `spec`'s model.
        """
        target = ModelIdentity.of_spec(spec)
        if self._in_tx:
            raise IndexDirError(f"{self.directory}: commit the pending changes before the switch")
        bound, began, ok = self._model, False, False
        try:
            with self._rw.write(), self._db:
                self._model = None  # the index changes hands here: no check against the old model
                self._conn.execute("BEGIN IMMEDIATE")
                self._in_tx = began = True
                self._catch_up()
                ensure_reembed_table(self._conn)
                state = self.meta.get("reembed") or {}
                if state.get("target") != target.as_meta():
                    raise IndexDirError(f"{self.directory}: no re-embedding into {target.describe()} in progress")
                missing = [IndexedFile(*r) for r in self._conn.execute(
                    "SELECT i.id, i.path, i.size, i.mtime, i.sha256 FROM items i "
                    "LEFT JOIN reembed_vectors r ON r.id = i.id WHERE r.id IS NULL ORDER BY i.id")]
                if missing:
                    logger.info("embedding %d items added during the re-embedding", len(missing))
                    self._stage(self._conn, target, embed_missing(missing))
                dropped = [{"id": i, **json.loads(e)} for i, e in self._conn.execute(
                    "SELECT r.id, r.error FROM reembed_vectors r JOIN items i ON i.id = r.id "
                    "WHERE r.vector IS NULL ORDER BY r.id")]
                self._conn.execute("DELETE FROM items WHERE id IN (SELECT id FROM reembed_vectors WHERE vector IS NULL)")
                reembedded = self._conn.execute(
                    "UPDATE items SET vector = (SELECT r.vector FROM reembed_vectors r WHERE r.id = items.id)").rowcount
                self._conn.execute("DELETE FROM reembed_vectors")
                vector_generation = int(self.meta.get("vector_generation") or 1) + 1
                history = list(self.meta.get("model_history") or [])
                history.append(history_entry(target, vector_generation, self.generation + 1))
                updates: dict[str, Any] = {**target.as_meta(), "vector_generation": vector_generation,
                                           "model_history": history, "reembed": {}}
                write_meta(self._conn, updates)
                self.meta.update(updates)
                self.dim = target.dim
                # every vector changed: the base of the commit below, trained on the new vectors
                # (the old training fits the old model), built in this transaction
                generation = self.generation + 1
                base_updates, blob = compaction.build_base(self.directory, self._conn, self.meta, generation,
                                                           retrain=True)
                compaction.record_base(self._conn, generation, base_updates, blob)
                self.meta.update(base_updates)
                self._index = load_index(self.directory, self._conn, self.meta, write=False)
                self._model = target
            self.commit()
            ok = True
            remove_stale(self.directory, keep=generation)
        finally:
            if not ok:
                self._model = bound
                if began:
                    self.rollback()
        logger.info("%s: switched to %s (vector generation %d): %d re-embedded, %d dropped", self.directory,
                    target.describe(), vector_generation, reembedded, len(dropped))
        return {"reembedded": reembedded, "dropped": dropped, "vector_generation": vector_generation}


def history_entry(model: ModelIdentity, vector_generation: int, commit: int, *, adopted: bool = False) -> dict[str, Any]:
    entry = {"vector_generation": vector_generation, **model.as_meta(), "since_commit": commit, "at": time.time()}
    if adopted:
        entry["adopted"] = True  # recorded on first open by a model with a fingerprint, not proven
    return entry
