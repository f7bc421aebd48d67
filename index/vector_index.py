"""Which FAISS index for how many vectors, how to build and train it, and per-call search parameters.

Index type by scale (inner product on l2-normalised vectors = cosine similarity):

- `flat` (`IndexIDMap2(IndexFlatIP)`): exact. Used up to `FLAT_MAX_VECTORS` = 50,000 vectors,
  where a brute-force scan still answers a query in about a millisecond per 10k vectors on one core.
- `ivf` (`IndexIVFFlat`, inner product): approximate, above the threshold. `nlist` is
  4 * sqrt(n) (at least 39 training points per list), k-means trained on up to 256 points per list
  sampled from the data (seeded). `nprobe` (lists scanned per query) is stored with the index; a
  caller may pass another one per search call (`params={"nprobe": 64}`), which is applied through
  `faiss.SearchParametersIVF` and never changes the shared index. The trained IVF is retrained when
  the collection has grown 4x since training. bench/index_folder.py measures recall@10 against flat.

Ids are the SQLite row ids (int64), given to FAISS with `add_with_ids`, so they stay stable.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

FLAT_MAX_VECTORS = 50_000
INDEX_KINDS = ("flat", "ivf")
INDEX_MODES = ("auto", *INDEX_KINDS)
# A flat index accepts (and ignores) nprobe: the type changes by itself as the collection grows,
# so a client must not have to know which one it is talking to.
SEARCH_PARAMS = {"flat": ("nprobe",), "ivf": ("nprobe",)}
MIN_POINTS_PER_LIST = 39
MAX_TRAIN_POINTS_PER_LIST = 256
RETRAIN_GROWTH = 4


def choose_kind(n: int, mode: str, flat_max: int = FLAT_MAX_VECTORS) -> str:
    if mode not in INDEX_MODES:
        raise ValueError(f"index mode {mode!r} is not one of {INDEX_MODES}")
    if mode != "auto":
        return mode
    return "ivf" if n > flat_max else "flat"


def default_nlist(n: int) -> int:
    return max(1, min(int(4 * math.sqrt(max(n, 1))), n // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: 1/16 of the lists, at least 8 (or all when there are fewer)."""
    return min(nlist, max(8, nlist // 16))


def new_flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def train_ivf(vectors: np.ndarray, *, nlist: int | None = None, seed: int = 0) -> faiss.Index:
    """An empty IndexIVFFlat (inner product) trained on a seeded sample of `vectors`."""
    n, dim = vectors.shape
    nlist = nlist or default_nlist(n)
    if n < nlist:
        raise ValueError(f"cannot train an IVF index with {nlist} lists on {n} vectors")
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    limit = nlist * MAX_TRAIN_POINTS_PER_LIST
    sample = vectors
    if n > limit:
        sample = vectors[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]
    ivf.train(np.ascontiguousarray(sample, dtype=np.float32))
    ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # fast remove_ids by id
    return ivf


def search_parameters(kind: str, params: dict[str, Any] | None, defaults: dict[str, Any]) -> Any:
    """Per-call FAISS search parameters; unknown keys raise ValueError listing the valid ones."""
    params = dict(params or {})
    valid = SEARCH_PARAMS[kind]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown search parameters {unknown} for a {kind} index; valid: {list(valid)}")
    if kind == "ivf":
        nprobe = int(params.get("nprobe", defaults.get("nprobe", 1)))
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        return faiss.SearchParametersIVF(nprobe=nprobe)
    return None


def serialize(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def deserialize(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
