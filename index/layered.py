"""The searchable vectors of one commit: an immutable base snapshot plus a small exact delta.

- **base**: the items of commit S (`BaseSnapshot`), memory-mapped from its files (faiss_file.py),
  of any kind (vector_index.py). Never written to.
- **delta**: the items added since (ids > the base's `hwm`: SQLite ids only grow), in an exact
  in-memory `IndexIDMap2(IndexFlatIP)`; items removed from it are removed from it.
- **removed**: base ids deleted since S, excluded from every base search by an ID selector.

A search runs on both with the same filter (`sel`: FAISS IDSelector, e.g. index/selectors.py),
re-ranks the base's candidates with their exact vectors where the base keeps them, and merges
the two top-k lists by (score desc, id asc). `LayeredIndex` quacks like the FAISS index the store
used to hold (`ntotal`, `add_with_ids`, `remove_ids`, `search(x, k, params=)`), so search code
does not need to know about the layers. Not thread-safe for writes: the store serialises them
under its write lock; searches may run concurrently with each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from index import vector_index as vi
from index.whitening import Whitening

_NONE = np.float32(-np.inf)


@dataclass
class BaseSnapshot:
    """The base of a commit; `generation` 0 with no index: there is none yet (everything is delta)."""

    generation: int
    hwm: int  # every id <= hwm that existed at `generation` is in the base; later ids are not
    kind: str
    index: faiss.Index | None
    ids: np.ndarray  # ascending int64 (memory-mapped)
    vectors: np.ndarray | None  # float32 [len(ids), D] in id order (memory-mapped), for re-ranking

    @classmethod
    def empty(cls) -> BaseSnapshot:
        return cls(0, 0, "flat", None, np.zeros(0, dtype=np.int64), None)

    def __post_init__(self) -> None:
        # plain ndarray views of the mapped files: the same pages, without np.memmap's per-slice
        # bookkeeping (a third of a re-ranked single-query search's Python time)
        self.ids = np.asarray(self.ids)
        if self.vectors is not None:
            self.vectors = np.asarray(self.vectors)

    def __len__(self) -> int:
        return len(self.ids)


class LayeredIndex:
    """Base + delta - removed, searched as one index (see the module docstring)."""

    def __init__(self, base: BaseSnapshot, dim: int, whitening: Whitening | None = None) -> None:
        self.base, self.d = base, dim
        # raw vectors -> the space the base was built in (index/whitening.py); None: raw cosine.
        # Applied to every vector added and every query, so callers always pass raw vectors.
        self.whitening = whitening
        self.delta = vi.new_flat(dim)
        self._delta_ids = np.zeros(0, dtype=np.int64)  # ascending: ids only grow
        self.removed = np.zeros(0, dtype=np.int64)  # ascending, each one in base.ids
        self._removed_sel: faiss.IDSelector | None = None

    # -- size --------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return len(self.base) - len(self.removed) + int(self.delta.ntotal)

    @property
    def delta_count(self) -> int:
        return int(self.delta.ntotal)

    @property
    def last_id(self) -> int:
        """The largest id this index has seen: later commits' new items have larger ones."""
        return max(self.base.hwm, int(self._delta_ids[-1]) if len(self._delta_ids) else 0)

    def ram_bytes(self) -> int:
        """Bytes held in process memory (anonymous), not counting the base's mapped pages."""
        return int(self.delta.ntotal) * (4 * self.d + 16) + self.removed.nbytes

    # -- writes ------------------------------------------------------------------------------
    def add_with_ids(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return
        if int(ids.min()) <= self.last_id:
            raise ValueError(f"ids must grow: {int(ids.min())} <= {self.last_id}")
        if self.whitening is not None:
            vectors = self.whitening.apply(vectors)
        self.delta.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids)
        self._delta_ids = np.concatenate([self._delta_ids, np.sort(ids)])

    def remove_ids(self, ids: np.ndarray) -> int:
        """Remove what exists of `ids`; returns how many were here."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        # binary search in the (sorted, mapped) base ids: np.isin would sort a million of them a call
        at = np.searchsorted(self.base.ids, ids).clip(0, max(len(self.base) - 1, 0))
        in_base = ids[(ids <= self.base.hwm) & (self.base.ids[at] == ids)] if len(self.base) else ids[:0]
        in_base = np.setdiff1d(in_base, self.removed, assume_unique=True)
        if len(in_base):
            self.removed = np.union1d(self.removed, in_base)
            self._removed_sel = None
        in_delta = np.intersect1d(ids, self._delta_ids, assume_unique=True)
        if len(in_delta):
            self.delta.remove_ids(faiss.IDSelectorBatch(in_delta))
            self._delta_ids = np.setdiff1d(self._delta_ids, in_delta, assume_unique=True)
        return len(in_base) + len(in_delta)

    def copy_delta_from(self, other: LayeredIndex) -> None:
        """Take `other`'s delta and removals (same base): the start of applying a later commit."""
        self.delta = faiss.clone_index(other.delta)
        self.whitening = other.whitening
        self._delta_ids, self.removed = other._delta_ids.copy(), other.removed.copy()

    # -- search ------------------------------------------------------------------------------
    def search(self, x: np.ndarray, k: int, params: object | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[Q, k] scores and ids (-1 / -inf where fewer exist), best first; `params`: a
        vector_index.SearchSettings, or any object with a `sel` (plain faiss.SearchParameters)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.whitening is not None:
            x = self.whitening.apply(x)
        settings = params if isinstance(params, vi.SearchSettings) else vi.SearchSettings(
            sel=getattr(params, "sel", None))
        parts = []
        if len(self.base) > len(self.removed) and self.base.index is not None:
            parts.append(self._search_base(x, k, settings))
        if self.delta.ntotal:
            dp = faiss.SearchParameters(sel=settings.sel) if settings.sel is not None else None
            parts.append(self.delta.search(x, min(k, int(self.delta.ntotal)), params=dp))
        if not parts:
            return np.full((len(x), k), _NONE, dtype=np.float32), np.full((len(x), k), -1, dtype=np.int64)
        if len(parts) == 1 and parts[0][1].shape[1] == k:
            return parts[0]  # one sorted result, nothing to merge
        return merge_top_k(parts, k)

    def _search_base(self, x: np.ndarray, k: int, s: vi.SearchSettings) -> tuple[np.ndarray, np.ndarray]:
        base = self.base
        sel = s.sel
        if len(self.removed):
            if self._removed_sel is None:
                self._removed_sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(self.removed))
            sel = self._removed_sel if sel is None else faiss.IDSelectorAnd(sel, self._removed_sel)
        rerank = s.rerank and base.vectors is not None
        # k_factor is tuned at k = 10: a smaller k re-ranks as many candidates, or it would miss more
        fetch = min(max(k, vi.RERANK_MIN_K) * s.k_factor if rerank else k, len(base))
        if base.kind in vi.IVF_KINDS:
            fp = faiss.SearchParametersIVF(nprobe=s.nprobe, sel=sel)
        else:
            fp = faiss.SearchParameters(sel=sel) if sel is not None else None
        scores, ids = base.index.search(x, fetch, params=fp)
        if rerank:  # exact scores, the best k of them sorted
            scores, ids = best_k(*exact_scores(x, ids, base.ids, base.vectors), min(k, fetch))
        return scores, ids


def exact_scores(x: np.ndarray, ids: np.ndarray, base_ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The candidates `ids` [Q, m] scored exactly against their stored vectors (rows found by id)."""
    valid = ids >= 0
    rows = np.searchsorted(base_ids, np.where(valid, ids, 0))
    np.minimum(rows, len(base_ids) - 1, out=rows)
    gathered = vectors[rows.ravel()].reshape(*rows.shape, -1)
    scores = np.matmul(gathered, x[:, :, None])[..., 0]
    return np.where(valid, scores, _NONE).astype(np.float32, copy=False), ids


def best_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """`merge_top_k` of one [Q, m] list (m >= k) with fewer steps: the same order, (score desc, id asc)."""
    if len(scores) != 1:
        return merge_top_k([(scores, ids)], k)
    s, i = scores[0], ids[0]
    order = np.lexsort((np.where(i >= 0, i, np.iinfo(np.int64).max), -s))[:k]  # invalid: -inf, so last
    return s[order][None], i[order][None]


def merge_top_k(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of several [Q, m_i] result lists, ordered by (score desc, id asc); padded with -1."""
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(ids >= 0, scores, _NONE)
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=-1)[:, :k]
    scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=_NONE)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    return scores.astype(np.float32), ids
