"""ImageIndex: a FAISS index with its metadata in SQLite, crash-safe.

    INDEX_DIR/
      index.sqlite            the source of truth (WAL, synchronous=FULL): one row per item with
                              its float32 vector, the metadata table, the trained IVF if any
      vectors.<G>.faiss       a cache of the FAISS index, written atomically after commit number G

Every `commit()` is one SQLite transaction that also increments the generation G; only then is the
FAISS file for G written (embed/atomic.py: temporary file + fsync + os.replace). On open, a missing
FAISS file for the current G (a crash between the two steps) or one whose size disagrees with the
rows is rebuilt from the rows. So after kill -9 at any moment the directory opens, and the FAISS
ids are exactly the SQLite row ids. Changes not yet committed are lost by a crash, never half-applied.

Thread safety: a readers-writer lock; searches and reads run concurrently, writes are exclusive.
Several processes may write one index (SQLite serialises their transactions); a writer that finds
another's commit reloads first. `refresh()` lets a long-lived reader pick up others' commits: the
new generation is loaded on a private connection with no lock held and swapped in under a short
write lock, so searches never wait for a load (index/generation.py).

Model identity (index/identity.py): the metadata records the model that wrote the vectors
(`model_fingerprint`, `model_name`, `model_version`, `dim`), a `vector_generation` number and a
`model_history` entry per vector generation. A handle told its model with `bind_model` refuses
every write (IndexModelMismatch) once the index belongs to another model, e.g. after another
process's `--reembed` switch, so vectors of two models never meet in one index. A re-embedding
fills the table `reembed_vectors` in committed batches (`begin_reembed`, `stage_reembed`); readers
keep the old vectors until `switch_reembed` swaps all of them, the identity and the generation in
one transaction.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from embed.spec import ModelSpec
from index import compaction, identity, tuning, whitening
from index import vector_index as vi
from index.budget import parse_bytes
from index.dir_init import create_in_place
from index.faiss_file import base_paths, file_bytes, remove_stale
from index.generation import Snapshot, load_index, read_changes, read_committed, same_base
from index.identity import IndexModelMismatch, ModelIdentity
from index.ranked import filtered_nprobe, top_n
from index.records import COLUMNS, Hit, IndexedFile, ItemRecord, record_from_row, record_values
from index.rwlock import RWLock
from index.schema import (
    DB_FILE,
    FORMAT,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    IndexDirError,
    ensure_reembed_table,
    log_removed,
    read_meta,
    write_meta,
)
from index.selectors import IdSet, search_selector, with_selector

logger = logging.getLogger(__name__)

WRITE_LOCK_TIMEOUT_S = 60.0  # longest wait for another process's write transaction
_LOCK_POLL_S = 0.05

__all__ = ["Hit", "ImageIndex", "IndexDirError", "IndexModelMismatch", "ItemRecord", "Snapshot"]

# Keys an index of format 1 lacks (docs/design.md, "The index directory"): a base-less index
# (every row in the delta) with the default budget and recall target.
_META_DEFAULTS: dict[str, Any] = {
    "index_kind": "flat", "nlist": 0, "nprobe": 0, "k_factor": 0, "pq_m": 0, "opq": False, "rerank": False,
    "trained_on": 0, "training_size": 0, "memory_budget": 0, "recall_target": tuning.DEFAULT_RECALL_TARGET,
    "recall_estimate": {}, "base_generation": 0, "base_hwm": 0, "base_count": 0, "base_build": {},
    "whiten": "off", "whitening_fitted_on": 0,  # an index from before whitening: off until configured
}


def _check_target(target: float) -> float:
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"the recall target is a share of the exact top 10 in (0, 1], got {target}")
    return float(target)


# what the item a re-embedding could not embed again becomes: dropped, with this record in the summary
Dropped = dict[str, Any]  # {"id", "path", "reason", "message"}
Staged = tuple[int, "np.ndarray | None", "Dropped | None"]


class ImageIndex:
    """Vectors + records; see the module docstring for the files and the crash-safety argument."""

    def __init__(self, directory: Path, conn: sqlite3.Connection) -> None:
        self.directory = directory
        self._conn = conn
        self._db = threading.Lock()  # one connection: calls on it are serialised
        self._rw = RWLock()
        self._in_tx = False
        self._fresh_tx = False  # a transaction begun by _acquire_tx, not yet caught up
        self._closed = False
        self._model: ModelIdentity | None = None  # the model this handle writes vectors of
        self._compactor: threading.Thread | None = None  # a background compaction (index/compaction.py)
        self._compact_lock = threading.Lock()
        conn.execute("BEGIN")  # meta and rows of one commit
        try:
            self.meta = read_meta(conn)
            if self.meta.get("format") != FORMAT or int(self.meta.get("format_version", -1)) not in READABLE_VERSIONS:
                raise IndexDirError(f"{directory} is not a {FORMAT} index directory of a version this software "
                                    f"reads {list(READABLE_VERSIONS)}")
            self.meta = {**_META_DEFAULTS, **self.meta}
            self.dim = int(self.meta["dim"])
            self._index = load_index(directory, conn, self.meta, write=True)
        finally:
            conn.execute("ROLLBACK")

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def create(
        cls, directory: str | os.PathLike[str], dim: int, *, model_name: str = "", model_version: int = 0,
        root: str | None = None, index_mode: str = "auto", flat_max: int = vi.FLAT_MAX_VECTORS,
        memory_budget: int | str | None = None, recall_target: float = tuning.DEFAULT_RECALL_TARGET,
        whiten: str = "off",
    ) -> ImageIndex:
        """A new, empty index in `directory` (missing, or an existing empty directory such as a
        volume mount): built in place, writing only inside it, crash-safe (index/dir_init.py).
        `whiten` is off here, a plain vector index; `index build` and the server create theirs with
        index/whitening.py's DEFAULT_MODE."""
        directory = Path(directory)
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        vi.plan_index(0, dim, index_mode)  # ValueError naming the valid modes
        create_in_place(directory, {
            **_META_DEFAULTS, "format": FORMAT, "format_version": FORMAT_VERSION, "dim": dim,
            "model_name": model_name, "model_version": model_version, "root": root or "", "generation": 0,
            "index_mode": index_mode, "flat_max": flat_max, "created_at": time.time(),
            "memory_budget": parse_bytes(memory_budget), "recall_target": _check_target(recall_target),
            "whiten": whitening.check_mode(whiten),
        })
        return cls.open(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> ImageIndex:
        directory = Path(directory)
        if not (directory / DB_FILE).is_file():
            raise FileNotFoundError(f"{directory} is not an index directory ({DB_FILE} is missing)")
        conn = sqlite3.connect(directory / DB_FILE, isolation_level=None, check_same_thread=False, timeout=60)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return cls(directory, conn)

    @classmethod
    def open_or_create(cls, directory: str | os.PathLike[str], dim: int, **kw: Any) -> ImageIndex:
        directory = Path(directory)
        if (directory / DB_FILE).is_file():
            idx = cls.open(directory)
            if idx.dim != dim:
                idx.close()
                raise IndexDirError(f"{directory} holds {idx.dim}-dimensional vectors, not {dim}")
            return idx
        return cls.create(directory, dim, **kw)

    @property
    def generation(self) -> int:
        """The commit this handle's vectors are from."""
        return int(self.meta["generation"])

    @property
    def model(self) -> ModelIdentity:
        """The model that wrote the vectors, as the index records it."""
        return ModelIdentity.of_index(self.meta)

    # -- model identity ----------------------------------------------------------------------
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
                               "model_history": [_history_entry(given, 1, self.generation, adopted=adopted)]}
                    write_meta(self._conn, updates)
                    self.meta.update(updates)
            self.commit()
        except sqlite3.OperationalError as e:  # a read-only index still serves
            self.rollback()
            logger.warning("cannot record the model fingerprint in %s: %s", self.directory, e)

    def _check_model(self, meta: Mapping[str, Any]) -> None:
        if self._model is not None:
            identity.check(meta, self._model, directory=self.directory)

    # -- following other processes' commits --------------------------------------------------
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
            self.meta, self.dim = {**_META_DEFAULTS, **snapshot.meta}, int(snapshot.meta["dim"])
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

    # -- writing -----------------------------------------------------------------------------
    def _acquire_tx(self) -> None:
        """Wait for SQLite's write lock holding none of ours: while another process (`index build`)
        holds it, this handle's searches and reads go on; only the write waits."""
        deadline = time.monotonic() + WRITE_LOCK_TIMEOUT_S
        while True:
            with self._db:
                if self._closed or self._in_tx:
                    return  # _begin reports a closed index; an open transaction is ours already
                self._conn.execute(f"PRAGMA busy_timeout = {int(_LOCK_POLL_S * 1000)}")
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    self._in_tx = self._fresh_tx = True
                    return
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                finally:
                    self._conn.execute(f"PRAGMA busy_timeout = {int(WRITE_LOCK_TIMEOUT_S * 1000)}")
            time.sleep(_LOCK_POLL_S)

    def _begin(self) -> None:
        """Open the write transaction (SQLite's write lock) and catch up with other processes."""
        if self._closed:
            raise IndexDirError(f"index {self.directory} is closed")
        if not self._in_tx:
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_tx = self._fresh_tx = True
        if self._fresh_tx:
            try:
                self._catch_up()
            except BaseException:  # e.g. IndexModelMismatch: nothing was written, keep what we serve
                self._conn.execute("ROLLBACK")
                self._in_tx = self._fresh_tx = False
                raise
            self._fresh_tx = False

    def _catch_up(self) -> bool:
        """Another process committed since we last looked: reload the metadata and the vectors.

        A handle bound to a model refuses (IndexModelMismatch) before reloading anything when the
        index now belongs to another model, so it never adds its vectors to the new generation.
        """
        generation = json.loads(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
        if generation == self.meta["generation"]:
            return False
        meta = {**_META_DEFAULTS, **read_meta(self._conn)}
        self._check_model(meta)
        logger.debug("%s changed on disk (commit %s -> %s)", self.directory, self.meta["generation"], generation)
        if same_base(meta, self.meta):
            read_changes(self._conn, meta, int(self.meta["generation"]), self._index.last_id).apply_to(self._index)
        else:
            self._index = load_index(self.directory, self._conn, meta, write=not self._in_tx)
        self.meta, self.dim = meta, int(meta["dim"])
        return True

    def add(self, vectors: np.ndarray, records: Iterable[ItemRecord | Mapping[str, Any]]) -> list[int]:
        """Add vectors [N, D] with their records; returns the new ids. Durable after `commit()`."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        values = [record_values(r) for r in records]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(values):
            raise ValueError(f"expected vectors [{len(values)}, {self.dim}], got {list(vectors.shape)}")
        if not len(values):
            return []
        self._acquire_tx()
        with self._rw.write(), self._db:
            self._begin()
            ids = []
            for vals, vec in zip(values, vectors, strict=True):
                cur = self._conn.execute(
                    "INSERT INTO items (path, size, mtime, sha256, width, height, added_at, metadata, vector)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (*vals, vec.astype("<f4").tobytes()))
                ids.append(int(cur.lastrowid))
            self._index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            return ids

    def remove(self, ids: Iterable[int]) -> int:
        """Remove items by id; returns how many existed. Durable after `commit()`."""
        ids = sorted({int(i) for i in ids})
        if not ids:
            return 0
        self._acquire_tx()
        with self._rw.write(), self._db:
            self._begin()
            gone: list[int] = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                gone += [r[0] for r in self._conn.execute(f"DELETE FROM items WHERE id IN ({marks}) RETURNING id", chunk)]
            # logged with the commit that will make it durable: readers following commits drop exactly these
            log_removed(self._conn, gone, self.generation + 1)
            self._index.remove_ids(np.asarray(gone, dtype=np.int64))
            return len(gone)

    def update(self, id: int, **fields: Any) -> bool:
        """Change a record's fields (not its vector): path, size, mtime, width, height, metadata."""
        allowed = ("path", "size", "mtime", "width", "height", "metadata")
        unknown = sorted(set(fields) - set(allowed))
        if unknown:
            raise ValueError(f"cannot update {unknown}; updatable fields: {list(allowed)}")
        if "metadata" in fields:
            fields["metadata"] = json.dumps(fields["metadata"] or {}, sort_keys=True)
        if not fields:
            return self.get(id) is not None
        self._acquire_tx()
        with self._rw.write(), self._db:
            self._begin()
            sets = ", ".join(f"{k} = ?" for k in fields)
            cur = self._conn.execute(f"UPDATE items SET {sets} WHERE id = ?", (*fields.values(), int(id)))
            return cur.rowcount > 0

    def commit(self) -> None:
        """Make every change so far durable: one SQLite transaction. Nothing else is written: the
        new vectors are in every reader's delta; a compaction folds them into a new base snapshot
        when one is due (in a background thread: searches and writes go on)."""
        reason = self._commit()
        if reason is not None:
            self._start_compaction(reason)

    def _commit(self) -> str | None:
        """The SQLite commit; returns why a compaction is due, if one is."""
        with self._rw.write(), self._db:
            if not self._in_tx:
                return None
            if self._fresh_tx:  # begun by a write that has not caught up yet: nothing to commit
                self._conn.execute("ROLLBACK")
                self._in_tx = self._fresh_tx = False
                return None
            generation = int(self.meta["generation"]) + 1
            write_meta(self._conn, {"generation": generation, "committed_at": time.time()})
            self._conn.execute("COMMIT")
            self._in_tx = False
            self.meta["generation"] = generation
            return compaction.due(self.meta, self._index)

    save = commit

    def rollback(self) -> None:
        """Drop every change since the last commit (vectors included)."""
        with self._rw.write(), self._db:
            if not self._in_tx:
                return
            self._conn.execute("ROLLBACK")
            self._in_tx = self._fresh_tx = False
            self.meta = {**_META_DEFAULTS, **read_meta(self._conn)}
            self.dim = int(self.meta["dim"])
            self._index = load_index(self.directory, self._conn, self.meta, write=True)

    # -- compaction: a new base snapshot (index/compaction.py) -------------------------------
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

    def configure(self, *, memory_budget: int | str | None = None, recall_target: float | None = None,
                  index_mode: str | None = None, whiten: str | None = None) -> None:
        """Record another memory budget, recall target or index mode; with the next commit, and
        used from the next compaction (`compact(retrain=True)` to apply it now)."""
        updates: dict[str, Any] = {}
        if memory_budget is not None:
            updates["memory_budget"] = parse_bytes(memory_budget)
        if recall_target is not None:
            updates["recall_target"] = _check_target(recall_target)
        if index_mode is not None:
            vi.plan_index(0, self.dim, index_mode)  # ValueError naming the valid modes
            updates["index_mode"] = index_mode
        if whiten is not None:  # fitted, refitted or dropped by the next compaction (compaction.due)
            updates["whiten"] = whitening.check_mode(whiten)
        updates = {k: v for k, v in updates.items() if self.meta.get(k) != v}
        if not updates:
            return
        self._acquire_tx()
        with self._rw.write(), self._db:
            self._begin()
            write_meta(self._conn, updates)
            self.meta.update(updates)

    def set_info(self, **values: Any) -> None:
        """Free-form facts about the index (e.g. which model built it), saved with the next commit."""
        self._acquire_tx()
        with self._rw.write(), self._db:
            self._begin()
            write_meta(self._conn, {f"info.{k}": v for k, v in values.items()})
            self.meta.update({f"info.{k}": v for k, v in values.items()})

    def adopt_root(self, root: str) -> None:
        """Give an index created without a folder (by the server) the folder it indexes; with the next commit."""
        self._acquire_tx()
        with self._rw.write(), self._db:
            self._begin()
            current = self.meta.get("root") or ""
            if current and current != root:
                raise IndexDirError(f"{self.directory} indexes the folder {current}, not {root}")
            write_meta(self._conn, {"root": root})
            self.meta["root"] = root

    # -- re-embedding into a new vector generation (driven by index/reembed.py) ---------------
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
                history.append(_history_entry(target, vector_generation, self.generation + 1))
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

    def info(self) -> dict[str, Any]:
        with self._rw.read():
            return {k[5:]: v for k, v in self.meta.items() if k.startswith("info.")}

    def close(self) -> None:
        """Commit what is pending, let a running compaction finish, and release the files."""
        if self._closed:
            return
        self.commit()
        self.wait_compaction()
        with self._rw.write(), self._db:
            self._conn.close()
            self._closed = True

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------
    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db:
            return self._conn.execute(sql, args).fetchall()

    def get(self, id: int) -> ItemRecord | None:
        with self._rw.read():
            rows = self._query(f"SELECT {COLUMNS} FROM items WHERE id = ?", (int(id),))
        return record_from_row(rows[0]) if rows else None

    def get_by_path(self, path: str) -> ItemRecord | None:
        with self._rw.read():
            rows = self._query(f"SELECT {COLUMNS} FROM items WHERE path = ? ORDER BY id LIMIT 1", (path,))
        return record_from_row(rows[0]) if rows else None

    def find_by_sha256(self, sha256: str) -> list[ItemRecord]:
        """Every record whose file content has this sha256 (oldest first); [] when none."""
        with self._rw.read():
            rows = self._query(f"SELECT {COLUMNS} FROM items WHERE sha256 = ? ORDER BY id", (sha256,))
        return [record_from_row(r) for r in rows]

    def records(self) -> list[ItemRecord]:
        with self._rw.read():
            return [record_from_row(r) for r in self._query(f"SELECT {COLUMNS} FROM items ORDER BY id")]

    def files(self) -> list[IndexedFile]:
        """(id, path, size, mtime, sha256) of every item: what an incremental build compares against."""
        with self._rw.read():
            rows = self._query("SELECT id, path, size, mtime, sha256 FROM items ORDER BY id")
        return [IndexedFile(*r) for r in rows]

    def vector(self, id: int) -> np.ndarray | None:
        with self._rw.read():
            rows = self._query("SELECT vector FROM items WHERE id = ?", (int(id),))
        return np.frombuffer(rows[0][0], dtype="<f4").astype(np.float32) if rows else None

    def ids(self) -> list[int]:
        with self._rw.read():
            return [r[0] for r in self._query("SELECT id FROM items ORDER BY id")]

    def __len__(self) -> int:
        with self._rw.read():
            return int(self._index.ntotal)

    def search(
        self, queries: np.ndarray, k: int, *, params: dict[str, Any] | None = None,
        allowed_ids: IdSet | Iterable[int] | np.ndarray | None = None, exclude_ids: Iterable[int] | None = None,
        offset: int = 0, min_score: float | None = None,
    ) -> list[list[Hit]]:
        """Top-`k` by inner product for each query [Q, D], after the best `offset`.

        `params` e.g. {"nprobe": 32} for IVF. `allowed_ids` (a filter's ids, index/filters.py) and
        `exclude_ids` (e.g. the item searched by) are applied inside the FAISS scan (an ID selector),
        so k hits come back whenever k items pass. On IVF a filter scans nprobe / (fraction passing)
        lists, and every list when that still finds fewer than k. `min_score` drops hits under that
        cosine. Hits are ordered by score, then id (index/ranked.py): the pages of one query at the
        same parameters are disjoint and together the top of one search.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        allowed = None if allowed_ids is None else IdSet.of(allowed_ids)
        exclude = None if exclude_ids is None else np.unique(np.fromiter((int(i) for i in exclude_ids), np.int64))
        with self._rw.read():  # the dimension is checked under the lock: a re-embedding may change it
            if queries.ndim != 2 or queries.shape[1] != self.dim:
                raise ValueError(f"expected queries [Q, {self.dim}], got {list(queries.shape)}")
            kind = self.meta["index_kind"]
            sp = vi.search_parameters(kind, params, {"nprobe": int(self.meta["nprobe"]),
                                                     "k_factor": int(self.meta["k_factor"])})
            ntotal, n = self._index.ntotal, offset + k
            if ntotal == 0 or (allowed is not None and allowed.count == 0):
                return [[] for _ in range(len(queries))]
            ivf_filtered = allowed is not None and kind in vi.IVF_KINDS
            if ivf_filtered:
                sp.nprobe = filtered_nprobe(sp.nprobe, int(self.meta["nlist"]), allowed.count, ntotal)
            sp = with_selector(sp, search_selector(allowed, exclude))

            def run(q: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
                return self._index.search(q, m, params=sp)

            rows = top_n(run, queries, n, ntotal)
            passing = min(n, allowed.count - (int(allowed.contains(exclude).sum()) if exclude is not None else 0)
                          if allowed is not None else ntotal)
            if ivf_filtered and sp.nprobe < int(self.meta["nlist"]) and any(len(i) < passing for _, i in rows):
                sp.nprobe = int(self.meta["nlist"])  # the filter's items sit in other lists: scan them all
                rows = top_n(run, queries, n, ntotal)
            rows = [(s[offset:], i[offset:]) for s, i in rows]
            if min_score is not None:
                # whitened scores are cosines in the whitened space; `min_score` stays a raw cosine,
                # the scale duplicate thresholds use too (index/README.md, "Whitening")
                sims = [s for s, _ in rows] if self._index.whitening is None else self._raw_cosines(queries, rows)
                rows = [(s[c >= min_score], i[c >= min_score]) for (s, i), c in zip(rows, sims, strict=True)]
            wanted = sorted({int(i) for _, irow in rows for i in irow})
            found: dict[int, ItemRecord] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._query(f"SELECT {COLUMNS} FROM items WHERE id IN ({marks})", tuple(chunk)):
                    found[int(row[0])] = record_from_row(row)
        return [
            [Hit(int(i), float(s), found[int(i)]) for s, i in zip(srow, irow, strict=True) if int(i) in found]
            for srow, irow in rows
        ]

    def _raw_cosines(self, queries: np.ndarray, rows: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """The plain cosine of each query with each of its hits' stored vectors (under the read lock)."""
        wanted = sorted({int(i) for _, irow in rows for i in irow})
        stored: dict[int, np.ndarray] = {}
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for i, blob in self._query(f"SELECT id, vector FROM items WHERE id IN ({marks})", tuple(chunk)):
                v = np.frombuffer(blob, dtype="<f4")
                stored[int(i)] = v / max(float(np.linalg.norm(v)), 1e-12)
        q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        return [np.array([float(q[j] @ stored[int(i)]) if int(i) in stored else -np.inf for i in irow])
                for j, (_, irow) in enumerate(rows)]

    def stats(self) -> dict[str, Any]:
        with self._rw.read():
            files = [p for p in self.directory.iterdir() if p.is_file()]
            return {
                "directory": str(self.directory), "count": int(self._index.ntotal), "dim": self.dim,
                "index_kind": self.meta["index_kind"], "index_mode": self.meta["index_mode"],
                "flat_max": int(self.meta["flat_max"]), "nlist": int(self.meta["nlist"]),
                "nprobe": int(self.meta["nprobe"]), "generation": int(self.meta["generation"]),
                "model_name": self.meta["model_name"], "model_version": int(self.meta["model_version"]),
                "model_fingerprint": self.meta.get("model_fingerprint") or "",
                "vector_generation": int(self.meta.get("vector_generation") or 1),
                "model_history": self.meta.get("model_history") or [],
                "reembed_in_progress": self.meta.get("reembed") or None,
                "root": self.meta["root"], "created_at": float(self.meta["created_at"]),
                "uncommitted": self._in_tx, "bytes_on_disk": sum(p.stat().st_size for p in files),
                "info": {k[5:]: v for k, v in self.meta.items() if k.startswith("info.")},
                **self._index_stats(),
            }

    def _index_stats(self) -> dict[str, Any]:
        """Type, shape, training, recall estimate, memory and layers of the vector index (under the read lock)."""
        meta, layered = self.meta, self._index
        plan = vi.Plan.of_meta(meta)
        estimate = {k: v for k, v in (meta.get("recall_estimate") or {}).items() if k != "table"}
        base = layered.base
        return {
            "pq_m": plan.pq_m, "opq": plan.opq, "rerank": plan.rerank, "k_factor": int(meta["k_factor"]),
            "trained_on": int(meta["trained_on"]), "training_size": int(meta["training_size"]),
            "recall_target": float(meta["recall_target"]), "recall_estimate": estimate,
            "memory": {
                "budget_bytes": compaction.memory_budget(meta), "budget_recorded": int(meta["memory_budget"]),
                "index_ram_bytes": vi.ram_bytes(plan, layered.ntotal, self.dim),
                "delta_ram_bytes": layered.ram_bytes(), "base_file_bytes": file_bytes(base_paths(self.directory,
                                                                                                 base.generation)),
                "process_rss_bytes": process_rss(),
            },
            "base": {"generation": base.generation, "count": len(base), "hwm": base.hwm,
                     "build": meta.get("base_build") or {}},
            "delta_count": layered.delta_count, "removed_since_base": len(layered.removed),
            "compaction_due": compaction.due(meta, layered),
            "whitening": {"mode": meta["whiten"], "fitted_on": int(meta["whitening_fitted_on"]),
                          "active": layered.whitening is not None, "spec": meta.get("whitening_spec") or {}},
        }


def process_rss() -> int:
    """This process's resident memory in bytes (Linux), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _history_entry(model: ModelIdentity, vector_generation: int, commit: int, *, adopted: bool = False) -> dict[str, Any]:
    entry = {"vector_generation": vector_generation, **model.as_meta(), "since_commit": commit, "at": time.time()}
    if adopted:
        entry["adopted"] = True  # recorded on first open by a model with a fingerprint, not proven
    return entry
