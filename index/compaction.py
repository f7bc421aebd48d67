"""Compaction: a new base snapshot from the rows of one commit, and when one is due.

A commit only writes SQLite; its new vectors live in every process's small in-memory delta
(index/layered.py). When the delta (or the removals) outgrow `DELTA_MIN_ROWS` and a share of the
base, when the collection crosses into another kind, or when it has outgrown its training
`RETRAIN_GROWTH` times, the writer builds a new base from a read snapshot of commit S, in a
background thread on its own connection, so searches and writes go on:

1. plan the kind for the number of vectors and the memory budget (vector_index.plan_index);
   train on a seeded sample when the kind or its shape changes, the collection outgrew its
   training, or `--retrain` asks; else reuse the recorded training (blob `trained`);
2. add every row (streamed in chunks) — or, with the recorded training, keep the last base's
   encoded rows (minus those removed since) and add only the rows added since — writing
   `base.<S>.vectors.npy` when the kind re-ranks, then
   `base.<S>.ids.npy`; after a training, choose nprobe / k_factor by measured recall
   (index/tuning.py); write `base.<S>.faiss`. All through embed/atomic.py;
3. publish, in one short write transaction: the metadata points at S, the log of removals S
   reflects is trimmed, the generation goes up. Readers (index/generation.py) then open S, a
   memory map. It is dropped instead when the index changed model or another base got in first.

A crash anywhere leaves the last published base (temporary and unpublished files are removed
by the next writer: faiss_file.remove_stale). Only one process compacts at a time (a flock on
`.compact.lock`); the others skip.
"""

from __future__ import annotations

import fcntl
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import tuning, whitening
from index import vector_index as vi
from index.budget import effective_budget
from index.faiss_file import base_paths, read_array, read_index, remove_stale, write_array, write_index
from index.generation import rows_after, trained_index
from index.layered import BaseSnapshot, LayeredIndex
from index.schema import DB_FILE, FORMAT_VERSION, ensure_removed_table, read_meta, write_meta

logger = logging.getLogger(__name__)

DELTA_MIN_ROWS = 2_000
DELTA_FRACTION = 0.05
# The delta is searched exactly, so every query pays for its rows (~D multiply-adds each): capped,
# so a big base's delta costs a small share of a search (20,000 x 256-d ~ 2% of an exact search of
# a million), at the price of a compaction every 20,000 writes there.
DELTA_MAX_ROWS = 20_000
REMOVED_FRACTION = 0.10
LOCK_FILE = ".compact.lock"
CHUNK_ROWS = 50_000  # rows of the last base's re-ranking vectors copied at a time


class Cancelled(Exception):
    """The handle closed while its compaction ran; nothing was published."""


def memory_budget(meta: dict[str, Any]) -> int:
    return effective_budget(int(meta.get("memory_budget") or 0))


def planned(meta: dict[str, Any], n: int) -> vi.Plan:
    """The plan for `n` vectors under the recorded mode and budget, with hysteresis: an auto index
    that left flat goes back only below half the threshold, so it does not flip-flop."""
    mode, flat_max, dim = meta["index_mode"], int(meta["flat_max"]), int(meta["dim"])
    if mode == "auto" and meta["index_kind"] != "flat" and flat_max // 2 < n <= flat_max:
        mode = meta["index_kind"]
    return vi.plan_index(n, dim, mode, memory_budget(meta), flat_max, opq=bool(meta.get("opq")))


def due(meta: dict[str, Any], layered: LayeredIndex) -> str | None:
    """Why a compaction is due now (a short reason), or None."""
    n, base_n = layered.ntotal, len(layered.base)
    try:
        plan = planned(meta, n)
    except ValueError:  # over the budget whatever the plan: the smallest plan will say so at build
        plan = vi.Plan.of_meta(meta)
    if plan.kind != meta["index_kind"] and n >= vi.MIN_POINTS_PER_LIST:
        return f"kind {meta['index_kind']} -> {plan.kind}"
    if vi.needs_training(plan) and n > vi.RETRAIN_GROWTH * max(int(meta.get("trained_on") or 0), 1):
        return f"grown {vi.RETRAIN_GROWTH}x past its training"
    if (reason := whitening.refit_reason(meta, n)) is not None:
        return reason
    if layered.delta_count > max(DELTA_MIN_ROWS, min(DELTA_FRACTION * base_n, DELTA_MAX_ROWS)):
        return f"delta of {layered.delta_count} rows"
    if len(layered.removed) > max(DELTA_MIN_ROWS, REMOVED_FRACTION * base_n):
        return f"{len(layered.removed)} removed rows"
    return None


def _sample(conn: sqlite3.Connection, dim: int, size: int, seed: int = 0) -> np.ndarray:
    ids = np.fromiter((r[0] for r in conn.execute("SELECT id FROM items ORDER BY id")), dtype=np.int64)
    pick = np.sort(np.random.default_rng(seed).choice(ids, min(size, len(ids)), replace=False)).tolist()
    vecs = []
    for start in range(0, len(pick), 500):
        chunk = pick[start : start + 500]
        rows = conn.execute(f"SELECT vector FROM items WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id", chunk)
        vecs.append(np.frombuffer(b"".join(r[0] for r in rows), dtype="<f4").reshape(-1, dim))
    return np.concatenate(vecs) if vecs else np.zeros((0, dim), dtype=np.float32)


