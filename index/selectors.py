"""Sets of item ids for filtered searches, and the FAISS ID selectors that apply them inside a search.

A filtered search must return k results whenever at least k items pass the filter, so the filter
is applied by FAISS while it scans (`SearchParameters.sel`), never by searching k and dropping
what fails. The set is kept in the smaller of two forms:

- a sorted int64 array (`IDSelectorBatch`: a hash set, about 16-40 bytes per id) for sparse sets;
- a bitmap over 0..max_id (`IDSelectorBitmap`: one bit per possible id, `max_id / 8` bytes) once
  the set holds more than one id in `BITMAP_DENSITY` of the id range: ids are SQLite row ids,
  dense and never reused, so a filter passing 1M of 2M items costs 250 KB, not 16+ MB.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import faiss
import numpy as np

BITMAP_DENSITY = 128  # a bitmap when count * 128 >= max_id (it then costs at most 16 bits per id)
SWITCH_AT = 65_536  # from_chunks goes over to a bitmap once it holds this many ids (512 KB as an array)


@dataclass(frozen=True)
class IdSet:
    """Item ids: `ids` (sorted, unique int64) or `bitmap` (bit i of byte i >> 3, little-endian: FAISS's layout)."""

    count: int
    ids: np.ndarray | None = None
    bitmap: np.ndarray | None = None

    @classmethod
    def of(cls, ids: IdSet | Iterable[int] | np.ndarray) -> IdSet:
        if isinstance(ids, IdSet):
            return ids
        arr = np.unique(np.fromiter((int(i) for i in ids), dtype=np.int64) if not isinstance(ids, np.ndarray)
                        else np.asarray(ids, dtype=np.int64).ravel())
        if len(arr) and arr[0] < 0:
            raise ValueError(f"item ids are >= 0, got {int(arr[0])}")
        return cls.from_sorted(arr)

    @classmethod
    def from_sorted(cls, ids: np.ndarray) -> IdSet:
        """From sorted unique ids, in whichever form is smaller."""
        if len(ids) and len(ids) * BITMAP_DENSITY >= int(ids[-1]):
            bitmap = np.zeros(int(ids[-1]) // 8 + 1, dtype=np.uint8)
            np.bitwise_or.at(bitmap, ids >> 3, (1 << (ids & 7)).astype(np.uint8))
            return cls(len(ids), bitmap=bitmap)
        return cls(len(ids), ids=ids)

    @classmethod
    def from_chunks(cls, chunks: Iterable[np.ndarray]) -> IdSet:
        """From ascending chunks of ids (a SQL cursor read in pieces): never more than the final
        form plus one chunk in memory, so a filter passing millions of items stays small."""
        parts: list[np.ndarray] = []
        bitmap: np.ndarray | None = None
        count = 0
        for chunk in chunks:
            chunk = np.asarray(chunk, dtype=np.int64)
            if not len(chunk):
                continue
            count += len(chunk)
            if bitmap is None:
                parts.append(chunk)
                if count < SWITCH_AT or count * BITMAP_DENSITY < int(chunk[-1]):
                    continue  # (until then the array is small whatever comes next)
                bitmap = np.zeros(0, dtype=np.uint8)
                chunk, parts = np.concatenate(parts), []
            top = int(chunk[-1]) // 8 + 1
            if top > len(bitmap):
                bitmap = np.concatenate([bitmap, np.zeros(top - len(bitmap), dtype=np.uint8)])
            np.bitwise_or.at(bitmap, chunk >> 3, (1 << (chunk & 7)).astype(np.uint8))
        if bitmap is not None:
            return cls(count, bitmap=bitmap)
        return cls.from_sorted(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return self.count

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """A boolean mask: which of `ids` are in the set."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.bitmap is not None:
            byte = ids >> 3
            ok = (ids >= 0) & (byte < len(self.bitmap))
            out = np.zeros(ids.shape, dtype=bool)
            out[ok] = (self.bitmap[byte[ok]] >> (ids[ok] & 7)) & 1 == 1
            return out
        assert self.ids is not None
        return np.isin(ids, self.ids)

    def nbytes(self) -> int:
        return int((self.bitmap if self.bitmap is not None else self.ids).nbytes)  # type: ignore[union-attr]

    def selector(self) -> faiss.IDSelector:
        if self.bitmap is not None:
            return faiss.IDSelectorBitmap(self.bitmap)  # the wrapper keeps the array alive
        return faiss.IDSelectorBatch(self.ids)


def search_selector(allowed: IdSet | None, exclude: np.ndarray | None) -> faiss.IDSelector | None:
    """The selector for "in `allowed` (everything when None) and not in `exclude`"; None: no filter."""
    keep = allowed.selector() if allowed is not None else None
    if exclude is None or not len(exclude):
        return keep
    drop = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.asarray(exclude, dtype=np.int64)))
    return drop if keep is None else faiss.IDSelectorAnd(keep, drop)  # both keep their parts alive


def with_selector(params: faiss.SearchParameters | None, sel: faiss.IDSelector | None) -> faiss.SearchParameters | None:
    """`params` (or plain SearchParameters) carrying `sel`; FAISS's IDMap translates it to its own ids."""
    if sel is None:
        return params
    if params is None:
        params = faiss.SearchParameters()
    params.sel = sel  # the wrapper keeps `sel` alive as long as `params`
    return params
