"""The read side of ImageIndex: lookups by id, path and content, `search` with its options, `stats`.

Mixed into ImageIndex (index/store.py): every method takes the read lock of the handle's
readers-writer lock, so reads run concurrently with each other and never see half a write.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from index import vector_index as vi
from index.index_stats import vector_index_stats
from index.ranked import filtered_nprobe, top_n
from index.records import COLUMNS, Hit, IndexedFile, ItemRecord, record_from_row
from index.selectors import IdSet, search_selector, with_selector

_IDS_PER_QUERY = 500  # ids bound in one SELECT ... IN (...): well under SQLite's variable limit


class IndexReads:
    """Mixed into ImageIndex: uses its connection (`_conn`, `_db`), lock (`_rw`), metadata and vector index."""

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._db:
            return self._conn.execute(sql, args).fetchall()

    def _rows_by_id(self, columns: str, rows: list[tuple[np.ndarray, np.ndarray]]) -> Iterator[tuple]:
        """`columns` of the items that `rows` (search results: [(scores, ids)] per query) name, 500 ids a query."""
        wanted = sorted({int(i) for _, irow in rows for i in irow})
        for start in range(0, len(wanted), _IDS_PER_QUERY):
            chunk = wanted[start : start + _IDS_PER_QUERY]
            yield from self._query(f"SELECT {columns} FROM items WHERE id IN ({','.join('?' * len(chunk))})", tuple(chunk))

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
            found = {int(row[0]): record_from_row(row) for row in self._rows_by_id(COLUMNS, rows)}
        return [
            [Hit(int(i), float(s), found[int(i)]) for s, i in zip(srow, irow, strict=True) if int(i) in found]
            for srow, irow in rows
        ]

    def _raw_cosines(self, queries: np.ndarray, rows: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """The plain cosine of each query with each of its hits' stored vectors (under the read lock)."""
        stored: dict[int, np.ndarray] = {}
        for i, blob in self._rows_by_id("id, vector", rows):
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
                **vector_index_stats(self.directory, self.meta, self._index, self.dim),
            }
