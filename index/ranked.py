"""One total order for search results, so that pages of a search agree with each other.

Pagination asks FAISS for the best `offset + k` and keeps the last `k`. Two pages of one query
are disjoint and their union is the top of one bigger search only if every call ranks the same
candidates the same way. The candidates are fixed by the query and the search parameters (flat:
all items; IVF: the `nprobe` nearest lists, which do not depend on k), and scores are exact for a
given vector pair, so the one thing left to pin down is ties: identical vectors (exact duplicate
files) score identically, and FAISS breaks ties by heap position, which depends on k. Here results
are ordered by (score descending, id ascending), and a search is widened until the run of scores
equal to the one at the cut-off ends inside what was fetched, so the top-n set itself is the same
whatever n a page asks for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def top_n(search: SearchFn, queries: np.ndarray, n: int, ntotal: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The best `n` (scores, ids) of each query in the order (score desc, id asc), fewer when fewer exist.

    `search(queries, m)` is a FAISS search returning [Q, m] scores and ids (-1 for none). The whole
    batch is searched again when a row's cut-off is tied, so every score comes from one code path.
    """
    fetch = min(n + 1, ntotal)
    out: list[tuple[np.ndarray, np.ndarray]] = []
    while True:
        scores, ids = search(queries, fetch)
        out, tied = [], False
        for srow, irow in zip(scores, ids, strict=True):
            valid = irow >= 0
            s, i = srow[valid], irow[valid]
            order = np.lexsort((i, -s))
            s, i = s[order], i[order]
            # the run of scores equal to the cut-off may go on past what was fetched: fetch more
            tied |= len(s) > n and len(s) == fetch and s[-1] == s[n - 1]
            out.append((s[:n], i[:n]))
        if not tied or fetch >= ntotal:
            return out
        fetch = min(2 * fetch, ntotal)


def filtered_nprobe(nprobe: int, nlist: int, passing: int, ntotal: int) -> int:
    """IVF lists to scan when only `passing` of `ntotal` items may be returned: `nprobe` / fraction,
    so the scan meets about as many eligible vectors as an unfiltered search meets vectors. It
    depends on the filter only (not on k or the page), so pages stay consistent."""
    if passing >= ntotal:
        return nprobe
    return min(nlist, math.ceil(nprobe * ntotal / max(passing, 1)))
