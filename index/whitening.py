"""PCA whitening learned from a collection's own vectors (FAISS `PCAMatrix`), then l2 normalisation.

Self-supervised features are anisotropic: a few directions carry most of the variance, and they
are not the ones that tell classes apart. Whitening subtracts the collection mean, rotates onto
the principal axes and scales axis i by (lambda_i + epsilon) ** eigen_power, where lambda_i is its
variance; eigen_power = -0.5 gives every axis unit variance (full whitening), 0 only centres
and rotates. The result is l2-normalised, so inner product in the whitened space is a cosine
similarity there, not the raw cosine.

Full whitening also blows up the directions of least variance, which in a small collection are
mostly estimation noise. `shrinkage` regularises this: epsilon = shrinkage x the mean eigenvalue
is added to every eigenvalue before the power (0: full whitening; large: centring + rotation).
`dim` keeps only the top principal axes (0: all of them).

An index (`index build --whiten`) uses eigen_power -0.25 with shrinkage 0.1, fitted at a
compaction on a sample of its rows and kept as a serialized FAISS VectorTransform in the blob
`whitening`; `LayeredIndex` applies it to every vector added and every query, the base is built,
trained and tuned in its space, and the raw vectors stay in SQLite. bench/retrieval.py measures
what each setting does to precision@10 (index/README.md, "Whitening").
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import faiss
import numpy as np

logger = logging.getLogger(__name__)

# FAISS's default caps PCA training at 1000 points per input dimension, a sample that is plenty
MIN_POINTS_PER_DIM = 2  # fewer points per dimension than this: the covariance is too noisy to fit


@dataclass(frozen=True)
class WhiteningSpec:
    eigen_power: float = -0.5  # -0.5: unit variance on every axis; 0: centre and rotate only
    shrinkage: float = 0.0     # added to every eigenvalue, as a fraction of their mean
    dim: int = 0               # principal axes kept; 0: all

    def __post_init__(self) -> None:
        if not -1.0 <= self.eigen_power <= 0.0:
            raise ValueError(f"eigen_power must be in [-1, 0], got {self.eigen_power}")
        if self.shrinkage < 0:
            raise ValueError(f"shrinkage must be >= 0, got {self.shrinkage}")
        if self.dim < 0:
            raise ValueError(f"dim must be >= 0 (0: all), got {self.dim}")

    def label(self) -> str:
        parts = [f"p{self.eigen_power:g}"]
        if self.shrinkage:
            parts.append(f"s{self.shrinkage:g}")
        if self.dim:
            parts.append(f"d{self.dim}")
        return "whiten:" + ",".join(parts)


def min_points(dim_out: int) -> int:
    """Vectors needed to fit a whitening with `dim_out` output axes."""
    return MIN_POINTS_PER_DIM * dim_out


def fit_whitening(vectors: np.ndarray, spec: WhiteningSpec = WhiteningSpec()) -> faiss.PCAMatrix:
    """A trained PCAMatrix for `vectors` [N, D]; ValueError when N is too small for D."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"vectors must be [N, D], got shape {x.shape}")
    n, d = x.shape
    d_out = spec.dim or d
    if d_out > d:
        raise ValueError(f"whitening dim {d_out} exceeds the vectors' dimension {d}")
    if n < min_points(d_out):
        raise ValueError(f"whitening to {d_out} dimensions needs at least {min_points(d_out)} vectors, got {n}")
    pca = faiss.PCAMatrix(d, d_out, spec.eigen_power, False)
    pca.train(x)
    if spec.shrinkage:
        # FAISS's eigenvalues are sums of squares (N x variance); the epsilon is on the same scale
        pca.epsilon = float(spec.shrinkage * faiss.vector_to_array(pca.eigenvalues).mean())
        pca.prepare_Ab()
    return pca


def normalization(dim: int) -> faiss.NormalizationTransform:
    return faiss.NormalizationTransform(dim, 2.0)


