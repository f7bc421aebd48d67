"""Vectors computed elsewhere, which the folder indexer asks for before it reads and embeds a file.

`index build --ray` embeds the folder on a Ray cluster into Parquet shards (index/shards.py); the
normal builder then ingests them through this interface, so moves, duplicates, deletions and the
model check are decided by the one code path of the single-process build (index/builder.py).
A source answers for a file only when it saw the same (path, size, mtime) the scan sees now; the
builder reads and embeds itself any file the source does not know.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import numpy as np


class Precomputed(NamedTuple):
    """What embedding one file produced, without the vector itself (fetched by `VectorSource.vector`
    only when the builder adds it, so a lookup of every file stays light).

    `sha256` is empty when the file could not be read at all (reason "unreadable").
    """

    sha256: str
    width: int = 0
    height: int = 0
    reason: str = ""  # "" when embedded; else a DecodeError reason ("not_an_image", ...) or "unreadable"
    message: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.reason)


class VectorSource(Protocol):
    """Answers, for a file as the scan sees it, what embedding it produced (None: unknown here)."""

    def lookup(self, path: str, size: int, mtime: float) -> Precomputed | None: ...

    def vector(self, path: str) -> np.ndarray:
        """float32 [D] of a file `lookup` answered for without a failure."""
        ...
