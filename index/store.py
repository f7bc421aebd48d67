"""ImageIndex: a FAISS index with its metadata in SQLite, crash-safe.

    INDEX_DIR/
      index.sqlite            the source of truth (WAL, synchronous=FULL): one row per item with
                              its float32 vector, the metadata, the removal log, the training
      base.<G>.faiss, .ids.npy, .vectors.npy
                              the base snapshot of commit G (memory-mapped; written by compaction)

Every `commit()` is one SQLite transaction that increments the generation. Searches run over the
base snapshot plus an in-memory delta of the rows committed since it, minus the ids removed since
(index/layered.py); a compaction (index/compaction.py) writes a new base in the background and
publishes it in one transaction. After kill -9 at any moment the directory opens with every
committed row, and the FAISS ids are exactly the SQLite row ids; changes not yet committed are
lost, never half-applied. The read side (lookups, `search`, `stats`) is index/reads.py.

Thread safety: a readers-writer lock; searches and reads run concurrently, writes are exclusive.
Several processes may write one index (SQLite serialises their transactions); a writer that finds
another's commit reloads first. `refresh()` lets a long-lived reader pick up others' commits: the
new generation is loaded on a private connection with no lock held and swapped in under a short
write lock, so searches never wait for a load (index/following.py, index/generation.py).

Model identity (index/identity.py): the metadata records the model that wrote the vectors
(`model_fingerprint`, `model_name`, `model_version`, `dim`), a `vector_generation` number and a
`model_history` entry per vector generation. A handle told its model with `bind_model` refuses
every write (IndexModelMismatch) once the index belongs to another model, e.g. after another
process's `--reembed` switch, so vectors of two models never meet in one index. A re-embedding
fills the table `reembed_vectors` in committed batches (`begin_reembed`, `stage_reembed`); readers
keep the old vectors until `switch_reembed` swaps all of them, the identity and the generation in
one transaction (index/reembed_tx.py).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from index import compaction, tuning, whitening
from index import vector_index as vi
from index.budget import parse_bytes
from index.dir_init import create_in_place
from index.following import FollowingCommits
from index.generation import Snapshot, load_index, read_changes, same_base
from index.identity import IndexModelMismatch, ModelIdentity
from index.reads import IndexReads
from index.records import Hit, ItemRecord, record_values
from index.reembed_tx import Dropped, ModelBinding, ReembedTransactions, Staged
from index.rwlock import RWLock
from index.schema import (
    DB_FILE,
    FORMAT,
    FORMAT_VERSION,
    META_DEFAULTS,
    READABLE_VERSIONS,
    IndexDirError,
    log_removed,
    read_meta,
    write_meta,
)

logger = logging.getLogger(__name__)

WRITE_LOCK_TIMEOUT_S = 60.0  # longest wait for another process's write transaction
_LOCK_POLL_S = 0.05

__all__ = ["Dropped", "Hit", "ImageIndex", "IndexDirError", "IndexModelMismatch", "ItemRecord", "Snapshot", "Staged"]

def _check_target(target: float) -> float:
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"the recall target is a share of the exact top 10 in (0, 1], got {target}")
    return float(target)




class ImageIndex(IndexReads, FollowingCommits, ModelBinding, ReembedTransactions):
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
            self.meta = {**META_DEFAULTS, **self.meta}
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
            **META_DEFAULTS, "format": FORMAT, "format_version": FORMAT_VERSION, "dim": dim,
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
        meta = {**META_DEFAULTS, **read_meta(self._conn)}
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
            stored = vectors.astype("<f4", copy=False)  # the column's byte order, whatever the machine's
            for vals, vec in zip(values, stored, strict=True):
                cur = self._conn.execute(
                    "INSERT INTO items (path, size, mtime, sha256, width, height, added_at, metadata, vector)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (*vals, vec.tobytes()))
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
            if not self._conn.in_transaction:  # an interrupt (Ctrl-C) hit after SQLite's last COMMIT had ended it
                self._in_tx = self._fresh_tx = False
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
            if self._conn.in_transaction:  # else an interrupt (Ctrl-C) hit right after a COMMIT: reload it below
                self._conn.execute("ROLLBACK")
            self._in_tx = self._fresh_tx = False
            self.meta = {**META_DEFAULTS, **read_meta(self._conn)}
            self.dim = int(self.meta["dim"])
            self._index = load_index(self.directory, self._conn, self.meta, write=True)

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