def build_base(directory: Path, conn: sqlite3.Connection, meta: dict[str, Any], generation: int, *,
               retrain: bool = False, should_stop: Callable[[], bool] = lambda: False) -> tuple[dict[str, Any], bytes | None]:
    """Write `base.<generation>.*` from the rows `conn` sees (its transaction is commit `generation`).

    Returns (the metadata updates that publish it, the training blob to record or None to keep it).
    """
    started = time.perf_counter()
    dim = int(meta["dim"])
    n = int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    hwm = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0])
    plan, recorded = planned(meta, n), vi.Plan.of_meta(meta)
    grown = n > vi.RETRAIN_GROWTH * max(int(meta.get("trained_on") or 0), 1)
    shape_changed = (plan.kind, plan.pq_m, plan.opq) != (recorded.kind, recorded.pq_m, recorded.opq)
    space, space_updates, refitted = whitening.for_base(conn, meta, n, lambda size: _sample(conn, dim, size))
    # a new whitening is a new space: what was trained in the old one is trained again
    train = vi.needs_training(plan) and (retrain or shape_changed or grown or refitted or not meta.get("trained_on"))
    updates: dict[str, Any] = {"base_generation": generation if n else 0, "base_hwm": hwm if n else 0,
                               "base_count": n, "format_version": FORMAT_VERSION, **space_updates}
    blob, trained = None, time.perf_counter()
    if not vi.needs_training(plan):
        index = vi.new_flat(dim)
        updates.update(trained_on=0, training_size=0, nprobe=0, k_factor=0)
        blob = b""  # no training to keep
    elif train:
        sample = _sample(conn, dim, vi.training_size(plan, n))
        index = vi.train(plan, sample if space is None else space.apply(sample))
        blob = vi.serialize(index)
        updates.update(trained_on=n, training_size=len(sample), trained_at=time.time())
    else:
        plan = replace(recorded, rerank=plan.rerank)  # the budget decides re-ranking at every build
        index = trained_index(conn, meta, directory)
    trained = time.perf_counter() - trained
    updates.update(plan.as_meta())
    if not n:
        return updates, blob
    paths, id_parts = base_paths(directory, generation), []
    # without a new training or space, the last base's encoded vectors are kept (minus the rows gone
    # since), and only the rows added since are encoded: a compaction costs the delta, plus copying
    previous = None if train or refitted or plan.kind != recorded.kind else _previous_base(directory, conn, meta, plan)
    if previous is not None:
        index, start, old_vectors = previous
        id_parts.append(start)

    def vector_chunks() -> Iterator[np.ndarray]:
        if previous is not None and old_vectors is not None:
            for first in range(0, len(start), CHUNK_ROWS):
                yield old_vectors[first : first + CHUNK_ROWS]
        for ids, vecs in rows_after(conn, int(meta["base_hwm"]) if previous is not None else 0, dim):
            if should_stop():
                raise Cancelled
            if space is not None:
                vecs = space.apply(vecs)
            index.add_with_ids(vecs, ids)
            id_parts.append(ids)
            yield vecs

    added = time.perf_counter()
    if plan.rerank:
        write_array(paths.vectors, (n, dim), "<f4", vector_chunks())
    else:
        for _ in vector_chunks():
            pass
    all_ids = np.concatenate(id_parts)
    write_array(paths.ids, all_ids.shape, "<i8", [all_ids])
    added = time.perf_counter() - added
    tuned = time.perf_counter()
    if train or (vi.needs_training(plan) and not meta.get("recall_estimate")):
        vectors = read_array(paths.vectors) if plan.rerank else None
        base = BaseSnapshot(generation, hwm, plan.kind, index, all_ids, vectors)
        updates.update(_tune(conn, base, dim, plan, float(meta.get("recall_target") or tuning.DEFAULT_RECALL_TARGET),
                             space))
    elif not vi.needs_training(plan):
        updates["recall_estimate"] = {"recall_at_10": 1.0, "exact": True, "measured_at": time.time()}
    tuned = time.perf_counter() - tuned
    write_index(index, paths.faiss)
    updates["base_build"] = {"seconds": round(time.perf_counter() - started, 3), "train_seconds": round(trained, 3),
                             "add_seconds": round(added, 3), "tune_seconds": round(tuned, 3), "trained": train,
                             "merged": previous is not None, "built_at": time.time()}
    return updates, blob


