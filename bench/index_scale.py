"""Benchmark the vector index at a million real embeddings: flat, IVF-Flat, IVF-SQ8 and IVF-PQ.

    python bench/index_scale.py --scratch /tmp/simsearch-scale              # everything, cached
    python bench/index_scale.py --scratch /tmp/simsearch-scale --stage measure   # re-time only
    python bench/index_scale.py --scratch /tmp/s -n 200000 --kinds flat ivfpq   # smaller, quicker

Vectors: bench/scale_vectors.py (CIFAR-10 through a trained encoder under random augmentations,
cached under SCRATCH/vectors/). Queries: 1,000 augmented views not in the index; ground truth:
their exact top 10 (cached).

For each kind, one index directory under SCRATCH/index-<n>-<kind>/, built through the store
(ImageIndex): `flat` ingests the vectors into SQLite in one transaction and compacts (the ingest
time is printed apart: every kind shares it); `ivf` and `ivfpq` start from a copy of that
SQLite file and `compact(retrain=True)`: sample, train, add, tune by measured recall, write.
Build seconds = that compaction. A kind whose directory exists is not built again (--rebuild).

Then each index is measured in a fresh process (`--measure DIR`): open and ready seconds
(ImageIndex.open; to the first answered search), RSS after open, after the first search and after
all queries (anonymous and file-backed: mapped pages count once touched), recall@10 against the
exact top 10, queries/s of the first (cold) pass, then single-threaded (one query per call: the
vector index alone, and ImageIndex.search with its record lookups) and batched (all queries in one
call, 1 thread and all threads), and each QPS as a ratio to flat's.
Goal: recall@10 >= 0.95 at >= 100x the flat index's QPS; ready <= 5 s.

The machine's load average is printed with the figures: on a shared machine rerun `--stage measure`
when it is quiet (the builds stay cached). Results go to SCRATCH/results-<n>.json too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before FAISS loads: see simsearch/cli.py

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KINDS = ("flat", "ivf", "ivfsq", "ivfpq")
SINGLE_BUDGET_S = 20.0  # one-query-per-call timing stops after this long (flat at 1M: ~50 ms a query)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) + f" on {os.cpu_count()} cores"


def ground_truth(scratch: Path, base: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Row numbers of each query's exact top k (cached)."""
    import faiss

    cache = scratch / f"gt-{len(base)}-{len(queries)}.npy"
    if cache.is_file():
        return np.load(cache)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    for start in range(0, len(base), 100_000):
        chunk = np.ascontiguousarray(base[start : start + 100_000])
        scores, rows = faiss.knn(queries, chunk, k, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, rows + start)
    heap.finalize()
    np.save(cache, heap.I)
    return heap.I


def ingest(directory: Path, base: np.ndarray) -> dict[str, Any]:
    """The flat index: every vector into SQLite in one transaction, then its compaction."""
    from index.store import ImageIndex

    started = time.perf_counter()
    # raw cosine (no whitening, index/whitening.py): the ground truth is exact search on the raw vectors
    ix = ImageIndex.create(directory, base.shape[1], index_mode="flat", model_name="bench", whiten="off")
    for start in range(0, len(base), 50_000):
        chunk = base[start : start + 50_000]
        ix.add(chunk, [{"path": f"v/{start + i}.jpg", "sha256": f"{start + i:064x}"} for i in range(len(chunk))])
    ix.commit()  # starts the compaction in the background
    ingest_s = time.perf_counter() - started
    ix.wait_compaction()
    build_s = time.perf_counter() - started - ingest_s
    ix.close()
    return {"ingest_s": round(ingest_s, 1), "build_s": round(build_s, 1)}


def copy_index(source: Path, target: Path) -> None:
    """SQLite copied (after a checkpoint), base files hard-linked: the copy opens as the source does."""
    conn = sqlite3.connect(source / "index.sqlite")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    target.mkdir(parents=True)
    shutil.copy2(source / "index.sqlite", target / "index.sqlite")
    for p in source.glob("base.*"):
        os.link(p, target / p.name)


