"""The FAISS cache file of an index directory: `vectors.<generation>.faiss`, written atomically."""

from __future__ import annotations

import fcntl
import logging
import os
import re
from pathlib import Path
from typing import BinaryIO

import faiss

from embed.atomic import atomic_write

logger = logging.getLogger(__name__)

_CACHE = re.compile(r"^vectors\.(\d+)\.faiss$")


def faiss_path(directory: Path, generation: int) -> Path:
    return directory / f"vectors.{generation}.faiss"


def write_faiss(index: faiss.Index, directory: Path, generation: int) -> Path:
    """Through embed/atomic.py (temporary file, fsync, os.replace); then older generations' files go."""
    target = faiss_path(directory, generation)

    def write(f: BinaryIO) -> None:
        # the lock says "being written" to another process's remove_stale
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        # streamed into the file object: no second in-memory copy of a large index
        faiss.write_index(index, faiss.PyCallbackIOWriter(f.write))

    atomic_write(target, write)
    remove_stale(directory, keep=target.name)
    return target


def read_faiss(path: Path) -> faiss.Index:
    """RuntimeError when the file is missing, truncated or not a FAISS index."""
    return faiss.read_index(str(path))


def remove_stale(directory: Path, keep: str) -> None:
    """Cache files of generations older than `keep`, and temporary files left by a crash.

    Newer generations stay: another process may have committed and written one meanwhile. A
    temporary file that another process is still writing (it holds a lock on it) stays too.
    """
    m = _CACHE.match(keep)
    kept = int(m.group(1)) if m else None
    for p in directory.iterdir():
        old = _CACHE.match(p.name)
        older_cache = old is not None and kept is not None and int(old.group(1)) < kept
        if older_cache or (p.name.startswith(".vectors.") and p.name.endswith(".tmp") and not _being_written(p)):
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
