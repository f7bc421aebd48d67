"""The records stored beside each vector, and the search hit that carries one."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

RECORD_FIELDS = ("path", "size", "mtime", "sha256", "width", "height", "added_at", "metadata")
COLUMNS = "id, path, size, mtime, sha256, width, height, added_at, metadata"


class IndexedFile(NamedTuple):
    """The part of a record an incremental build needs; light enough to hold for millions of files."""

    id: int
    path: str
    size: int
    mtime: float
    sha256: str


@dataclass
class ItemRecord:
    id: int
    path: str
    size: int = 0
    mtime: float = 0.0
    sha256: str = ""
    width: int = 0
    height: int = 0
    added_at: float = 0.0
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Hit:
    id: int
    score: float
    record: ItemRecord


def record_from_row(row: tuple) -> ItemRecord:
    rid, path, size, mtime, sha, w, h, added, meta = row
    return ItemRecord(int(rid), path, int(size), float(mtime), sha, int(w), int(h), float(added), json.loads(meta))


_ALLOWED_FIELDS = frozenset(RECORD_FIELDS) | {"id"}


def record_values(rec: ItemRecord | Mapping[str, Any]) -> tuple:
    d = rec.to_dict() if isinstance(rec, ItemRecord) else rec
    if not _ALLOWED_FIELDS.issuperset(d):
        unknown = sorted(set(d) - _ALLOWED_FIELDS)
        raise ValueError(f"unknown record fields {unknown}; valid: {list(RECORD_FIELDS)}")
    if not isinstance(d.get("path"), str):
        raise ValueError("every record needs a 'path' string")
    metadata = d.get("metadata")
    return (
        d["path"], int(d.get("size", 0)), float(d.get("mtime", 0.0)), str(d.get("sha256", "")),
        int(d.get("width", 0)), int(d.get("height", 0)), float(d.get("added_at") or time.time()),
        json.dumps(metadata, sort_keys=True) if metadata else "{}",
    )
