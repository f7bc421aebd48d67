"""Search parameters chosen by measured recall, at training time, on the index's own vectors.

A seeded sample of `TUNING_QUERIES` (1,000) stored vectors is searched against exact search over all of
them (faiss.contrib's blockwise ground truth, so the vectors never need to sit in memory whole).
Each query's own item is left out of both lists: it would be a free hit, and a user's query is
rarely an indexed vector itself. recall@10 = the share of the exact ten found by the approximate
ten. For each re-ranking factor (vector_index.K_FACTORS of the kind; one setting for kinds that
do not re-rank) the smallest nprobe of `NPROBE_STEPS` that reaches the target is searched for; of
these settings the one with the fastest measured batch (best of three runs) wins. When none does, the best recall wins, and the estimate
recorded with the index says so (`index stats`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from index import schema
from index import vector_index as vi
from index.layered import BaseSnapshot, LayeredIndex

logger = logging.getLogger(__name__)

RECALL_K = 10
DEFAULT_RECALL_TARGET = schema.DEFAULT_RECALL_TARGET
TUNING_QUERIES = 1000
TUNING_MIN_QUERIES = 300
NPROBE_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
                3072, 4096, 6144, 8192)
FLAT_GAIN = 0.002  # nprobe stops growing once two steps in a row add less recall than this


@dataclass
class Setting:
    nprobe: int
    k_factor: int
    recall: float
    ms_per_query: float


@dataclass
class Tuned:
    nprobe: int
    k_factor: int
    recall: float
    target: float
    queries: int
    reached: bool
    table: list[Setting]

    def as_meta(self) -> dict:
        return {"nprobe": self.nprobe, "k_factor": self.k_factor,
                "recall_estimate": {"recall_at_10": round(self.recall, 4), "target": self.target,
                                    "queries": self.queries, "reached": self.reached, "measured_at": time.time(),
                                    "table": [asdict(s) for s in self.table]}}


def sample_queries(ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """Row numbers of the query sample (ascending): `TUNING_QUERIES`, or a tenth of a small index
    (at least `TUNING_MIN_QUERIES`), whose estimate matters less than the time to make it."""
    n = min(len(ids), TUNING_QUERIES, max(TUNING_MIN_QUERIES, len(ids) // 10))
    return np.sort(np.random.default_rng(seed).choice(len(ids), n, replace=False))


def ground_truth(queries: np.ndarray, query_ids: np.ndarray, ids: np.ndarray,
                 chunks: Callable[[], Iterator[np.ndarray]], k: int = RECALL_K) -> np.ndarray:
    """The exact top-k ids of each query over the vectors `chunks()` yields in `ids` order, itself left out."""
    _, rows = knn_ground_truth(queries, chunks(), k + 1, metric_type=faiss.METRIC_INNER_PRODUCT, ngpu=0)
    return leave_self_out(np.where(rows >= 0, ids[np.clip(rows, 0, None)], -1), query_ids, k)


def leave_self_out(found: np.ndarray, query_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row without its query's own id (and without -1), first `k` kept, -1 padded."""
    keep = (found != query_ids[:, None]) & (found >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")  # kept ones first, in their order
    out = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(found, order, 1), -1)[:, :k]
    return np.pad(out, ((0, 0), (0, k - out.shape[1])), constant_values=-1) if out.shape[1] < k else out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found & truth| / |truth| (ids; -1 is no id)."""
    if not len(truth):
        return 1.0
    hit = ((found[:, :, None] == truth[:, None, :]) & (truth[:, None, :] >= 0)).any(axis=1)
    return float(np.mean(hit.sum(1) / np.maximum(1, (truth >= 0).sum(1))))


def measure(index: LayeredIndex, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
            settings: vi.SearchSettings, k: int = RECALL_K, runs: int = 1) -> tuple[float, float]:
    """(recall@k, milliseconds per query of the batch: the best of `runs`)."""
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        _, found = index.search(queries, k + 1, params=settings)
        best = min(best, time.perf_counter() - started)
    return recall(leave_self_out(found, query_ids, k), truth), 1000 * best / max(1, len(queries))


def tune(base: BaseSnapshot, dim: int, nlist: int, queries: np.ndarray, query_ids: np.ndarray, truth: np.ndarray,
         target: float = DEFAULT_RECALL_TARGET) -> Tuned:
    """The cheapest (nprobe, k_factor) reaching `target` on this base (see the module docstring).

    Recall grows with nprobe and with k_factor, so the factors go from the largest down, each one's
    nprobe search starting where the larger factor's ended (a smaller factor needs at least as many
    lists), galloping up `NPROBE_STEPS` and then halving back; a factor whose recall stops growing
    below the target ends the search (smaller ones reach less).
    """
    index = LayeredIndex(base, dim)
    rerank = base.vectors is not None
    steps = [p for p in NPROBE_STEPS if p < nlist] + [nlist]
    table: list[Setting] = []
    done: dict[tuple[int, int], float] = {}

    def at(i: int, k_factor: int) -> float:
        if (steps[i], k_factor) not in done:
            r, ms = measure(index, queries, query_ids, truth, vi.SearchSettings(steps[i], k_factor, rerank))
            table.append(Setting(steps[i], k_factor, r, ms))
            done[steps[i], k_factor] = r
        return done[steps[i], k_factor]

    lo = 0
    for k_factor in sorted(vi.k_factors(base.kind), reverse=True) if rerank else (vi.DEFAULT_K_FACTOR,):
        below, i, gap, history = lo - 1, lo, 1, []
        while i < len(steps) and at(i, k_factor) < target:
            history.append(done[steps[i], k_factor])
            if len(history) >= 3 and history[-1] - history[-3] < FLAT_GAIN:
                break
            below, i, gap = i, min(i + gap, len(steps) - 1) if i < len(steps) - 1 else len(steps), gap * 2
        if i >= len(steps) or done[steps[i], k_factor] < target:
            break  # this factor cannot reach the target, and smaller ones reach less
        hi = i
        while hi - below > 1:  # the first step reaching the target lies in (below, hi]
            mid = (below + hi) // 2
            below, hi = (below, mid) if at(mid, k_factor) >= target else (mid, hi)
        lo = hi
    # per factor, its fewest lists that reach the target; those few are timed again (the choice rests on it)
    reached = [min((s for s in table if s.k_factor == f and s.recall >= target), key=lambda s: s.nprobe)
               for f in sorted({s.k_factor for s in table if s.recall >= target})]
    for s in reached if len(reached) > 1 else []:
        again = measure(index, queries, query_ids, truth, vi.SearchSettings(s.nprobe, s.k_factor, rerank), runs=2)[1]
        s.ms_per_query = min(s.ms_per_query, again)
    best = min(reached, key=lambda s: s.ms_per_query) if reached else max(table, key=lambda s: (s.recall, -s.ms_per_query))
    logger.info("tuned on %d queries (%d settings): nprobe %d, k_factor %d, recall@10 %.4f (target %.2f%s)",
                len(queries), len(table), best.nprobe, best.k_factor, best.recall, target,
                "" if reached else ", NOT reached")
    return Tuned(best.nprobe, best.k_factor, best.recall, target, len(queries), bool(reached), table)
