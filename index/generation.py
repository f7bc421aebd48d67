"""The FAISS index of one committed generation: its cache file when that matches the rows, else a
rebuild from the rows (the source of truth).

`read_committed` is how a long-lived reader (the server) picks up another process's commit: on its
own connection, in one read transaction (a consistent snapshot of meta, rows and the trained IVF),
without touching the reader's locks, so searches go on while it loads. The writer writes the
cache file just after its commit, so a missing file is waited for a moment before rebuilding.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import vector_index as vi
from index.faiss_file import faiss_path, read_faiss, remove_stale, write_faiss
from index.schema import DB_FILE, IndexDirError, read_meta

logger = logging.getLogger(__name__)

FAISS_WAIT_S = 2.0  # how long a reader waits for the committer's cache file before rebuilding
_POLL_S = 0.05


@dataclass
class Snapshot:
    """A committed generation: its metadata and its FAISS index."""

    meta: dict[str, Any]
    index: faiss.Index

    @property
    def generation(self) -> int:
        return int(self.meta["generation"])


def empty_index(conn: sqlite3.Connection, meta: dict[str, Any], directory: Path) -> faiss.Index:
    if meta["index_kind"] == "ivf":
        row = conn.execute("SELECT value FROM blobs WHERE key='ivf_trained'").fetchone()
        if row is None:
            raise IndexDirError(f"{directory}: IVF index without its trained quantizer")
        return vi.deserialize(row[0])
    return vi.new_flat(int(meta["dim"]))


def rebuild(conn: sqlite3.Connection, meta: dict[str, Any], directory: Path) -> faiss.Index:
    index = empty_index(conn, meta, directory)
    dim = int(meta["dim"])
    cur = conn.execute("SELECT id, vector FROM items ORDER BY id")
    while rows := cur.fetchmany(20_000):
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)
        index.add_with_ids(vecs, ids)
    return index


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])


def _matching_file(path: Path, count: int, dim: int) -> faiss.Index | None:
    try:
        index = read_faiss(path)
    except RuntimeError as e:
        logger.warning("cannot read %s (%s)", path, e)
        return None
    if index.ntotal == count and index.d == dim:
        return index
    logger.warning("%s has %d vectors of dim %d for %d rows of dim %d", path, index.ntotal, index.d, count, dim)
    return None


def load_index(directory: Path, conn: sqlite3.Connection, meta: dict[str, Any], *, write: bool) -> faiss.Index:
    """The index of `meta`'s generation as `conn` sees it; a rebuilt one is written back when `write`."""
    generation, dim = int(meta["generation"]), int(meta["dim"])
    path = faiss_path(directory, generation)
    if path.is_file():
        index = _matching_file(path, _count(conn), dim)
        if index is not None:
            if write:
                remove_stale(directory, keep=path.name)
            return index
        logger.warning("rebuilding %s from the rows", path.name)
    index = rebuild(conn, meta, directory)
    if write:
        try:
            write_faiss(index, directory, generation)
        except OSError as e:  # a read-only directory still opens
            logger.warning("cannot write %s: %s", path, e)
    return index


def _newer_file_exists(directory: Path, generation: int) -> bool:
    for p in directory.glob("vectors.*.faiss"):
        parts = p.name.split(".")
        if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) > generation:
            return True
    return False


def read_committed(directory: Path, *, wait_s: float = FAISS_WAIT_S, attempts: int = 5) -> Snapshot:
    """The latest committed generation, read on a private connection; never writes anything."""
    conn = sqlite3.connect(directory / DB_FILE, isolation_level=None, timeout=60, check_same_thread=False)
    try:
        for attempt in range(attempts):
            conn.execute("BEGIN")  # one read transaction: meta, rows and blobs of the same commit
            try:
                meta = read_meta(conn)
                generation, dim, count = int(meta["generation"]), int(meta["dim"]), _count(conn)
                path = faiss_path(directory, generation)
                deadline = time.monotonic() + wait_s
                while True:
                    if path.is_file() and (index := _matching_file(path, count, dim)) is not None:
                        return Snapshot(meta, index)
                    newer = _newer_file_exists(directory, generation)
                    if newer or time.monotonic() > deadline:
                        break
                    time.sleep(_POLL_S)
                if newer and attempt + 1 < attempts:
                    continue  # a later commit replaced this one's file: read that commit instead
                logger.info("%s: no cache file for commit %d; rebuilding it from the rows", directory, generation)
                return Snapshot(meta, rebuild(conn, meta, directory))
            finally:
                conn.execute("ROLLBACK")
        raise AssertionError("unreachable")  # the last attempt always returns
    finally:
        conn.close()
