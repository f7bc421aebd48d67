"""Embedding shards: the Parquet files `index build --ray` writes and the index ingests.

One shard is one Parquet file `shard-<key>.parquet` with a row per file:

    path     string   relative to the indexed folder's root, '/'-separated (as index/scan.py)
    size     int64    bytes, as stat'ed right after reading (the builder's rule)
    mtime    float64  seconds, as stat'ed right after reading
    sha256   string   of the bytes read; "" when the file could not be read
    width    int32    original upright size (0 for a failed file)
    height   int32
    vector   fixed_size_list<float32>[D]; zeros for a failed file
    reason   string   "" when embedded; else the DecodeError reason or "unreadable"
    message  string   the error's message

and, in the schema's metadata under b"simsearch", the model's fingerprint, name, version and
dimension, the folder's root, the `max_pixels` limit the files were decoded under and the time it
was written. A shard of another model or another folder is never ingested (`ShardSet.load` skips
it with a warning), so a shard directory shared by mistake cannot mix models.

A shard is written to a hidden temporary name and renamed into place (embed/atomic.py), so a
reader sees it whole or not at all; its key is a hash of the rows' (path, size, mtime), so a
Ray task that is retried after a worker died rewrites the same file instead of adding a copy.
Where two shards hold the same path, the one written last counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embed.atomic import atomic_write
from embed.spec import ModelSpec
from index.vector_source import Precomputed

logger = logging.getLogger(__name__)

FORMAT = "simsearch-shard"
FORMAT_VERSION = 1
META_KEY = b"simsearch"
SHARD_GLOB = "shard-*.parquet"
# Failures that say nothing about the file's bytes: tried again by every run.
TRANSIENT_REASONS = frozenset({"unreadable"})
# A temporary shard file this old was left by a killed writer (writing one takes seconds).
STALE_TMP_S = 3600.0


def shard_schema(dim: int, meta: Mapping[str, Any]) -> pa.Schema:
    return pa.schema([
        ("path", pa.string()), ("size", pa.int64()), ("mtime", pa.float64()), ("sha256", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("vector", pa.list_(pa.float32(), dim)),
        ("reason", pa.string()), ("message", pa.string()),
    ], metadata={META_KEY: json.dumps(dict(meta), sort_keys=True).encode()})


def shard_meta(spec: ModelSpec, root: str, max_pixels: int) -> dict[str, Any]:
    """What a shard records about how its rows were made (everything but the time of writing)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model_fingerprint": spec.fingerprint,
            "model_name": spec.name, "model_version": spec.version, "dim": spec.embedding_dim,
            "root": root, "max_pixels": max_pixels}


def shard_key(paths: Iterable[str], sizes: Iterable[int], mtimes: Iterable[float]) -> str:
    h = hashlib.sha256()
    for p, s, m in zip(paths, sizes, mtimes, strict=True):
        h.update(f"{p}\0{int(s)}\0{float(m)!r}\n".encode())
    return h.hexdigest()[:24]


def write_shard(shard_dir: str | os.PathLike[str], meta: Mapping[str, Any], columns: Mapping[str, Any]) -> str:
    """Write one shard atomically from column arrays (the names above; `vector` float32 [N, D], any
    values on failed rows); returns the file name."""
    n = len(columns["path"])
    dim = int(meta["dim"])
    reasons = [str(r or "") for r in columns["reason"]]
    vectors = np.ascontiguousarray(np.asarray(columns["vector"], dtype=np.float32).reshape(n, dim))
    failed = np.array([bool(r) for r in reasons], dtype=bool)
    # zeros on failed rows: Parquet cannot store null entries of a fixed-size list (`reason` says it)
    vectors[failed] = 0.0
    vector_col = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    schema = shard_schema(dim, {**meta, "written_at": time.time()})
    table = pa.Table.from_arrays([
        pa.array([str(p) for p in columns["path"]], pa.string()),
        pa.array(np.asarray(columns["size"], dtype=np.int64)),
        pa.array(np.asarray(columns["mtime"], dtype=np.float64)),
        pa.array([str(s or "") for s in columns["sha256"]], pa.string()),
        pa.array(np.asarray(columns["width"], dtype=np.int32)),
        pa.array(np.asarray(columns["height"], dtype=np.int32)),
        vector_col,
        pa.array(reasons, pa.string()),
        pa.array([str(m or "") for m in columns["message"]], pa.string()),
    ], schema=schema)
    name = f"shard-{shard_key(table['path'].to_pylist(), columns['size'], columns['mtime'])}.parquet"
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(shard_dir / name, lambda f: pq.write_table(table, f, compression="zstd"))
    return name


