"""The FAISS cache file of an index directory: `vectors.<generation>.faiss`, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import faiss


def faiss_path(directory: Path, generation: int) -> Path:
    return directory / f"vectors.{generation}.faiss"


def write_faiss(index: faiss.Index, directory: Path, generation: int) -> Path:
    """Temporary file + fsync + os.replace; then the files of other generations go."""
    fd, tmp = tempfile.mkstemp(prefix=".vectors.", suffix=".tmp", dir=directory)
    os.close(fd)
    target = faiss_path(directory, generation)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    remove_stale(directory, keep=target.name)
    return target


def remove_stale(directory: Path, keep: str) -> None:
    """Cache files of other generations and temporary files left by a crash."""
    for p in directory.iterdir():
        stale_cache = p.name.startswith("vectors.") and p.name.endswith(".faiss") and p.name != keep
        if stale_cache or (p.name.startswith(".vectors.") and p.name.endswith(".tmp")):
            p.unlink(missing_ok=True)
