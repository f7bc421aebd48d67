"""A 2-D map of a collection: where each image sits among the others, for the map page.

A layout is fitted on a seeded random sample of the collection (ids in random order):

- `pca` (the default): the two principal axes of the sample (FAISS PCAMatrix), fitted on up to
  100,000 vectors; it is what every install has, and takes about a second;
- `umap`: UMAP (umap-learn, the optional `map` extra; cosine metric, 15 neighbours) on up to 10,000
  vectors. It keeps neighbourhoods where PCA keeps only the two largest spreads: on the clothing
  photos 32% of an image's 10 nearest neighbours are among its 10 nearest on the map, against 7%
  with PCA (bench/map_layout.py). But its first use in a process compiles numba code (minutes on
  a busy 2-core machine) and a fit costs seconds per thousand points, so it is asked for, never
  the default.

The first `max_points` of the sample (a random order, so a uniform sample too) are the points the
page draws as thumbnails; `density` counts the fitted sample in a `grid` x `grid` histogram over
the points' bounds (points outside count in the edge cells), scaled to the collection's size.
When the sample is the whole collection (up to 100,000 items with pca) that is every item; above,
the density of a uniform sample of 100,000 estimates the whole's. So a million-image collection
shows 2,000 thumbnails over a heat map of all of it, never a million thumbnails.
"""

from __future__ import annotations

import importlib.util
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from index.schema import DB_FILE

logger = logging.getLogger(__name__)

LAYOUT_METHODS = ("pca", "umap")
DEFAULT_MAX_POINTS = 2000
DEFAULT_GRID = 64
PCA_FIT_MAX = 100_000
UMAP_FIT_MAX = 10_000  # UMAP costs seconds per thousand points on a laptop CPU
UMAP_MIN_POINTS = 16   # below this UMAP's neighbour graph is degenerate: pca instead



class VectorSource(Protocol):
    """What a layout reads from an index (index.store.ImageIndex is one)."""

    def ids(self) -> list[int]: ...

    def vector(self, id: int) -> np.ndarray | None: ...


@dataclass
class Layout:
    method: str
    count: int                  # vectors in the collection
    ids: np.ndarray             # [P] int64, the sample drawn as thumbnails
    xy: np.ndarray              # [P, 2] float32, in [0, 1] x [0, 1]
    density: np.ndarray         # [grid, grid] float32, vectors per cell (row = y, column = x)
    density_of: str             # "all" (every vector projected) or "sample" (scaled from the sample)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {
            "method": self.method, "count": self.count, "density_of": self.density_of,
            "seconds": round(self.seconds, 3),
            "points": [{"id": int(i), "x": round(float(x), 5), "y": round(float(y), 5)}
                       for i, (x, y) in zip(self.ids, self.xy, strict=True)],
            "density": {"grid": int(self.density.shape[0]), "cells": np.round(self.density, 3).tolist()},
            **self.extra,
        }


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def available_methods() -> list[str]:
    return [m for m in LAYOUT_METHODS if m != "umap" or umap_available()]


def resolve_method(method: str, n: int) -> str:
    """The method a layout of `n` points uses when `method` is asked for (umap needs enough points)."""
    if method not in LAYOUT_METHODS:
        raise ValueError(f"layout method {method!r} is not one of {LAYOUT_METHODS}")
    if method == "umap" and not umap_available():
        raise ValueError("layout method 'umap' needs umap-learn: pip install 'simsearch[map]'")
    return "pca" if method == "umap" and n < UMAP_MIN_POINTS else method


def sample_ids(ids: Sequence[int], size: int, seed: int = 0) -> np.ndarray:
    """`size` distinct ids in random order (the order is the thumbnails' priority)."""
    ids = np.asarray(ids, dtype=np.int64)
    return ids[np.random.default_rng(seed).permutation(len(ids))[:size]]


