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

Whitening (index/whitening.py, the code `index build --whiten` runs): each `--whiten SPEC` is a
PCA whitening fitted on the gallery's vectors and applied to gallery and queries, then l2
normalisation; `none` is the plain cosine. SPEC is `p<eigen_power>[,s<shrinkage>][,d<dims>]`, e.g.
`p-0.5` (full whitening), `p0` (centre + rotate only), `p-0.5,s0.1`, `p-0.5,d128`.
`--gallery-sizes` repeats everything on seeded random subsets of the gallery (the whitening fitted
on the subset, as an index of that size would fit it), since a covariance estimated from few
vectors is noisy. Each method's vectors are computed once and cached in --scratch/features.

Methods are functions from a list of files to an [N, D] array (`METHODS`, `model_method`).
Data come from the tarballs in ../shared/data, extracted once to --scratch. Prints a table (P@10,
and each whitening's ratio to no whitening) and one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# spinning OpenMP waits make FAISS's PCA and PyTorch tens of times slower on shared cores (as in the CLI)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from index.whitening import WhiteningSpec, apply_whitening, fit_whitening, min_points  # noqa: E402
from pretrain.data import list_images, load_resized  # noqa: E402
from pretrain.retrieval import precision_at_k  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
K = 10
DEFAULT_WHITEN = ("none", "p0", "p-0.5", "p-0.5,s0.01", "p-0.5,s0.03", "p-0.5,s0.1", "p-0.5,s0.3", "p-0.5,s1",
                  "p-0.25,s0.1", "p-0.5,s0.1,d64", "p-0.5,s0.1,d128")


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


def parse_whiten(text: str) -> WhiteningSpec | None:
    """`none` or `p<eigen_power>[,s<shrinkage>][,d<dims>]` (see the module docstring)."""
    if text == "none":
        return None
    fields = {"p": "eigen_power", "s": "shrinkage", "d": "dim"}
    kwargs: dict[str, float | int] = {}
    for part in text.split(","):
        key, value = part[:1], part[1:]
        if key not in fields or not value:
            raise argparse.ArgumentTypeError(f"bad whitening {text!r}: parts are p<power>, s<shrinkage>, d<dims>")
        kwargs[fields[key]] = int(value) if key == "d" else float(value)
    return WhiteningSpec(**kwargs)  # type: ignore[arg-type]


def cached_features(method: Method, key: str, paths: list[Path], cache: Path) -> np.ndarray:
    """The method's vectors for `paths`, computed once per (method, file list) and kept in `cache`."""
    digest = hashlib.sha256(("\n".join(map(str, paths)) + "\0" + key).encode()).hexdigest()[:16]
    target = cache / f"{digest}.npy"
    if target.is_file():
        return np.load(target)
    vectors = np.ascontiguousarray(method(paths), dtype=np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(target, vectors)
    return vectors


def method_key(name: str) -> str:
    """A cache key that changes when a model directory's weights do (its fingerprint)."""
    if name.startswith("model:"):
        spec = json.loads((Path(name[6:]) / "model.json").read_text())
        return f"{name}:{spec.get('fingerprint') or (Path(name[6:]) / 'model.onnx').stat().st_mtime}"
    return name


def score(g: np.ndarray, gl: np.ndarray, q: np.ndarray, ql: np.ndarray, whiten: WhiteningSpec | None) -> float:
    if whiten is not None:
        transform = fit_whitening(g, whiten)
        g, q = apply_whitening(transform, g), apply_whitening(transform, q)
    return precision_at_k(torch.from_numpy(g), torch.from_numpy(gl), torch.from_numpy(q),
                          torch.from_numpy(ql), k=K)


def gallery_subsets(n: int, sizes: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """Index arrays of seeded random gallery subsets, by size label (`all`: every item)."""
    out = {}
    for size in sizes:
        if size == "all" or int(size) >= n:
            out["all" if size == "all" else f"{n}"] = np.arange(n)
        else:
            out[size] = np.sort(np.random.default_rng(seed).choice(n, int(size), replace=False))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=[], type=Path, help="model directory (repeatable)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--scratch", type=Path, default=Path("/tmp/simsearch-bench-retrieval"), help="extraction folder")
    p.add_argument("--shared", type=Path, default=SHARED, help="folder holding the data tarballs")
    p.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel floor")
    p.add_argument("--whiten", nargs="+", type=parse_whiten, default=None,
                   help=f"whitening settings fitted on the gallery (default: {' '.join(DEFAULT_WHITEN)})")
    p.add_argument("--gallery-sizes", nargs="+", default=["all"],
                   help="gallery subset sizes (seeded random subsets; `all`: the whole gallery)")
    args = p.parse_args(argv)
    whitens = args.whiten if args.whiten is not None else [parse_whiten(w) for w in DEFAULT_WHITEN]
    if None not in whitens:
        whitens.insert(0, None)
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
        subsets = gallery_subsets(len(gallery), args.gallery_sizes)
        rows: dict[str, dict] = {}
        for m, fn in methods.items():
            t0 = time.time()
            g = cached_features(fn, method_key(m), gallery, args.scratch / "features")
            q = cached_features(fn, method_key(m), queries, args.scratch / "features")
            embed_s = time.time() - t0
            for spec in whitens:
                label = "none" if spec is None else spec.label()
                if spec is not None and spec.dim >= g.shape[1]:
                    continue  # keeping every axis is the full-dimension setting, measured once
                by_size = {}
                for size, idx in subsets.items():
                    if spec is not None and len(idx) < min_points(spec.dim or g.shape[1]):
                        by_size[size] = None  # the index would not whiten (index/whitening.py)
                        continue
                    by_size[size] = score(g[idx], gallery_labels[idx], q, query_labels, spec)
                rows[f"{m} {label}"] = {"method": m, "whiten": label, "dim": int(g.shape[1]),
                                        "features_s": round(embed_s, 1), "p_at_10": by_size}
        print(f"\n{name}: {len(queries)} queries vs a gallery of {len(gallery)} (subsets: "
              f"{', '.join(subsets)}), {len(classes)} classes, P@{K} by label; ratio = P@10 / P@10 without whitening")
        print(f"  {'method':<40} {'whitening':<24}" + "".join(f"{s:>16}" for s in subsets))
        for r in rows.values():
            base = rows[f"{r['method']} none"]["p_at_10"]
            cells = []
            for size, v in r["p_at_10"].items():
                cells.append(f"{'-':>16}" if v is None else f"{v:>8.3f} ({v / base[size]:.2f}x)")
            print(f"  {r['method']:<40} {r['whiten']:<24}" + "".join(cells))
        pixels = rows.get("pixels none", {}).get("p_at_10")
        if pixels:
            for r in rows.values():
                if r["method"] != "pixels" and r["whiten"] == "none":
                    ratios = ", ".join(f"{s}: {r['p_at_10'][s] / pixels[s]:.2f}x" for s in subsets)
                    print(f"  {r['method']} vs raw pixels (no whitening): {ratios}")
        report[name] = {"n_gallery": len(gallery), "n_queries": len(queries), "k": K, "rows": rows}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