def apply_whitening(transform: faiss.VectorTransform, vectors: np.ndarray) -> np.ndarray:
    """The transform, then l2 normalisation: what an index with whitening stores and searches."""
    y = transform.apply(np.ascontiguousarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(y, axis=1, keepdims=True)
    return (y / np.maximum(norms, 1e-12)).astype(np.float32)


def numpy_matrix(transform: faiss.LinearTransform) -> tuple[np.ndarray, np.ndarray]:
    """(A [d_out, d_in], b [d_out]) with transform(x) = x @ A.T + b: the transform in plain numpy."""
    a = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
    b = faiss.vector_to_array(transform.b) if transform.have_bias else np.zeros(transform.d_out, np.float32)
    return a, b


# -- the index option (`index build --whiten on|off|auto`) ------------------------------------------
WHITEN_MODES = ("auto", "on", "off")
DEFAULT_MODE = "auto"  # what a new index gets (bench/retrieval.py: see index/README.md)
# bench/retrieval.py (index/README.md): of the settings measured, the only one never below no
# whitening (2 models x 2 data sets x 3..5 gallery sizes); -0.5 gains more on the clothing photos
# but loses 9% on CIFAR-10 at 1,000 items, and no shrinkage collapses a model with dead units
INDEX_SPEC = WhiteningSpec(eigen_power=-0.25, shrinkage=0.1)
AUTO_POINTS_PER_DIM = 4  # auto whitens from 4 x D items (1,024 for D = 256): +1..7% P@10 measured there
REFIT_FACTOR = 2.0     # refit when the collection has grown or shrunk by this factor since the fit
FIT_MAX_POINTS = 100_000  # a seeded sample this large estimates the covariance well enough
BLOB_KEY = "whitening"


class Whitening:
    """A fitted whitening as the index uses it: `apply` maps raw vectors to the searched space."""

    def __init__(self, transform: faiss.VectorTransform) -> None:
        self.transform = transform
        self.d_in, self.d_out = int(transform.d_in), int(transform.d_out)

    @classmethod
    def fit(cls, vectors: np.ndarray, spec: WhiteningSpec = INDEX_SPEC) -> Whitening:
        return cls(fit_whitening(vectors, spec))

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        return apply_whitening(self.transform, vectors)

    def serialize(self) -> bytes:
        # a VectorTransform is saved the way FAISS saves the chain of an IndexPreTransform
        holder = faiss.IndexPreTransform(self.transform, faiss.IndexFlatIP(self.d_out))
        return faiss.serialize_index(holder).tobytes()

    @classmethod
    def deserialize(cls, data: bytes) -> Whitening:
        holder = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        transform = faiss.downcast_VectorTransform(holder.chain.at(0))
        whitening = cls(transform)
        whitening._holder = holder  # owns the transform's memory
        return whitening


def check_mode(mode: str) -> str:
    if mode not in WHITEN_MODES:
        raise ValueError(f"whiten mode {mode!r} is not one of {WHITEN_MODES}")
    return mode


def wanted(mode: str, n: int, dim: int) -> bool:
    """Whether an index in `mode` with `n` vectors of `dim` should be whitened."""
    check_mode(mode)
    if mode == "off" or n < min_points(dim):
        return False
    return mode == "on" or n >= auto_min_items(dim)


def auto_min_items(dim: int) -> int:
    """From how many vectors `auto` whitens: the covariance of D dimensions needs a few times D."""
    return AUTO_POINTS_PER_DIM * dim


def refit_reason(meta: dict, n: int) -> str | None:
    """Why the whitening of an index (its metadata) must change at `n` vectors, or None."""
    mode, dim = meta.get("whiten") or "off", int(meta["dim"])
    fitted_on = int(meta.get("whitening_fitted_on") or 0)
    want = wanted(mode, n, dim)
    if not want:
        return "whitening off" if fitted_on else None
    if not fitted_on:
        return "whitening on"
    if n >= REFIT_FACTOR * fitted_on or n * REFIT_FACTOR <= fitted_on:
        return f"whitening fitted on {fitted_on}, now {n} vectors"
    return None


# -- where an index keeps it: the blob `whitening` of index.sqlite, the metadata `whitening_*` ----
_PENDING = "_whitening_blob"  # carries a new fit from build_base (read transaction) to its publish


def load(conn: sqlite3.Connection, meta: dict) -> Whitening | None:
    """The whitening the index's current base was built with; None when it has none."""
    if not int(meta.get("whitening_fitted_on") or 0):
        return None
    row = conn.execute("SELECT value FROM blobs WHERE key = ?", (BLOB_KEY,)).fetchone()
    if row is None:
        raise ValueError("the index records a whitening but its blob is missing")
    return Whitening.deserialize(row[0])


def for_base(conn: sqlite3.Connection, meta: dict, n: int,
             sample: Callable[[int], np.ndarray]) -> tuple[Whitening | None, dict, bool]:
    """The whitening a new base of `n` vectors is built with: (it or None, metadata updates, refitted).

    Kept while the rule (`refit_reason`) allows, else fitted again on a seeded sample of the rows
    (`sample(size)`), or dropped. A refit changes the space every vector is searched in, so the
    caller trains its index again.
    """
    reason = refit_reason(meta, n)
    if reason is None:
        return load(conn, meta), {}, False
    if not wanted(meta.get("whiten") or "off", n, int(meta["dim"])):
        return None, {"whitening_fitted_on": 0, _PENDING: b""}, True
    whitening = Whitening.fit(sample(min(n, FIT_MAX_POINTS)))
    logger.info("whitening fitted on %d of %d vectors (%s)", min(n, FIT_MAX_POINTS), n, reason)
    return whitening, {"whitening_fitted_on": n, "whitening_spec": asdict(INDEX_SPEC),
                       "whitening_fitted_at": time.time(), _PENDING: whitening.serialize()}, True


def record(conn: sqlite3.Connection, updates: dict) -> None:
    """In the publishing transaction: store (or drop) the new fit that `updates` carries, if any."""
    blob = updates.pop(_PENDING, None)
    if blob is None:
        return
    conn.execute("DELETE FROM blobs WHERE key = ?", (BLOB_KEY,))
    if blob:
        conn.execute("INSERT INTO blobs (key, value) VALUES (?, ?)", (BLOB_KEY, blob))