def read_sample(index: VectorSource, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """A seeded sample of an index's committed items: (ids [n], vectors [n, D], items in the index).

    Reads the sampled rows only, in one read transaction on its own read-only connection to the
    index's SQLite file (`directory`), 500 ids per query: all 50,000 of a 50,000-item index in 4.0 s
    against 9.0 s for one `vector(id)` call per item (a loaded 2-core machine). A source without a
    directory is read item by item; items removed meanwhile are left out.
    """
    directory = getattr(index, "directory", None)
    if directory is None or not (Path(directory) / DB_FILE).is_file():
        return _read_one_by_one(index, size, seed)
    conn = sqlite3.connect(f"file:{Path(directory) / DB_FILE}?mode=ro", uri=True, isolation_level=None, timeout=60)
    try:
        conn.execute("BEGIN")  # ids and vectors of one commit
        all_ids = np.fromiter((r[0] for r in conn.execute("SELECT id FROM items ORDER BY id")), dtype=np.int64)
        picked = sample_ids(all_ids, size, seed)
        found: dict[int, np.ndarray] = {}
        for start in range(0, len(picked), 500):
            chunk = picked[start : start + 500].tolist()
            for i, blob in conn.execute(f"SELECT id, vector FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                found[int(i)] = np.frombuffer(blob, dtype="<f4")
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    kept = [int(i) for i in picked if int(i) in found]  # the sample's order: the thumbnails' priority
    if not kept:
        return np.zeros(0, np.int64), np.zeros((0, 1), np.float32), len(all_ids)
    return np.asarray(kept, np.int64), np.stack([found[i] for i in kept]).astype(np.float32), len(all_ids)


def _read_one_by_one(index: VectorSource, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    all_ids = index.ids()
    picked, vectors = [], []
    for i in sample_ids(all_ids, size, seed):
        v = index.vector(int(i))
        if v is not None:
            picked.append(int(i))
            vectors.append(v)
    if not vectors:
        return np.zeros(0, np.int64), np.zeros((0, 1), np.float32), len(all_ids)
    return np.asarray(picked, np.int64), np.stack(vectors).astype(np.float32), len(all_ids)


def _fit_pca(vectors: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    if len(vectors) < 3 or vectors.shape[1] < 2:  # nothing to spread: every point in the middle
        return lambda v: np.zeros((len(v), 2), np.float32)
    pca = faiss.PCAMatrix(vectors.shape[1], 2, 0.0, False)
    pca.train(np.ascontiguousarray(vectors))
    return lambda v: pca.apply(np.ascontiguousarray(v, dtype=np.float32))


def _fit_umap(vectors: np.ndarray, seed: int) -> np.ndarray:
    import umap  # the optional `map` extra

    n_neighbors = int(min(15, max(2, len(vectors) - 1)))
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, metric="cosine", random_state=seed,
                        init="pca" if len(vectors) > 4 else "random", low_memory=True)
    return reducer.fit_transform(vectors).astype(np.float32)


def _normaliser(xy: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Maps the sample's bounding box (2% margin) to [0, 1]^2, keeping the aspect ratio."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = float(max((hi - lo).max(), 1e-9)) * 1.04
    centre = (lo + hi) / 2
    return lambda p: ((p - centre) / span + 0.5).astype(np.float32)


def _histogram(xy: np.ndarray, grid: int) -> np.ndarray:
    cells = np.clip((xy * grid).astype(np.int64), 0, grid - 1)
    flat = np.bincount(cells[:, 1] * grid + cells[:, 0], minlength=grid * grid)
    return flat.reshape(grid, grid).astype(np.float32)


def compute_layout(ids: np.ndarray, vectors: np.ndarray, count: int | None = None, *, method: str = "pca",
                   max_points: int = DEFAULT_MAX_POINTS, grid: int = DEFAULT_GRID, seed: int = 0) -> Layout:
    """The map of a collection of `count` items from a uniform random sample of them (ids [n], vectors
    [n, D], in random order: the first `max_points` become the thumbnails). `count` None: the sample
    is the whole collection."""
    if max_points < 1 or grid < 1:
        raise ValueError(f"max_points and grid must be >= 1, got {max_points} and {grid}")
    t0 = time.perf_counter()
    n = len(ids)
    count = n if count is None else count
    method = resolve_method(method, n)
    if n == 0:
        return Layout(method, count, np.zeros(0, np.int64), np.zeros((0, 2), np.float32),
                      np.zeros((grid, grid), np.float32), "all", time.perf_counter() - t0)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    raw = _fit_umap(vectors, seed) if method == "umap" else _fit_pca(vectors)(vectors)
    keep = min(max_points, n)
    xy = _normaliser(raw[:keep])(raw)
    density = _histogram(xy, grid) * (count / n)
    layout = Layout(method, count, np.asarray(ids[:keep], np.int64), xy[:keep], density,
                    "all" if n >= count else "sample", time.perf_counter() - t0, {"fitted_on": n})
    logger.info("map of %d items: %s fitted on %d, %d points, %.1f s", count, method, n, keep, layout.seconds)
    return layout


def fit_max(method: str) -> int:
    """How many vectors a layout by `method` is fitted on (the sample to read)."""
    return UMAP_FIT_MAX if method == "umap" else PCA_FIT_MAX
