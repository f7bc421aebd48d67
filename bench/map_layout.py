"""Bench: how well the map page's 2-D layout (index/layout.py) keeps what search sees, PCA vs UMAP.

    .venv/bin/python bench/map_layout.py --model /tmp/m-cloth --datasets clothing
    PYTHONPATH=/path/to/umap-learn .venv/bin/python bench/map_layout.py --model M --datasets cifar10 --n 10000

For a gallery of n images (the clothing photos' train + validation, or n CIFAR-10 training images)
embedded by a model directory, each method lays out all n vectors, and for 1,000 seeded query
points it reports:

- `kept@10`: the share of a point's 10 nearest neighbours by cosine in the model's space that are
  among its 10 nearest on the map (how much of what a click's search returns sits next to it);
- `label@10`: the share of a point's 10 nearest on the map with its label (do classes form
  regions?), beside the same figure in the model's space (the ceiling);
- the seconds the layout took (the machine's load included).

Vectors come from bench/retrieval.py's cache (--scratch/features), so a model is embedded once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import retrieval  # noqa: E402

from index.layout import compute_layout, umap_available  # noqa: E402

K = 10
QUERIES = 1000


def knn(points: np.ndarray, queries: np.ndarray, k: int, *, cosine: bool) -> np.ndarray:
    """Indices [Q, k] of each query point's k nearest among `points` (itself excluded)."""
    if cosine:
        p = points / np.linalg.norm(points, axis=1, keepdims=True)
        d = -(p[queries] @ p.T)
    else:
        d = ((points[queries][:, None, :] - points[None, :, :]) ** 2).sum(-1)
    d[np.arange(len(queries)), queries] = np.inf
    return np.argsort(d, axis=1)[:, :k]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("--datasets", nargs="+", default=list(retrieval.DATASETS), choices=list(retrieval.DATASETS))
    p.add_argument("--n", type=int, default=10_000, help="gallery images laid out (seeded subset)")
    p.add_argument("--methods", nargs="+", default=["pca", "umap"], choices=["pca", "umap"])
    p.add_argument("--scratch", type=Path, default=Path("/tmp/simsearch-bench-retrieval"), help="extraction folder")
    p.add_argument("--shared", type=Path, default=retrieval.SHARED, help="folder holding the data tarballs")
    args = p.parse_args(argv)
    methods = [m for m in args.methods if m != "umap" or umap_available()]
    if len(methods) < len(args.methods):
        print("umap-learn is not installed: measuring pca only")
    report = {}
    for name in args.datasets:
        ds = retrieval.DATASETS[name]
        root = retrieval.ensure_extracted(ds, args.scratch, args.shared)
        gallery, labels, _ = retrieval.labelled_files(root, ds.gallery)
        key = retrieval.method_key(f"model:{args.model}")
        vectors = retrieval.cached_features(retrieval.model_method(args.model), key, gallery, args.scratch / "features")
        idx = np.sort(np.random.default_rng(0).permutation(len(gallery))[: args.n])
        vectors, labels = vectors[idx], labels[idx]
        n = len(vectors)
        queries = np.random.default_rng(1).permutation(n)[:QUERIES]
        truth = knn(vectors, queries, K, cosine=True)
        rows = {"model space": {"label@10": float((labels[truth] == labels[queries, None]).mean())}}
        for method in methods:
            layout = compute_layout(np.arange(n), vectors, method=method, max_points=n)
            xy = np.empty((n, 2), np.float32)
            xy[layout.ids] = layout.xy
            near = knn(xy, queries, K, cosine=False)
            kept = np.mean([len(set(a) & set(b)) / K for a, b in zip(truth, near, strict=True)])
            rows[method] = {"kept@10": float(kept), "label@10": float((labels[near] == labels[queries, None]).mean()),
                            "seconds": round(layout.seconds, 1)}
        print(f"\n{name}: {n} gallery images, model {args.model}, {len(queries)} query points")
        for m, r in rows.items():
            print(f"  {m:<12} " + "  ".join(f"{k} {v:.3f}" if k != "seconds" else f"{v:.1f} s" for k, v in r.items()))
        report[name] = {"n": n, "rows": rows}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