def build_kind(flat_dir: Path, directory: Path, kind: str, budget: str | None) -> dict[str, Any]:
    from index.store import ImageIndex

    copy_index(flat_dir, directory)
    with ImageIndex.open(directory) as ix:
        ix.configure(index_mode=kind, memory_budget=budget)
        started = time.perf_counter()
        ix.compact(retrain=True)
        return {"build_s": round(time.perf_counter() - started, 1), "build": ix.stats()["base"]["build"]}


def rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def measure(directory: Path, queries: np.ndarray, truth_ids: np.ndarray) -> dict[str, Any]:
    """Everything about one index, in this (fresh) process."""
    import faiss

    from index import vector_index as vi
    from index.store import ImageIndex
    from index.tuning import recall

    rss_start = rss()
    started = time.perf_counter()
    ix = ImageIndex.open(directory)
    open_s = time.perf_counter() - started
    rss_open = rss()
    ix.search(queries[:1], 10)
    ready_s = time.perf_counter() - started
    rss_first = rss()  # a search maps the pages it touches: all of them for flat
    st = ix.stats()
    settings = vi.search_parameters(st["index_kind"], None, {"nprobe": st["nprobe"], "k_factor": st["k_factor"]})
    layered = ix._index  # the vector index alone: what FAISS, the re-ranking and the merge cost

    faiss.omp_set_num_threads(1)
    t = time.perf_counter()
    found = layered.search(queries, 10, params=settings)[1]  # the first pass: pages come in from the cache
    cold = len(queries) / (time.perf_counter() - t)
    rec = recall(found, truth_ids)
    t = time.perf_counter()
    layered.search(queries, 10, params=settings)
    batch_1t = len(queries) / (time.perf_counter() - t)
    single: dict[str, float] = {}
    for name, fn in (("vector_index", lambda q: layered.search(q, 10, params=settings)),
                     ("image_index", lambda q: ix.search(q, 10))):
        done, t = 0, time.perf_counter()
        while done < len(queries) and time.perf_counter() - t < SINGLE_BUDGET_S:
            fn(queries[done : done + 1])
            done += 1
        single[name] = done / (time.perf_counter() - t)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    layered.search(queries, 10, params=settings)
    batch_all = len(queries) / (time.perf_counter() - t)
    out = {
        "kind": st["index_kind"], "count": st["count"], "nlist": st["nlist"], "pq_m": st["pq_m"],
        "rerank": st["rerank"], "nprobe": st["nprobe"], "k_factor": st["k_factor"],
        "recall_estimate": st["recall_estimate"].get("recall_at_10"), "recall_at_10": round(rec, 4),
        "open_s": round(open_s, 3), "ready_s": round(ready_s, 3), "rss_before_open": rss_start,
        "rss_after_open": rss_open, "rss_after_first_search": rss_first, "rss_after_queries": rss(),
        "qps_first_pass_1thread": round(cold, 1), "base_file_bytes": st["memory"]["base_file_bytes"],
        "index_ram_bytes": st["memory"]["index_ram_bytes"], "bytes_on_disk": st["bytes_on_disk"],
        "qps_single_vector_index": round(single["vector_index"], 1),
        "qps_single_image_index": round(single["image_index"], 1),
        "qps_batch_1thread": round(batch_1t, 1), "qps_batch_all_threads": round(batch_all, 1),
        "load_average": load_average(),
    }
    ix.close()
    return out


def measure_in_fresh_process(directory: Path, queries_file: Path, truth_file: Path) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--measure", str(directory), "--queries-file", str(queries_file),
                           "--truth-file", str(truth_file)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"measuring {directory} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = round(time.perf_counter() - started, 1)
    return result


