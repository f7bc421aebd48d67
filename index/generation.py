"""The vectors of one committed generation, loaded whole or as the changes since a known one.

A commit G is, for searching: the base snapshot its metadata names (`base_generation` S, files
`base.<S>.*`, memory-mapped), plus the rows added since S (ids > `base_hwm`), minus the ids in the
`removed` log. Loading it whole (`load_index`) therefore costs the rows of the delta, not the
collection. Following commits (`read_committed` with `since`) reads only what changed: rows with an
id above the largest one seen (SQLite ids only grow) and the removals logged after the generation
seen. When the base itself changed (a compaction, a retrain, a re-embedding) the new one is opened
instead, which is a memory map, not a read.

`read_committed` is how a long-lived reader (the server) follows another process's commits: on its
own connection, in one read transaction (a consistent snapshot), with no lock of the reader's held,
so searches go on while it reads. If a base file is missing (deleted by hand, or by a compaction
that published a newer base between this read transaction and the file open) the metadata is read
again; a base that is really gone is rebuilt from the rows (SQLite is the source of truth).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from index import vector_index as vi
from index import whitening
from index.faiss_file import base_paths, read_array, read_index, remove_stale, write_array, write_index
from index.layered import BaseSnapshot, LayeredIndex
from index.schema import DB_FILE, IndexDirError, read_meta, removed_since

logger = logging.getLogger(__name__)

_CHUNK = 20_000


@dataclass
class Snapshot:
    """A committed generation: its metadata and either its whole index (`index`) or, with `since`
    set, the changes from generation `since` (`new_ids`/`new_vectors` added, `removed` gone)."""

    meta: dict[str, Any]
    index: LayeredIndex | None = None
    since: int | None = None
    new_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    new_vectors: np.ndarray | None = None
    removed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def generation(self) -> int:
        return int(self.meta["generation"])

    def apply_to(self, layered: LayeredIndex) -> None:
        """Bring `layered` (at generation `since`) to this one, in place (the caller holds the write lock)."""
        if len(self.new_ids):
            layered.add_with_ids(self.new_vectors, self.new_ids)
        if len(self.removed):
            layered.remove_ids(self.removed)


def rows_after(conn: sqlite3.Connection, last_id: int, dim: int):  # noqa: ANN201 - a generator
    """(ids, vectors) chunks of the rows with id > last_id, ascending."""
    cur = conn.execute("SELECT id, vector FROM items WHERE id > ? ORDER BY id", (int(last_id),))
    while rows := cur.fetchmany(_CHUNK):
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        yield ids, np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)


def _read_rows(conn: sqlite3.Connection, last_id: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    parts = list(rows_after(conn, last_id, dim))
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float32)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def trained_index(conn: sqlite3.Connection, meta: dict[str, Any], directory: Path):  # noqa: ANN201
    """An empty index of the recorded kind with the recorded training (blob `trained`)."""
    kind = meta["index_kind"]
    if kind == "flat":
        return vi.new_flat(int(meta["dim"]))
    row = conn.execute("SELECT value FROM blobs WHERE key IN ('trained', 'ivf_trained') ORDER BY key DESC").fetchone()
    if row is None:
        raise IndexDirError(f"{directory}: {kind} index without its training (blob 'trained')")
    return vi.deserialize(row[0])


def _rebuild_base(conn: sqlite3.Connection, meta: dict[str, Any], directory: Path, *, write: bool) -> BaseSnapshot:
    """The base's files are gone or damaged: the rows it held that still exist, with its training."""
    generation, hwm, dim = int(meta["base_generation"]), int(meta["base_hwm"]), int(meta["dim"])
    logger.warning("%s: rebuilding base snapshot %d from the rows", directory, generation)
    index = trained_index(conn, meta, directory)
    space = whitening.load(conn, meta)  # the base holds the vectors in the space it was built in
    ids, vecs = [], []
    cur = conn.execute("SELECT id, vector FROM items WHERE id <= ? ORDER BY id", (hwm,))
    while rows := cur.fetchmany(_CHUNK):
        ids.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
        vecs.append(np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim))
        if space is not None:
            vecs[-1] = space.apply(vecs[-1])
        index.add_with_ids(vecs[-1], ids[-1])
    all_ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    vectors = np.concatenate(vecs) if vecs and meta.get("rerank") else None
    if write:
        try:
            paths = base_paths(directory, generation)
            if vectors is not None:
                write_array(paths.vectors, vectors.shape, "<f4", [vectors])
            write_array(paths.ids, all_ids.shape, "<i8", [all_ids])
            write_index(index, paths.faiss)
        except OSError as e:  # a read-only directory still opens
            logger.warning("cannot write base snapshot %d of %s: %s", generation, directory, e)
    return BaseSnapshot(generation, hwm, meta["index_kind"], index, all_ids, vectors)