def _previous_base(directory: Path, conn: sqlite3.Connection, meta: dict[str, Any],
                   plan: vi.Plan) -> tuple[Any, np.ndarray, np.ndarray | None] | None:
    """The published base read into memory (a private, writable copy) without the rows removed since:
    (index, its ids, its re-ranking vectors as a lazy filtered view), or None to build from the rows."""
    old = base_paths(directory, int(meta.get("base_generation") or 0))
    if not meta.get("base_generation"):
        return None
    try:
        index = read_index(old.faiss, mmap=False)
        ids = np.load(old.ids)
        vectors = read_array(old.vectors) if plan.rerank else None
    except (RuntimeError, OSError, ValueError) as e:
        logger.info("%s: building from the rows (last base unreadable: %s)", directory, e)
        return None
    if index.ntotal != len(ids) or (vectors is not None and len(vectors) != len(ids)):
        return None
    alive = np.fromiter((r[0] for r in conn.execute("SELECT id FROM items WHERE id <= ? ORDER BY id",
                                                    (int(meta["base_hwm"]),))), dtype=np.int64)
    keep = np.isin(ids, alive, assume_unique=True)
    if not keep.all():
        index.remove_ids(faiss.IDSelectorBatch(ids[~keep]))
    kept_vectors = None if vectors is None else (vectors if keep.all() else _Rows(vectors, np.flatnonzero(keep)))
    return index, ids[keep], kept_vectors


class _Rows:
    """Rows `rows` of a (memory-mapped) array, sliced lazily: a filtered copy never sits in memory whole."""

    def __init__(self, array: np.ndarray, rows: np.ndarray) -> None:
        self.array, self.rows = array, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, part: slice) -> np.ndarray:
        return self.array[self.rows[part]]


def _tune(conn: sqlite3.Connection, base: BaseSnapshot, dim: int, plan: vi.Plan, target: float,
          space: whitening.Whitening | None = None) -> dict[str, Any]:
    rows = tuning.sample_queries(base.ids)
    if base.vectors is not None:
        queries = np.ascontiguousarray(base.vectors[rows])

        def chunks() -> Iterator[np.ndarray]:
            for start in range(0, len(base.ids), 50_000):
                yield np.ascontiguousarray(base.vectors[start : start + 50_000])
    else:
        wanted = set(base.ids[rows].tolist())
        queries = np.concatenate([v[np.isin(i, list(wanted))] for i, v in rows_after(conn, 0, dim)])
        if space is not None:  # the base holds whitened vectors: measure recall in that space
            queries = space.apply(queries)

        def chunks() -> Iterator[np.ndarray]:
            for _, vecs in rows_after(conn, 0, dim):
                yield np.ascontiguousarray(vecs if space is None else space.apply(vecs))
    query_ids = base.ids[rows]
    truth = tuning.ground_truth(queries, query_ids, np.asarray(base.ids), chunks)
    return tuning.tune(base, dim, plan.nlist, queries, query_ids, truth, target).as_meta()


def publish(conn: sqlite3.Connection, snapshot_meta: dict[str, Any], generation: int, updates: dict[str, Any],
            blob: bytes | None) -> bool:
    """In `conn`'s write transaction: point the index at the new base; False (nothing written) when
    the index changed model or dimension since the snapshot, or a newer base is published."""
    now = read_meta(conn)
    if (now.get("vector_generation"), now["dim"]) != (snapshot_meta.get("vector_generation"), snapshot_meta["dim"]):
        return False
    if int(now.get("base_generation") or 0) >= generation and updates["base_generation"]:
        return False
    record_base(conn, generation, updates, blob)
    write_meta(conn, {"generation": int(now["generation"]) + 1, "committed_at": time.time()})
    return True


def record_base(conn: sqlite3.Connection, generation: int, updates: dict[str, Any], blob: bytes | None) -> None:
    """The metadata and training of the base of commit `generation`; the removals it reflects leave the log."""
    ensure_removed_table(conn)
    whitening.record(conn, updates)  # a new whitening fit travels in `updates`: into its blob
    conn.execute("DELETE FROM removed WHERE generation <= ?", (generation,))
    if blob is not None:
        conn.execute("DELETE FROM blobs WHERE key IN ('trained', 'ivf_trained')")
        if blob:
            conn.execute("INSERT INTO blobs (key, value) VALUES ('trained', ?)", (blob,))
    write_meta(conn, updates)


def compact(directory: Path, *, retrain: bool = False, wait: bool = True,
            should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
    """Build and publish a base from the latest commit, on private connections (the background job).
    Returns the published updates, or None when another process is compacting (`wait` False) or
    the snapshot went stale."""
    with open(directory / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        conn = sqlite3.connect(directory / DB_FILE, isolation_level=None, timeout=60, check_same_thread=False)
        try:
            conn.execute("BEGIN")
            try:
                meta = read_meta(conn)
                generation = int(meta["generation"])
                updates, blob = build_base(directory, conn, meta, generation, retrain=retrain, should_stop=should_stop)
            finally:
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
            try:
                ok = publish(conn, meta, generation, updates, blob)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT" if ok else "ROLLBACK")
        finally:
            conn.close()
    if not ok:
        logger.info("%s: compaction of commit %d is stale; dropped", directory, generation)
        return None
    remove_stale(directory, keep=updates["base_generation"] or generation)
    logger.info("%s: base snapshot %d published (%s, %d vectors, %.1f s)", directory, generation,
                updates["index_kind"], updates["base_count"], updates.get("base_build", {}).get("seconds", 0.0))
    return updates
