"""ImageIndex: a FAISS index with its metadata in SQLite, crash-safe.

    INDEX_DIR/
      index.sqlite            the source of truth (WAL, synchronous=FULL): one row per item with
                              its float32 vector, the metadata table, the trained IVF if any
      vectors.<G>.faiss       a cache of the FAISS index, written atomically after commit number G

Every `commit()` is one SQLite transaction that also increments the generation G; only then is the
FAISS file for G written (temporary file + fsync + os.replace). On open, a missing FAISS file for
the current G (a crash between the two steps) or one whose size disagrees with the rows is rebuilt
from the rows. So after kill -9 at any moment the directory opens, and the FAISS ids are exactly
the SQLite row ids. Changes not yet committed are lost by a crash, never half-applied.

Thread safety: a readers-writer lock; searches and reads run concurrently, writes are exclusive.
Several processes may write one index (SQLite serialises their transactions); a writer that finds
another's commit reloads first, and `refresh()` lets a long-lived reader pick up others' commits.
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

import faiss
import numpy as np

from index import vector_index as vi
from index.dir_init import create_in_place
from index.faiss_file import faiss_path, remove_stale, write_faiss
from index.records import COLUMNS, Hit, IndexedFile, ItemRecord, record_from_row, record_values
from index.rwlock import RWLock
from index.schema import DB_FILE, FORMAT, FORMAT_VERSION, IndexDirError, read_meta, write_meta

logger = logging.getLogger(__name__)

__all__ = ["Hit", "ImageIndex", "IndexDirError", "ItemRecord"]

class ImageIndex:
    """Vectors + records; see the module docstring for the files and the crash-safety argument."""

    def __init__(self, directory: Path, conn: sqlite3.Connection) -> None:
        self.directory = directory
        self._conn = conn
        self._db = threading.Lock()  # one connection: calls on it are serialised
        self._rw = RWLock()
        self._in_tx = False
        self._closed = False
        self.meta = read_meta(conn)
        if self.meta.get("format") != FORMAT or int(self.meta.get("format_version", -1)) != FORMAT_VERSION:
            raise IndexDirError(f"{directory} is not a {FORMAT} v{FORMAT_VERSION} index directory")
        self.dim = int(self.meta["dim"])
        self._index = self._load_or_rebuild()

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    def create(
        cls, directory: str | os.PathLike[str], dim: int, *, model_name: str = "", model_version: int = 0,
        root: str | None = None, index_mode: str = "auto", flat_max: int = vi.FLAT_MAX_VECTORS,
    ) -> ImageIndex:
        """A new, empty index in `directory` (missing, or an existing empty directory such as a
        volume mount): built in place, writing only inside it, crash-safe (index/dir_init.py)."""
        directory = Path(directory)
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        vi.choose_kind(0, index_mode)
        create_in_place(directory, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "dim": dim, "model_name": model_name,
            "model_version": model_version, "root": root or "", "generation": 0, "index_kind": "flat",
            "index_mode": index_mode, "flat_max": flat_max, "nlist": 0, "nprobe": 0, "trained_on": 0,
            "created_at": time.time(),
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

    def _load_or_rebuild(self, write: bool = True) -> faiss.Index:
        generation = int(self.meta["generation"])
        path = faiss_path(self.directory, generation)
        count = self._conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        if path.is_file():
            try:
                index = faiss.read_index(str(path))
                if index.ntotal == count and index.d == self.dim:
                    remove_stale(self.directory, keep=path.name)
                    return index
                logger.warning("%s has %d vectors for %d rows: rebuilding", path, index.ntotal, count)
            except RuntimeError as e:
                logger.warning("cannot read %s (%s): rebuilding", path, e)
        index = self._rebuild()
        if not write:
            return index
        try:
            write_faiss(index, self.directory, generation)
        except OSError as e:  # a read-only directory still opens
            logger.warning("cannot write %s: %s", path, e)
        return index

    def _empty_index(self) -> faiss.Index:
        if self.meta["index_kind"] == "ivf":
            row = self._conn.execute("SELECT value FROM blobs WHERE key='ivf_trained'").fetchone()
            if row is None:
                raise IndexDirError(f"{self.directory}: IVF index without its trained quantizer")
            return vi.deserialize(row[0])
        return vi.new_flat(self.dim)

    def _rebuild(self) -> faiss.Index:
        index = self._empty_index()
        cur = self._conn.execute("SELECT id, vector FROM items ORDER BY id")
        while rows := cur.fetchmany(20_000):
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
            index.add_with_ids(vecs, ids)
        return index

    # -- writing -----------------------------------------------------------------------------
    def _begin(self) -> None:
        if self._closed:
            raise IndexDirError(f"index {self.directory} is closed")
        if not self._in_tx:
            self._conn.execute("BEGIN IMMEDIATE")
            self._in_tx = True
            self._catch_up()

    def _catch_up(self) -> bool:
        """Another process committed since we last looked: reload the metadata and the vectors."""
        generation = json.loads(self._conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
        if generation == self.meta["generation"]:
            return False
        logger.info("%s changed on disk (commit %s -> %s): reloading", self.directory, self.meta["generation"], generation)
        self.meta = read_meta(self._conn)
        self._index = self._load_or_rebuild(write=not self._in_tx)
        return True

    def refresh(self) -> bool:
        """Pick up commits made by another process (e.g. `index build` while a server runs)."""
        with self._rw.write(), self._db:
            return False if self._in_tx or self._closed else self._catch_up()

    def add(self, vectors: np.ndarray, records: Iterable[ItemRecord | Mapping[str, Any]]) -> list[int]:
        """Add vectors [N, D] with their records; returns the new ids. Durable after `commit()`."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        values = [record_values(r) for r in records]
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(values):
            raise ValueError(f"expected vectors [{len(values)}, {self.dim}], got {list(vectors.shape)}")
        if not len(values):
            return []
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
        with self._rw.write(), self._db:
            self._begin()
            removed = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                removed += self._conn.execute(f"DELETE FROM items WHERE id IN ({marks})", chunk).rowcount
            self._index.remove_ids(np.asarray(ids, dtype=np.int64))
            return removed

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
        with self._rw.write(), self._db:
            self._begin()
            sets = ", ".join(f"{k} = ?" for k in fields)
            cur = self._conn.execute(f"UPDATE items SET {sets} WHERE id = ?", (*fields.values(), int(id)))
            return cur.rowcount > 0

    def commit(self) -> None:
        """Make every change so far durable: one SQLite transaction, then the FAISS cache file."""
        with self._rw.write(), self._db:
            if not self._in_tx:
                return
            self._maybe_retrain()
            generation = int(self.meta["generation"]) + 1
            write_meta(self._conn, {"generation": generation})
            self._conn.execute("COMMIT")
            self._in_tx = False
            self.meta["generation"] = generation
            write_faiss(self._index, self.directory, generation)

    save = commit

    def rollback(self) -> None:
        """Drop every change since the last commit (vectors included)."""
        with self._rw.write(), self._db:
            if not self._in_tx:
                return
            self._conn.execute("ROLLBACK")
            self._in_tx = False
            self.meta = read_meta(self._conn)
            self._index = self._load_or_rebuild()

    def _maybe_retrain(self) -> None:
        n = self._index.ntotal
        kind = vi.choose_kind(n, self.meta["index_mode"], int(self.meta["flat_max"]))
        current = self.meta["index_kind"]
        trained_on = int(self.meta.get("trained_on") or 0)
        auto_back_to_flat = current == "ivf" and kind == "flat" and self.meta["index_mode"] == "auto"
        if auto_back_to_flat and n > int(self.meta["flat_max"]) // 2:  # hysteresis: no flip-flop
            kind = "ivf"
        if kind == current and not (kind == "ivf" and n > vi.RETRAIN_GROWTH * max(trained_on, 1)):
            return
        if kind == "ivf" and n < vi.MIN_POINTS_PER_LIST:
            return  # too few vectors to train; stays flat until there are enough
        ids, vecs = self._all_vectors()
        updates: dict[str, Any] = {"index_kind": kind, "trained_on": n}
        if kind == "ivf":
            index = vi.train_ivf(vecs)
            nlist = index.nlist
            self._conn.execute("INSERT OR REPLACE INTO blobs (key, value) VALUES ('ivf_trained', ?)",
                               (vi.serialize(index),))
            updates.update(nlist=nlist, nprobe=vi.default_nprobe(nlist))
        else:
            index = vi.new_flat(self.dim)
            self._conn.execute("DELETE FROM blobs WHERE key='ivf_trained'")
            updates.update(nlist=0, nprobe=0)
        index.add_with_ids(vecs, ids)
        logger.info("index is now %s over %d vectors (%s)", kind, n, updates)
        write_meta(self._conn, updates)
        self.meta.update(updates)
        self._index = index

    def _all_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self._conn.execute("SELECT id, vector FROM items ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), self.dim)
        return ids, vecs

    def set_info(self, **values: Any) -> None:
        """Free-form facts about the index (e.g. which model built it), saved with the next commit."""
        with self._rw.write(), self._db:
            self._begin()
            write_meta(self._conn, {f"info.{k}": v for k, v in values.items()})
            self.meta.update({f"info.{k}": v for k, v in values.items()})

    def info(self) -> dict[str, Any]:
        with self._rw.read():
            return {k[5:]: v for k, v in self.meta.items() if k.startswith("info.")}

    def close(self) -> None:
        """Commit what is pending and release the files."""
        if self._closed:
            return
        self.commit()
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

    def search(self, queries: np.ndarray, k: int, *, params: dict[str, Any] | None = None) -> list[list[Hit]]:
        """Top-`k` by inner product for each query [Q, D]; `params` e.g. {"nprobe": 32} for IVF."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected queries [Q, {self.dim}], got {list(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        with self._rw.read():
            sp = vi.search_parameters(self.meta["index_kind"], params, {"nprobe": int(self.meta["nprobe"])})
            if self._index.ntotal == 0:
                return [[] for _ in range(len(queries))]
            scores, ids = self._index.search(queries, min(k, self._index.ntotal), params=sp)
            wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
            found: dict[int, ItemRecord] = {}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in self._query(f"SELECT {COLUMNS} FROM items WHERE id IN ({marks})", tuple(chunk)):
                    found[int(row[0])] = record_from_row(row)
        return [
            [Hit(int(i), float(s), found[int(i)]) for s, i in zip(srow, irow, strict=True) if int(i) in found]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def stats(self) -> dict[str, Any]:
        with self._rw.read():
            files = [p for p in self.directory.iterdir() if p.is_file()]
            return {
                "directory": str(self.directory), "count": int(self._index.ntotal), "dim": self.dim,
                "index_kind": self.meta["index_kind"], "index_mode": self.meta["index_mode"],
                "flat_max": int(self.meta["flat_max"]), "nlist": int(self.meta["nlist"]),
                "nprobe": int(self.meta["nprobe"]), "generation": int(self.meta["generation"]),
                "model_name": self.meta["model_name"], "model_version": int(self.meta["model_version"]),
                "root": self.meta["root"], "created_at": float(self.meta["created_at"]),
                "uncommitted": self._in_tx, "bytes_on_disk": sum(p.stat().st_size for p in files),
                "info": {k[5:]: v for k, v in self.meta.items() if k.startswith("info.")},
            }