def report(results: dict[str, Any]) -> None:
    flat = results.get("flat", {}).get("measure", {})
    print(f"\n{'kind':<6} {'build s':>8} {'disk MB':>8} {'RSS open MB':>11} {'ready s':>8} {'recall@10':>9} "
          f"{'1q/s idx':>9} {'1q/s store':>10} {'batch 1t':>9} {'batch all':>9} {'x flat 1q':>9} {'x flat batch':>12}")
    for kind, r in results.items():
        m = r.get("measure")
        if not m:
            continue
        ratio = (m["qps_single_vector_index"] / flat["qps_single_vector_index"]) if flat else float("nan")
        bratio = (m["qps_batch_1thread"] / flat["qps_batch_1thread"]) if flat else float("nan")
        print(f"{kind:<6} {r.get('build_s', float('nan')):>8.1f} {m['bytes_on_disk'] / 1e6:>8.0f} "
              f"{m['rss_after_open']['VmRSS'] / 1e6:>11.0f} {m['ready_s']:>8.2f} {m['recall_at_10']:>9.4f} "
              f"{m['qps_single_vector_index']:>9.1f} {m['qps_single_image_index']:>10.1f} "
              f"{m['qps_batch_1thread']:>9.1f} {m['qps_batch_all_threads']:>9.1f} {ratio:>9.1f} {bratio:>12.1f}")
        r["qps_ratio_to_flat_single"], r["qps_ratio_to_flat_batch_1thread"] = round(ratio, 1), round(bratio, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scratch", type=Path, help="cache directory (vectors, indexes, results), outside the repository")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: bench/scale_vectors.py's)")
    p.add_argument("-n", type=int, default=1_000_000, help="vectors indexed")
    p.add_argument("--queries", type=int, default=1000, help="queries (not in the index)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--memory-budget", default=None, help="for ivf/ivfpq (default: the store's)")
    p.add_argument("--stage", choices=("all", "build", "measure"), default="all")
    p.add_argument("--rebuild", action="store_true", help="build the indexes again")
    p.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--queries-file", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--truth-file", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure is not None:  # the fresh process of one measurement
        print(json.dumps(measure(args.measure, np.load(args.queries_file), np.load(args.truth_file))))
        return 0
    if args.scratch is None:
        p.error("--scratch is required")
    import logging

    from scale_vectors import default_model, ensure_vectors

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    args.scratch.mkdir(parents=True, exist_ok=True)
    model = args.model or default_model(args.scratch, 5.0)
    base, all_queries = ensure_vectors(args.scratch, model, args.n)
    queries = np.ascontiguousarray(all_queries[: args.queries])
    truth_rows = ground_truth(args.scratch, base, queries)
    truth_ids = truth_rows + 1  # the flat index was filled in order: ids are rows + 1
    np.save(args.scratch / "bench-queries.npy", queries)
    np.save(args.scratch / "bench-truth.npy", truth_ids)
    print(f"{len(base)} vectors of dim {base.shape[1]}, {len(queries)} queries; load {load_average()}")
    results_file = args.scratch / f"results-{args.n}.json"
    results: dict[str, Any] = json.loads(results_file.read_text()) if results_file.is_file() else {}
    flat_dir = args.scratch / f"index-{args.n}-flat"
    for kind in args.kinds if args.stage in ("all", "build") else []:
        directory = args.scratch / f"index-{args.n}-{kind}"
        if directory.exists() and not args.rebuild and kind in results:
            continue
        shutil.rmtree(directory, ignore_errors=True)
        print(f"building {kind} ... (load {load_average()})", flush=True)
        if kind == "flat":
            results[kind] = ingest(directory, base)
        else:
            if not flat_dir.exists():
                raise SystemExit("build flat first (--kinds flat ...): the other kinds start from its SQLite file")
            results[kind] = build_kind(flat_dir, directory, kind, args.memory_budget)
        results[kind]["load_average"] = load_average()
        print(f"  {kind}: {results[kind]}")
        results_file.write_text(json.dumps(results, indent=2))
    for kind in args.kinds if args.stage in ("all", "measure") else []:
        directory = args.scratch / f"index-{args.n}-{kind}"
        if not directory.exists():
            continue
        print(f"measuring {kind} in a fresh process ... (load {load_average()})", flush=True)
        results.setdefault(kind, {})["measure"] = measure_in_fresh_process(
            directory, args.scratch / "bench-queries.npy", args.scratch / "bench-truth.npy")
        results_file.write_text(json.dumps(results, indent=2))
    report(results)
    results_file.write_text(json.dumps(results, indent=2))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
