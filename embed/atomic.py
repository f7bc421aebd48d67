"""Atomic file writes: a temporary file in the same directory, fsync, then os.replace.

A crash leaves the old file or the new one, never half of one (docs/design.md: files on disk are the
only state). The one atomic writer: checkpoints, model.json, summaries and other JSON files,
uploaded images, and the index's FAISS file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, mode: int = 0o644) -> Path:
    """Call `write(f)` on a temporary binary file beside `path`, then move it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # mkstemp makes 0600; servers running as another user must read it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644) -> Path:
    return atomic_write(path, lambda f: f.write(data), mode=mode)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """`data` as indented JSON with sorted keys (stable diffs), written atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write_bytes(path, text.encode())
