"""Which FAISS index for how many vectors and how much memory, how to train it, and per-call search
parameters. The numbers behind each rule are in index/README.md ("Index kinds").

Inner product on l2-normalised vectors = cosine similarity. The kinds of the base snapshot
(index/layered.py; the delta of recent writes is always exact):

- `flat` (`IndexIDMap2(IndexFlatIP)`): exact; up to `FLAT_MAX_VECTORS` (50,000), or in auto mode
  while it fits the memory budget and the collection is too small to train anything else.
- `ivf` (`IndexIVFFlat`): nlist = 4 sqrt(n) lists of full vectors; on request (`--index-type ivf`).
- `ivfsq` (`IndexIVFScalarQuantizer`, 8 bits a dimension: a quarter of the float bytes), the auto
  choice above 50,000 vectors: nlist = 4 sqrt(n); the candidates (max(k, 10) x `k_factor`) are
  re-ranked with the exact float32 vectors (a memory-mapped file beside the index) when the memory
  budget holds them. On real embeddings it reaches recall@10 0.95 sooner than IVF-Flat.
  The codes are `DirectSQ`'s: each vector scaled by one factor s (127 / the training sample's
  largest |component|), clipped to [-128, 127] and stored as signed bytes (`QT_8bit_direct_signed`,
  not residual); queries are scaled the same way (FAISS rounds them to the same integer grid), so
  inner products are s^2 x the cosine, up to rounding, and the candidates are re-ranked exactly
  as before; the list scan is an integer dot product and runs ~30% faster than FAISS's
  trained per-dimension 8-bit codes at the same nprobe (index/README.md). The scale is kept in the
  file as an `IndexPreTransform` around the IVF (never used to transform: FAISS would not clip);
  `wrap` turns such a file into a `DirectSQ` wherever an index is read, built or deserialised.
  Indexes built before keep their `QT_8bit` codes and work as they are.
- `ivfpq` (`IndexIVFPQFastScan`, 4-bit PQ with `pq_m` sub-quantizers, optionally behind an OPQ
  rotation): the fewest bytes a vector, for budgets that do not hold the SQ8 codes (auto), or on
  request; `pq_m` is the largest of D/2, D/4, D/8 that fits, re-ranked when the vectors fit too.
  SIMD lookups make a list scan cheap, but 4-bit codes rank real (anisotropic) embeddings coarsely:
  it needs k_factor 32-64 (index/README.md has the measurements).

Trained on a seeded sample (k-means: at most `TRAIN_POINTS_PER_LIST` per list, PQ on at most
`PQ_TRAIN_MAX`), vectors added later are encoded with that training; the index is trained again when
the collection has grown `RETRAIN_GROWTH` times past what it was trained on, when the kind changes,
or on request. nprobe / k_factor are chosen at training time by measured recall (index/tuning.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

FLAT_MAX_VECTORS = 50_000
INDEX_KINDS = ("flat", "ivf", "ivfsq", "ivfpq")
INDEX_MODES = ("auto", *INDEX_KINDS)
IVF_KINDS = ("ivf", "ivfsq", "ivfpq")
RERANK_KINDS = ("ivfsq", "ivfpq")  # lossy codes: candidates re-ranked with the exact vectors
# Every kind accepts every parameter and ignores what it has no use for: the kind changes by itself
# as the collection grows, so a client must not have to know which one it is talking to.
SEARCH_PARAMS = ("k_factor", "nprobe", "rerank")
MIN_POINTS_PER_LIST = 39  # FAISS warns below this: k-means has too few points per centroid
TRAIN_POINTS_PER_LIST = 40  # just above FAISS's warning (39): k-means cost grows with it, quality barely
PQ_TRAIN_MAX = 65_536
RETRAIN_GROWTH = 4
KMEANS_ITERATIONS = 10
PQ_BITS = 4
LISTS_PER_SQRT_N = {"ivf": 4.0, "ivfsq": 4.0, "ivfpq": 1.0}
SQ_BYTES_PER_DIM = 1  # 8-bit scalar quantizer
SQ_DIRECT_LIMIT = 127  # DirectSQ: the training sample's largest |component| maps to this code
DEFAULT_K_FACTOR = 4
K_FACTORS = {"ivfsq": (1, 2, 4), "ivfpq": (8, 16, 32, 64)}  # tried by index/tuning.py, per kind
RERANK_MIN_K = 10  # re-ranking looks at max(k, this) x k_factor candidates: k_factor is tuned at k = 10
ID_BYTES = 8


@dataclass(frozen=True)
class Plan:
    """What to build: the kind and its shape (0 where a field means nothing for the kind)."""

    kind: str
    nlist: int = 0
    pq_m: int = 0
    opq: bool = False
    rerank: bool = False

    def as_meta(self) -> dict[str, Any]:
        return {"index_kind": self.kind, "nlist": self.nlist, "pq_m": self.pq_m, "opq": self.opq,
                "rerank": self.rerank}

    @classmethod
    def of_meta(cls, meta: dict[str, Any]) -> Plan:
        return cls(meta["index_kind"], int(meta.get("nlist") or 0), int(meta.get("pq_m") or 0),
                   bool(meta.get("opq")), bool(meta.get("rerank")))


def default_nlist(n: int, kind: str = "ivf") -> int:
    per = LISTS_PER_SQRT_N.get(kind, 4.0)
    return max(1, min(int(per * math.sqrt(max(n, 1))), n // MIN_POINTS_PER_LIST))


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query before tuning measures better: 1/16 of the lists, at least 8."""
    return min(nlist, max(8, nlist // 16))


def ram_bytes(plan: Plan, n: int, dim: int) -> int:
    """Bytes a search touches once warm: codes or vectors, ids, coarse centroids, re-rank vectors."""
    if plan.kind == "flat":
        return n * (4 * dim + ID_BYTES)
    centroids = plan.nlist * 4 * dim
    if plan.kind == "ivf":
        return n * (4 * dim + ID_BYTES) + centroids
    code = SQ_BYTES_PER_DIM * dim if plan.kind == "ivfsq" else (plan.pq_m * PQ_BITS + 7) // 8
    extra = (n * 4 * dim if plan.rerank else 0) + (4 * dim * dim if plan.opq else 0)
    return n * (code + ID_BYTES) + centroids + extra


def pq_m_choices(dim: int) -> list[int]:
    """Sub-quantizer counts for 4-bit PQ, most accurate first: 2, 4 or 8 dimensions per code."""
    return [m for m in (dim // 2, dim // 4, dim // 8) if m >= 1 and dim % m == 0] or [dim]


def plan_index(n: int, dim: int, mode: str, budget: int = 0, flat_max: int = FLAT_MAX_VECTORS, *,
               opq: bool = False) -> Plan:
    """The plan for `n` vectors of `dim` in `budget` bytes of RAM (0: no limit); ValueError when
    even the smallest fitting plan needs more than the budget, naming what it would need."""
    if mode not in INDEX_MODES:
        raise ValueError(f"index mode {mode!r} is not one of {INDEX_MODES}")
    def fits(plan: Plan) -> bool:
        return not budget or ram_bytes(plan, n, dim) <= budget

    if mode == "flat" or (mode == "auto" and n <= flat_max and (fits(Plan("flat")) or n < 64 * MIN_POINTS_PER_LIST)):
        return Plan("flat")
    if mode == "ivf":
        return Plan("ivf", default_nlist(n, "ivf"))
    # auto, in the order measured fastest at recall@10 >= 0.95 (index/README.md): SQ8 codes with
    # re-ranking, SQ8 alone, then 4-bit PQ codes (fewer bytes, lower recall) for tight budgets
    plans = [] if mode == "ivfpq" else [Plan("ivfsq", default_nlist(n, "ivfsq"), rerank=r) for r in (True, False)]
    if mode != "ivfsq":
        plans += [Plan("ivfpq", default_nlist(n, "ivfpq"), m, opq, r) for m in pq_m_choices(dim)
                  for r in ((True, False) if mode == "ivfpq" else (False,))]
    for plan in plans:
        if fits(plan):
            return plan
    smallest = plans[-1]
    raise ValueError(f"{n} vectors of dim {dim} need at least {ram_bytes(smallest, n, dim):,} bytes of RAM "
                     f"({smallest.kind}, {smallest.pq_m or dim} codes a vector, no re-ranking); the memory budget "
                     f"is {budget:,}")


def needs_training(plan: Plan) -> bool:
    return plan.kind in IVF_KINDS


def training_size(plan: Plan, n: int) -> int:
    return min(n, max(plan.nlist * TRAIN_POINTS_PER_LIST, PQ_TRAIN_MAX if plan.kind == "ivfpq" else 0))


def k_factors(kind: str) -> tuple[int, ...]:
    return K_FACTORS.get(kind, (DEFAULT_K_FACTOR,))


def new_flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def train(plan: Plan, sample: np.ndarray, *, seed: int = 0) -> faiss.Index:
    """An empty index of `plan` trained on `sample` [N, D] (the caller draws it: `training_size`)."""
    dim = sample.shape[1]
    if plan.kind == "flat":
        return new_flat(dim)
    if len(sample) < plan.nlist:
        raise ValueError(f"cannot train {plan.nlist} lists on {len(sample)} vectors")
    quantizer = faiss.IndexFlatIP(dim)
    if plan.kind == "ivf":
        index = ivf = faiss.IndexIVFFlat(quantizer, dim, plan.nlist, faiss.METRIC_INNER_PRODUCT)
    elif plan.kind == "ivfsq":
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, plan.nlist, faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                            faiss.METRIC_INNER_PRODUCT, False)
        peak = float(np.abs(sample).max()) or 1.0
        index = DirectSQ.new(ivf, SQ_DIRECT_LIMIT / peak)
    else:
        ivf = faiss.IndexIVFPQFastScan(quantizer, dim, plan.nlist, plan.pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexPreTransform(faiss.OPQMatrix(dim, plan.pq_m), ivf) if plan.opq else ivf
    ivf.cp.seed, ivf.cp.niter = seed, KMEANS_ITERATIONS
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    return index


class DirectSQ:
    """An IVF index of signed 8-bit codes of s x v, used as a FAISS index is used here (`ntotal`, `d`,
    `train`, `add_with_ids`, `search`, `remove_ids`): vectors and queries are scaled and clipped on
    the way in, scores divided by s^2 on the way out. `holder` is what is written to disk: an
    IndexPreTransform whose only transform (A = s I) records s."""

    def __init__(self, holder: faiss.IndexPreTransform, owner: Any = None) -> None:
        self.holder = holder
        self._owner = owner  # the proxy that owns the C++ holder when `holder` is a downcast view of it
        self.ivf = faiss.downcast_index(holder.index)
        self.scale = float(faiss.vector_to_array(faiss.downcast_VectorTransform(holder.chain.at(0)).A)[0])

    @classmethod
    def new(cls, ivf: faiss.IndexIVFScalarQuantizer, scale: float) -> DirectSQ:
        transform = faiss.LinearTransform(ivf.d, ivf.d, False)
        faiss.copy_array_to_vector((np.eye(ivf.d, dtype=np.float32) * scale).ravel(), transform.A)
        transform.is_trained = True
        holder = faiss.IndexPreTransform(transform, ivf)
        out = cls(holder)
        out.ivf, out._owned = ivf, (transform, ivf)  # Python owns these until the holder is read back from disk
        return out

    @property
    def ntotal(self) -> int:
        return int(self.ivf.ntotal)

    @property
    def d(self) -> int:
        return int(self.ivf.d)

    def codes(self, x: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(x, dtype=np.float32) * self.scale, -SQ_DIRECT_LIMIT - 1, SQ_DIRECT_LIMIT)

    def train(self, x: np.ndarray) -> None:
        self.ivf.train(self.codes(x))
        self.holder.is_trained = True

    def add_with_ids(self, x: np.ndarray, ids: np.ndarray) -> None:
        self.ivf.add_with_ids(self.codes(x), ids)
        self.holder.ntotal = self.ivf.ntotal

    def remove_ids(self, sel: Any) -> int:
        removed = self.ivf.remove_ids(sel)
        self.holder.ntotal = self.ivf.ntotal
        return removed

    def search(self, x: np.ndarray, k: int, params: Any = None) -> tuple[np.ndarray, np.ndarray]:
        # the query is scaled too: FAISS rounds it to the codes' integer grid for an integer dot product
        scores, ids = self.ivf.search(self.codes(x), k, params=params)
        return np.where(ids >= 0, scores / np.float32(self.scale**2), scores), ids


def wrap(index: Any) -> Any:
    """A FAISS index as this package uses it: a `DirectSQ` holder becomes a `DirectSQ`."""
    if isinstance(index, faiss.IndexPreTransform) or type(index).__name__ == "IndexPreTransform":
        holder = faiss.downcast_index(index)
        if holder.chain.size() == 1 and isinstance(faiss.downcast_VectorTransform(holder.chain.at(0)),
                                                   faiss.LinearTransform):
            inner = faiss.downcast_index(holder.index)
            if isinstance(inner, faiss.IndexIVFScalarQuantizer) and \
                    inner.sq.qtype == faiss.ScalarQuantizer.QT_8bit_direct_signed:
                return DirectSQ(holder, owner=index)
    return index


def unwrap(index: Any) -> Any:
    """What to write to disk or serialise: a `DirectSQ`'s holder, any other index itself."""
    return index.holder if isinstance(index, DirectSQ) else index


def train_ivf(vectors: np.ndarray, *, nlist: int | None = None, seed: int = 0) -> faiss.Index:
    """An empty IndexIVFFlat trained on a seeded sample of `vectors` (used by index/duplicates.py)."""
    n = len(vectors)
    plan = Plan("ivf", nlist or default_nlist(n))
    limit = training_size(plan, n)
    sample = vectors
    if n > limit:
        sample = vectors[np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))]
    return train(plan, sample, seed=seed)


@dataclass
class SearchSettings:
    """One search's parameters; `sel` (a FAISS IDSelector) is set by the caller for filters."""

    nprobe: int = 1
    k_factor: int = DEFAULT_K_FACTOR
    rerank: bool = True
    sel: Any = field(default=None)


def search_parameters(kind: str, params: dict[str, Any] | None, defaults: dict[str, Any]) -> SearchSettings:
    """Per-call settings over the index's recorded ones; unknown keys raise ValueError listing the valid ones."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(SEARCH_PARAMS))
    if unknown:
        raise ValueError(f"unknown search parameters {unknown} for a {kind} index; valid: {list(SEARCH_PARAMS)}")
    merged = {**defaults, **params}
    nprobe = int(merged.get("nprobe") or 1)
    k_factor = int(merged.get("k_factor") or DEFAULT_K_FACTOR)
    if nprobe < 1:
        raise ValueError(f"nprobe must be >= 1, got {nprobe}")
    if k_factor < 1:
        raise ValueError(f"k_factor must be >= 1, got {k_factor}")
    rerank = merged.get("rerank", True)
    if not isinstance(rerank, bool):
        raise ValueError(f"rerank must be true or false, got {rerank!r}")
    return SearchSettings(nprobe=nprobe, k_factor=k_factor, rerank=rerank)


def serialize(index: Any) -> bytes:
    return faiss.serialize_index(unwrap(index)).tobytes()


def deserialize(data: bytes) -> Any:
    return wrap(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))
