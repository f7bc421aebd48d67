"""The base snapshot's files in an index directory: written once, atomically, opened memory-mapped.

    base.<S>.faiss         the FAISS index of the items of commit S (any kind: vector_index.py)
    base.<S>.ids.npy       their ids, ascending (int64): counts, and row numbers for re-ranking
    base.<S>.vectors.npy   their exact float32 vectors in id order, when the kind re-ranks with them

A base file is never modified: a compaction writes a new S. Each file goes through
embed/atomic.py (temporary file, fsync, os.replace) under an exclusive flock that tells another
process's `remove_stale` "being written". The index is read with FAISS's IO_FLAG_MMAP_IFC: the
codes (flat vectors, IVF lists, PQ codes) stay in the file and the page cache instead of being
copied into the process, so opening a million vectors takes milliseconds and the resident memory
grows only with the pages searches touch. Writing to such an index aborts the process in FAISS
(its arrays are views): index/layered.py never adds to or removes from a base.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from embed.atomic import atomic_write
from index.vector_index import unwrap, wrap

logger = logging.getLogger(__name__)

_BASE = re.compile(r"^base\.(\d+)\.(faiss|ids\.npy|vectors\.npy)$")
_LEGACY = re.compile(r"^vectors\.(\d+)\.faiss$")  # format 1: a whole-index file per commit
_TEMP = re.compile(r"^\.(base|vectors)\..*\.tmp$")


@dataclass(frozen=True)
class BasePaths:
    faiss: Path
    ids: Path
    vectors: Path


def base_paths(directory: Path, generation: int) -> BasePaths:
    stem = directory / f"base.{generation}"
    return BasePaths(Path(f"{stem}.faiss"), Path(f"{stem}.ids.npy"), Path(f"{stem}.vectors.npy"))


def _locked(write):  # noqa: ANN001, ANN202 - a wrapper for atomic_write's callback
    def run(f: BinaryIO) -> None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # "being written", for another process's remove_stale
        write(f)
    return run


def write_index(index: faiss.Index, path: Path) -> Path:
    # streamed into the file object: no second in-memory copy of a large index
    return atomic_write(path, _locked(lambda f: faiss.write_index(unwrap(index), faiss.PyCallbackIOWriter(f.write))))


def write_array(path: Path, shape: tuple[int, ...], dtype: str, chunks: Iterable[np.ndarray]) -> Path:
    """An .npy file of `shape` written from row chunks, so a large array never sits in memory whole."""

    def write(f: BinaryIO) -> None:
        np.lib.format.write_array_header_2_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                 "shape": shape})
        rows = 0
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            rows += len(chunk)
        if rows != shape[0]:
            raise ValueError(f"{path.name}: {rows} rows written, {shape[0]} announced")

    return atomic_write(path, _locked(write))


def read_index(path: Path, *, mmap: bool = True) -> faiss.Index:
    """RuntimeError when the file is missing, truncated or not a FAISS index."""
    return wrap(faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC if mmap else 0))


def read_array(path: Path) -> np.ndarray:
    """Memory-mapped, read-only; ValueError/OSError when the file is damaged."""
    return np.load(path, mmap_mode="r")


def remove_stale(directory: Path, keep: int) -> None:
    """Base files of snapshots older than `keep`, format-1 cache files, and temporary files left by a crash.

    Newer snapshots stay (another process may have written one it has not published yet), and so
    does a temporary file another process is still writing (it holds a lock on it). A reader that
    has an old snapshot mapped keeps its pages: unlinking does not unmap.
    """
    for p in directory.iterdir():
        base, legacy = _BASE.match(p.name), _LEGACY.match(p.name)
        if (base and int(base.group(1)) < keep) or legacy or (_TEMP.match(p.name) and not _being_written(p)):
            p.unlink(missing_ok=True)


def _being_written(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def file_bytes(paths: BasePaths) -> int:
    return sum(p.stat().st_size for p in (paths.faiss, paths.ids, paths.vectors) if p.is_file())
