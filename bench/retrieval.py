"""Bench: precision@10 by label — what search shows a user — for raw pixels and for exported models.

    .venv/bin/python bench/retrieval.py --model demo-run/train-1b2c3d4e/model            # both data sets
    .venv/bin/python bench/retrieval.py --model runs/a/model --model runs/b/model --datasets clothing

Queries are one split, the gallery another, as a user's search would be: CIFAR-10 test (10,000)
against train (50,000); the clothing photos' test (372) against train + validation (3,409). A
query's precision@10 is the share of its 10 nearest gallery images (cosine similarity) with its
label; the figure is the mean over queries. Methods:

- `pixels`: the image resized (shorter side to 32 px, bicubic, centre crop) and flattened: the floor;
- each `--model DIR`: the model directory's vectors through `embed/` (ONNX Runtime), exactly the
  vectors `simsearch index build` and the server compute.

Methods are functions from a list of files to an [N, D] array (`METHODS`, `model_method`); a
post-processing step on the vectors (e.g. whitening fitted on the gallery) fits in `evaluate`.
Data come from the tarballs in ../shared/data, extracted once to --scratch. Prints a table and one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data import list_images, load_resized  # noqa: E402
from pretrain.retrieval import precision_at_k  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
K = 10


@dataclass(frozen=True)
class Dataset:
    name: str
    tarball: str
    gallery: tuple[str, ...]  # folders under the scratch dir, class sub-folders inside
    queries: tuple[str, ...]


DATASETS = {
    "cifar10": Dataset("cifar10", "cifar10-jpeg.tar.gz", ("cifar10/train",), ("cifar10/test",)),
    "clothing": Dataset("clothing", "clothing-small-128.tar.gz",
                        ("clothing-small/train", "clothing-small/validation"), ("clothing-small/test",)),
}
Method = Callable[[list[Path]], np.ndarray]


def labelled_files(root: Path, folders: tuple[str, ...]) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels of `folders` (which must share their class sub-folders)."""
    paths: list[Path] = []
    labels: list[int] = []
    classes: list[str] | None = None
    for folder in folders:
        listing = list_images(root / folder)
        if classes is not None and listing.classes != classes:
            raise ValueError(f"{root / folder} has classes {listing.classes}, expected {classes}")
        classes = listing.classes
        paths += listing.paths
        labels += listing.labels
    return paths, np.asarray(labels), classes or []


def pixel_features(paths: list[Path], size: int = 32) -> np.ndarray:
    with ThreadPoolExecutor(2) as pool:
        arrays = list(pool.map(lambda p: load_resized(p, size), paths, chunksize=64))
    return np.stack(arrays).reshape(len(paths), -1).astype(np.float32)


def model_method(model_dir: Path) -> Method:
    """Vectors from a model directory through embed/ (ONNX Runtime): the served vectors."""

    def features(paths: list[Path]) -> np.ndarray:
        from embed.backends import open_backend
        from embed.embedder import Embedder

        embedder = Embedder(open_backend(model_dir=str(model_dir)), batch_size=256, decode_workers=2)
        vectors = embedder.embed_sources([str(p) for p in paths])
        failed = [str(p) for p, v in zip(paths, vectors, strict=True) if not isinstance(v, np.ndarray)]
        if failed:
            raise ValueError(f"{len(failed)} files could not be embedded, e.g. {failed[:3]}")
        return np.stack(vectors)

    return features


METHODS: dict[str, Method] = {"pixels": pixel_features}


def ensure_extracted(dataset: Dataset, scratch: Path, shared: Path) -> Path:
    if not all((scratch / f).is_dir() for f in dataset.gallery + dataset.queries):
        tarball = shared / dataset.tarball
        if not tarball.is_file():
            raise FileNotFoundError(f"{dataset.name}: {tarball} not found (--shared)")
        scratch.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(scratch)], check=True)
    return scratch


def evaluate(method: Method, gallery: list[Path], gallery_labels: np.ndarray, queries: list[Path],
             query_labels: np.ndarray) -> dict[str, float]:
    t0 = time.time()
    g, q = method(gallery), method(queries)
    p = precision_at_k(torch.from_numpy(g), torch.from_numpy(gallery_labels), torch.from_numpy(q),
                       torch.from_numpy(query_labels), k=K)
    return {"p_at_10": p, "dim": int(g.shape[1]), "seconds": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], type=Path, help="model directory (repeatable)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--scratch", type=Path, default=Path("/tmp/simsearch-bench-retrieval"), help="extraction folder")
    p.add_argument("--shared", type=Path, default=SHARED, help="folder holding the data tarballs")
    p.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel floor")
    args = p.parse_args(argv)
    methods = {} if args.no_pixels else dict(METHODS)
    for model_dir in args.model:
        methods[f"model:{model_dir}"] = model_method(model_dir)
    if not methods:
        p.error("nothing to measure: give --model DIR or drop --no-pixels")
    report: dict[str, dict] = {}
    for name in args.datasets:
        ds = DATASETS[name]
        root = ensure_extracted(ds, args.scratch, args.shared)
        gallery, gallery_labels, classes = labelled_files(root, ds.gallery)
        queries, query_labels, query_classes = labelled_files(root, ds.queries)
        if classes != query_classes:
            raise ValueError(f"{name}: gallery classes {classes} differ from query classes {query_classes}")
        rows = {m: evaluate(fn, gallery, gallery_labels, queries, query_labels) for m, fn in methods.items()}
        pixels = rows.get("pixels", {}).get("p_at_10")
        print(f"\n{name}: {len(queries)} queries vs a gallery of {len(gallery)}, {len(classes)} classes, P@{K} by label")
        for m, r in rows.items():
            extra = f"  {r['p_at_10'] / pixels:.2f}x pixels, {r['p_at_10'] - 2 * pixels:+.3f} vs 2x pixels" if pixels else ""
            print(f"  {m:<60} {r['p_at_10']:.3f}  (D={r['dim']}, {r['seconds']:.0f} s){extra}")
        report[name] = {"n_gallery": len(gallery), "n_queries": len(queries), "k": K, "methods": rows}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
