"""Search filters: which items may be returned, by their metadata and their path.

    ItemFilter(metadata={"label": "cat", "year": 2020}, path_prefix="holidays/", path_glob="*.jpg")

- `metadata`: equality on top-level keys of the item's metadata JSON object, with the JSON type
  respected (SQLite `json_extract` + `json_type`): "2020" does not match 2020, true does not match 1;
  numbers compare by value (1 matches 1.0); None matches a JSON null (not a missing key). Every
  condition must hold (AND).
- `path_prefix`: the stored path starts with this string (case-sensitive). Folder items' paths are
  relative to the indexed folder (`holidays/2020/a.jpg`), uploads' are absolute.
- `path_glob`: SQLite GLOB on the stored path: `*` any run of characters (`/` included), `?` one
  character, `[abc]` a class; case-sensitive.

`matching_ids` evaluates a filter to an `IdSet` (index/selectors.py), which `ImageIndex.search`
applies inside the FAISS scan. It reads the committed rows on its own read-only connection (so it
never waits on the index's locks) and caches the answer per (index, commit, filter), since paging
through results asks the same question again: a filter costs one scan of the rows per commit,
not one per page. A filter that matches nothing gives an empty set: the search then answers [] at once.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.schema import DB_FILE
from index.selectors import IdSet

Scalar = str | int | float | bool | None
SCALAR_TYPES = "string, number, true/false or null"
_CHUNK = 65_536
CACHE_ENTRIES = 16  # each at most max_id / 8 bytes (a bitmap), e.g. 1.25 MB for 10M ids


@dataclass(frozen=True)
class ItemFilter:
    metadata: tuple[tuple[str, Scalar], ...] = ()
    path_prefix: str | None = None
    path_glob: str | None = None

    @classmethod
    def build(cls, metadata: Mapping[str, Any] | None = None, path_prefix: str | None = None,
              path_glob: str | None = None) -> ItemFilter | None:
        """A checked filter, or None when nothing is asked (no filter: every item)."""
        pairs = []
        for key, value in sorted((metadata or {}).items()):
            if not isinstance(key, str) or not key or '"' in key:
                raise ValueError(f"metadata filter keys are non-empty strings without '\"', got {key!r}")
            if not (value is None or isinstance(value, (str, bool, int, float))):
                raise ValueError(f"metadata filter {key!r}: the value must be a {SCALAR_TYPES}, "
                                 f"not {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"metadata filter {key!r}: {value} is not a JSON number")
            pairs.append((key, value))
        if path_prefix == "":
            path_prefix = None
        if path_glob == "":
            path_glob = None
        if not pairs and path_prefix is None and path_glob is None:
            return None
        return cls(tuple(pairs), path_prefix, path_glob)

    def cache_key(self) -> tuple[Any, ...]:
        """Equal only for the same question: True == 1 in Python, but not in a JSON filter."""
        return (tuple((k, type(v).__name__, v) for k, v in self.metadata), self.path_prefix, self.path_glob)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        if self.path_prefix is not None:
            out["path_prefix"] = self.path_prefix
        if self.path_glob is not None:
            out["path_glob"] = self.path_glob
        return out

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition on `items` and its arguments."""
        clauses: list[str] = []
        args: list[Any] = []
        for key, value in self.metadata:
            path = f'$."{key}"'  # quoted: a key with dots or brackets is one key, not a JSON path
            if value is None:
                clauses.append("json_type(metadata, ?) = 'null'")
                args.append(path)
            elif isinstance(value, bool):
                clauses.append("json_type(metadata, ?) = ?")
                args += [path, "true" if value else "false"]
            elif isinstance(value, str):
                clauses.append("json_type(metadata, ?) = 'text' AND json_extract(metadata, ?) = ?")
                args += [path, path, value]
            else:
                clauses.append("json_type(metadata, ?) IN ('integer', 'real') AND json_extract(metadata, ?) = ?")
                args += [path, path, value]
        if self.path_prefix is not None:
            upper = _successor(self.path_prefix)
            if upper is not None:  # a range the path index answers, then the exact test
                clauses.append("path >= ? AND path < ?")
                args += [self.path_prefix, upper]
            clauses.append("substr(path, 1, ?) = ?")
            args += [len(self.path_prefix), self.path_prefix]
        if self.path_glob is not None:
            clauses.append("path GLOB ?")
            args.append(self.path_glob)
        return " AND ".join(clauses) or "1", args


def _successor(prefix: str) -> str | None:
    """The smallest string above every string that starts with `prefix` (UTF-8 order = code point order)."""
    last = ord(prefix[-1])
    if last >= 0x10FFFF or 0xD7FF <= last < 0xE000:
        return None
    return prefix[:-1] + chr(last + 1)


def parse_where(items: list[str]) -> dict[str, Scalar]:
    """`KEY=VALUE` pairs (the CLI's --where): VALUE is JSON when it parses as a JSON scalar
    (`year=2020`, `ok=true`, `label="2020"`), else the text itself (`label=cat`)."""
    out: dict[str, Scalar] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where wants KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if isinstance(value, (list, dict)):
            raise ValueError(f"--where {key}: the value must be a {SCALAR_TYPES}, not {text!r}")
        out[key] = value
    return out


def _read_only(directory: Path) -> sqlite3.Connection:
    db = Path(directory) / DB_FILE
    if not db.is_file():
        raise FileNotFoundError(f"{directory} is not an index directory ({DB_FILE} is missing)")
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None, timeout=60,
                           check_same_thread=False)


class FilterCache:
    """Filter answers per (index directory, committed generation, filter); least recently used out."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[Any, ...], IdSet] = OrderedDict()

    def matching_ids(self, directory: str | Path, flt: ItemFilter) -> IdSet:
        conn = _read_only(Path(directory))
        try:
            conn.execute("BEGIN")  # the generation and the rows of one commit
            row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
            key = (str(Path(directory).resolve()), int(json.loads(row[0])) if row else 0, flt.cache_key())
            with self._lock:
                if key in self._cache:
                    self._cache.move_to_end(key)
                    return self._cache[key]
            found = IdSet.from_chunks(_ids(conn, flt))
            conn.execute("ROLLBACK")
        finally:
            conn.close()
        with self._lock:
            self._cache[key] = found
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return found


def _ids(conn: sqlite3.Connection, flt: ItemFilter) -> Iterator[np.ndarray]:
    where, args = flt.where()
    cur = conn.execute(f"SELECT id FROM items WHERE {where} ORDER BY id", args)
    while rows := cur.fetchmany(_CHUNK):
        yield np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))


_default_cache = FilterCache()


def matching_ids(directory: str | Path, flt: ItemFilter, *, cache: FilterCache | None = None) -> IdSet:
    """The ids of the committed items in `directory` that pass `flt` (cached per commit)."""
    return (cache or _default_cache).matching_ids(directory, flt)