def open_base(directory: Path, meta: dict[str, Any]) -> BaseSnapshot | None:
    """The base snapshot `meta` names, memory-mapped; None when its files are missing or damaged."""
    generation = int(meta.get("base_generation") or 0)
    if not generation:
        return BaseSnapshot.empty()
    paths = base_paths(directory, generation)
    try:
        index = read_index(paths.faiss)
        ids = read_array(paths.ids)
        vectors = read_array(paths.vectors) if meta.get("rerank") else None
    except (RuntimeError, OSError, ValueError) as e:
        logger.info("%s: base snapshot %d unreadable (%s)", directory, generation, e)
        return None
    dim = int(meta["dim"])
    if index.ntotal != len(ids) or index.d != dim or (vectors is not None and vectors.shape != (len(ids), dim)):
        logger.warning("%s: base snapshot %d files disagree (%d vectors, %d ids)", directory, generation,
                       index.ntotal, len(ids))
        return None
    return BaseSnapshot(generation, int(meta["base_hwm"]), meta["index_kind"], index, ids, vectors)


def load_index(directory: Path, conn: sqlite3.Connection, meta: dict[str, Any], *, write: bool,
               base: BaseSnapshot | None = None) -> LayeredIndex:
    """The whole index of `meta`'s generation as `conn` sees it (in its transaction); a missing base
    is rebuilt (and written back when `write`)."""
    dim = int(meta["dim"])
    if base is None:
        base = open_base(directory, meta)
    if base is None:
        base = _rebuild_base(conn, meta, directory, write=write)
    if write:
        remove_stale(directory, keep=base.generation)
    layered = LayeredIndex(base, dim, whitening.load(conn, meta))
    for ids, vecs in rows_after(conn, base.hwm, dim):
        layered.add_with_ids(vecs, ids)
    gone = removed_since(conn, 0, max_id=base.hwm)
    if len(gone):
        layered.remove_ids(gone)
    return layered


def read_changes(conn: sqlite3.Connection, meta: dict[str, Any], since_generation: int, last_id: int) -> Snapshot:
    """The commits after `since_generation` on the same base, as rows added and ids removed."""
    ids, vecs = _read_rows(conn, last_id, int(meta["dim"]))
    return Snapshot(meta, since=since_generation, new_ids=ids, new_vectors=vecs,
                    removed=removed_since(conn, since_generation))


def same_base(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("base_generation", "vector_generation", "dim", "index_kind")
    return all(a.get(k) == b.get(k) for k in keys)


def read_committed(directory: Path, *, since: tuple[dict[str, Any], int] | None = None, attempts: int = 5) -> Snapshot:
    """The latest committed generation, read on a private connection; never writes anything.

    `since` = (the metadata of the generation the caller has, the largest id it has seen): when the
    base is the same, only the changes are read (`Snapshot.since` set); else the whole index.
    """
    conn = sqlite3.connect(directory / DB_FILE, isolation_level=None, timeout=60, check_same_thread=False)
    try:
        for attempt in range(attempts):
            conn.execute("BEGIN")  # one read transaction: meta, rows and removals of the same commit
            try:
                meta = read_meta(conn)
                if since is not None and same_base(meta, since[0]):
                    return read_changes(conn, meta, int(since[0]["generation"]), since[1])
                base = open_base(directory, meta)
                stale = base is None and read_meta_fresh(directory) != int(meta.get("base_generation") or 0)
                if stale and attempt + 1 < attempts:
                    continue  # a newer base was published (and this one's files removed): read that commit
                return Snapshot(meta, index=load_index(directory, conn, meta, write=False, base=base))
            finally:
                conn.execute("ROLLBACK")
        raise AssertionError("unreachable")  # the last attempt always returns
    finally:
        conn.close()


def read_meta_fresh(directory: Path) -> int:
    """The base generation committed now (outside any open read transaction)."""
    conn = sqlite3.connect(directory / DB_FILE, isolation_level=None, timeout=60)
    try:
        return int(read_meta(conn).get("base_generation") or 0)
    finally:
        conn.close()