def read_shard_meta(path: Path) -> dict[str, Any]:
    raw = (pq.read_schema(path).metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a simsearch shard (no {META_KEY.decode()!r} metadata)")
    return json.loads(raw)


class _Row(NamedTuple):
    shard: int  # index into ShardSet.files
    row: int
    size: int
    mtime: float
    known: Precomputed


class ShardSet:
    """Every usable shard of a directory, looked up by path; a `VectorSource` for the builder.

    Only the rows' metadata is held in memory; vectors are read shard by shard when the builder
    asks, keeping the last few shards' vectors (`cache_bytes`).
    """

    def __init__(self, shard_dir: Path, spec: ModelSpec, root: str, cache_bytes: int) -> None:
        self.shard_dir = shard_dir
        self.files: list[Path] = []
        self.rows: dict[str, _Row] = {}
        self.ignored: list[dict[str, str]] = []
        self._spec, self._root = spec, root
        self._max_pixels: dict[int, int] = {}
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes

    @classmethod
    def load(cls, shard_dir: str | os.PathLike[str], spec: ModelSpec, root: str, *,
             cache_bytes: int = 256 << 20) -> ShardSet:
        """The shards of this model (fingerprint) and folder (root) under `shard_dir` (may be missing)."""
        self = cls(Path(shard_dir), spec, root, cache_bytes)
        found: list[tuple[float, str, Path, dict[str, Any]]] = []
        paths = sorted(self.shard_dir.glob(SHARD_GLOB)) if self.shard_dir.is_dir() else []
        for path in paths:
            meta = self._usable_meta(path)
            if meta is not None:
                found.append((float(meta.get("written_at", 0.0)), path.name, path, meta))
        for _, _, path, meta in sorted(found, key=lambda f: f[:2]):  # oldest first: a later shard's row wins
            self._ingest(path, meta)
        return self

    def add(self, name: str) -> list[str]:
        """Take in the shard `name` of the directory, written after `load` (a row for a path it already
        has wins); returns its rows' paths (none when it is not usable here: see `ignored`)."""
        path = self.shard_dir / name
        meta = self._usable_meta(path)
        return [] if meta is None else self._ingest(path, meta)

    def _usable_meta(self, path: Path) -> dict[str, Any] | None:
        try:
            meta = read_shard_meta(path)
        except (OSError, ValueError, pa.ArrowException) as e:
            return self._ignore(path, f"unreadable: {e}")
        why = _mismatch(meta, self._spec, self._root)
        return self._ignore(path, why) if why else meta

    def _ignore(self, path: Path, why: str) -> None:
        logger.warning("%s: ignoring shard %s: %s", self.shard_dir, path.name, why)
        self.ignored.append({"shard": path.name, "why": why})

    def _ingest(self, path: Path, meta: dict[str, Any]) -> list[str]:
        try:
            # ParquetFile.read: a quarter of read_table's time, which goes through the datasets API
            with pq.ParquetFile(path) as pf:
                cols = pf.read(columns=["path", "size", "mtime", "sha256", "width", "height", "reason",
                                        "message"]).to_pydict()
        except (OSError, pa.ArrowException) as e:
            self._ignore(path, f"unreadable: {e}")
            return []
        i = len(self.files)
        self._max_pixels[i] = int(meta.get("max_pixels", 0))
        self.files.append(path)  # before the rows that point at it
        rows = self.rows
        for r, (p, size, mtime, sha, width, height, reason, message) in enumerate(zip(
                cols["path"], cols["size"], cols["mtime"], cols["sha256"], cols["width"], cols["height"],
                cols["reason"], cols["message"], strict=True)):
            rows[p] = _Row(i, r, size, mtime, Precomputed(sha or "", width, height, reason or "", message or ""))
        return cols["path"]

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, path: str, size: int, mtime: float) -> Precomputed | None:
        row = self.rows.get(path)
        if row is None or (row.size, row.mtime) != (size, mtime):
            return None
        return row.known

    def settled(self, path: str, size: int, mtime: float, max_pixels: int) -> bool:
        """True when this file needs no new embedding: a vector for it, or a failure that the same
        bytes under the same `max_pixels` limit would repeat."""
        known = self.lookup(path, size, mtime)
        if known is None:
            return False
        if not known.failed:
            return True
        row = self.rows[path]
        return known.reason not in TRANSIENT_REASONS and self._max_pixels[row.shard] == max_pixels

    def vector(self, path: str) -> np.ndarray:
        row = self.rows[path]
        if row.known.failed:
            raise KeyError(f"{path} failed ({row.known.reason}): it has no vector")
        return self._vectors(row.shard)[row.row]

    def _vectors(self, shard: int) -> np.ndarray:
        cached = self._cache.get(shard)
        if cached is not None:
            self._cache.move_to_end(shard)
            return cached
        with pq.ParquetFile(self.files[shard]) as pf:
            column = pf.read(columns=["vector"]).column("vector").combine_chunks()
        dim = column.type.list_size
        flat = column.flatten()  # float32, no nulls: a failed row's vector is zeros
        if flat.null_count or flat.type != pa.float32():
            raise ValueError(f"{self.files[shard]}: the vector column must be float32 without nulls")
        # the buffer itself: Array.to_numpy imports pandas (0.5 s) on the first call
        values = np.frombuffer(flat.buffers()[1], dtype=np.float32, count=len(flat), offset=flat.offset * 4)
        vectors = values.reshape(len(column), dim)
        self._cache[shard] = vectors
        while len(self._cache) > 1 and sum(v.nbytes for v in self._cache.values()) > self._cache_bytes:
            self._cache.popitem(last=False)
        return vectors

    def compact(self, keep: Iterable[str], meta: Mapping[str, Any]) -> dict[str, int]:
        """After the index has ingested the shards: rewrite the rows of `keep` (the failures that still
        describe the folder's files) into one shard and delete every shard this set loaded, and
        temporary files that killed writers left over an hour ago. Shards written meanwhile by
        another run, and shards of other models, are left alone."""
        keep = sorted(p for p in set(keep) if p in self.rows)
        written = ""
        if keep:
            rows = [self.rows[p] for p in keep]
            dim = int(meta["dim"])
            written = write_shard(self.shard_dir, meta, {
                "path": keep, "size": [r.size for r in rows], "mtime": [r.mtime for r in rows],
                "sha256": [r.known.sha256 for r in rows], "width": [r.known.width for r in rows],
                "height": [r.known.height for r in rows], "vector": np.zeros((len(rows), dim), np.float32),
                "reason": [r.known.reason for r in rows], "message": [r.known.message for r in rows]})
        removed = 0
        for path in self.files:
            if path.name != written:
                path.unlink(missing_ok=True)
                removed += 1
        for tmp in self.shard_dir.glob(".shard-*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                    tmp.unlink()
        return {"shards_removed": removed, "failures_kept": len(keep)}


class StageFailed(RuntimeError):
    """The Ray stage ended with an error before it wrote the file a lookup waited for."""


class LiveShards:
    """A `VectorSource` over shards that are still being written: `ShardSet` plus the paths a running
    Ray stage was given (`pending`). The builder ingests while the stage runs: a lookup of a pending
    path waits until the shard holding it lands (`landed`, from the thread that follows the stage)
    or the stage ends (`finish`); one the stage never wrote then answers None, and the builder reads
    and embeds that file itself. After a failed stage, a lookup of a pending path raises.
    """

    def __init__(self, shards: ShardSet, pending: Iterable[str]) -> None:
        self.shards = shards
        self._pending = set(pending)
        self._cond = threading.Condition()
        self._finished = False
        self._error: BaseException | None = None

    def landed(self, name: str) -> None:
        paths = self.shards.add(name)
        with self._cond:
            self._pending.difference_update(paths)
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._finished, self._error = True, error
            self._cond.notify_all()

    def ready(self, path: str) -> bool:
        """Whether `lookup` answers for this path without waiting."""
        with self._cond:
            return path not in self._pending or self._finished

    def lookup(self, path: str, size: int, mtime: float) -> Precomputed | None:
        with self._cond:
            while path in self._pending and not self._finished:
                self._cond.wait()
            if self._error is not None and path in self._pending:
                raise StageFailed(f"the Ray stage failed before embedding {path}: {self._error}") from self._error
        return self.shards.lookup(path, size, mtime)

    def vector(self, path: str) -> np.ndarray:
        return self.shards.vector(path)


def _mismatch(meta: Mapping[str, Any], spec: ModelSpec, root: str) -> str:
    """Why a shard must not be ingested for this model and folder ("" when it may)."""
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) != FORMAT_VERSION:
        return f"format {meta.get('format')!r} v{meta.get('format_version')}, expected {FORMAT!r} v{FORMAT_VERSION}"
    if not meta.get("model_fingerprint") or meta["model_fingerprint"] != spec.fingerprint:
        return (f"written by model {meta.get('model_name')!r} v{meta.get('model_version')} (fingerprint "
                f"{str(meta.get('model_fingerprint'))[:12]}…), not this model (fingerprint {spec.fingerprint[:12]}…)")
    if int(meta.get("dim", 0)) != spec.embedding_dim:
        return f"dimension {meta.get('dim')}, this model's is {spec.embedding_dim}"
    if meta.get("root") != root:
        return f"made for the folder {meta.get('root')!r}, not {root!r}"
    return ""
