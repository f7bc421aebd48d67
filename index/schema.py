"""The SQLite schema of an index directory and its key-value metadata table."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import numpy as np

DB_FILE = "index.sqlite"
FORMAT = "simsearch-index"
FORMAT_VERSION = 2
# 1: a whole FAISS file per commit (vectors.<G>.faiss); 2: a base snapshot + the removal log. A
# version-1 directory opens as a base-less version 2 one (every row in the delta) and becomes
# version 2 at its first compaction; software that knows only version 1 then refuses it.
READABLE_VERSIONS = (1, 2)
DEFAULT_RECALL_TARGET = 0.95  # recall@10 the search parameters are tuned for (index/tuning.py)
# Keys an index of format 1 lacks (docs/design.md, "The index directory"): a base-less index
# (every row in the delta) with the default budget and recall target.
META_DEFAULTS: dict[str, Any] = {
    "index_kind": "flat", "nlist": 0, "nprobe": 0, "k_factor": 0, "pq_m": 0, "opq": False, "rerank": False,
    "trained_on": 0, "training_size": 0, "memory_budget": 0, "recall_target": DEFAULT_RECALL_TARGET,
    "recall_estimate": {}, "base_generation": 0, "base_hwm": 0, "base_count": 0, "base_build": {},
    "whiten": "off", "whitening_fitted_on": 0,  # an index from before whitening: off until configured
}


# images added through the server are stored here, content-addressed; their items have absolute paths
UPLOADS_DIR = "uploads"

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE blobs (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a removed id is never given out again
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    sha256 TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    added_at REAL NOT NULL,
    metadata TEXT NOT NULL,               -- JSON object
    vector BLOB NOT NULL                  -- float32 little-endian, dim values
);
CREATE INDEX items_path ON items (path);
CREATE INDEX items_sha256 ON items (sha256);
"""

# A re-embedding in progress (`index build --reembed`): the new model's vectors, filled in committed
# batches beside `items` and invisible to readers until one transaction swaps them in. Created on
# demand, so indexes made before it existed need no migration.
_REEMBED_SCHEMA = """
CREATE TABLE IF NOT EXISTS reembed_vectors (
    id INTEGER PRIMARY KEY,               -- an items.id
    vector BLOB,                          -- float32 little-endian; NULL: the item is dropped at the switch
    error TEXT                            -- why it is dropped (JSON: path, reason, message)
);
"""


# Ids removed since the base snapshot, with the commit that removed them: readers that follow
# commits drop exactly these (index/generation.py); a compaction deletes the entries its new base
# reflects. Created on demand, like the re-embedding table.
_REMOVED_SCHEMA = """
CREATE TABLE IF NOT EXISTS removed (
    id INTEGER PRIMARY KEY,               -- an items.id that is gone
    generation INTEGER NOT NULL           -- the commit that removed it
);
CREATE INDEX IF NOT EXISTS removed_generation ON removed (generation);
"""


class IndexDirError(ValueError):
    """An index directory that is missing, damaged, or built for another model."""


def init_db(conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript("BEGIN;" + _SCHEMA + _REMOVED_SCHEMA + "COMMIT;")
    conn.execute("BEGIN")
    write_meta(conn, meta)
    conn.execute("COMMIT")


def read_meta(conn: sqlite3.Connection) -> dict[str, Any]:
    try:
        rows = conn.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.DatabaseError as e:
        raise IndexDirError(f"not an index database: {e}") from None
    return {k: json.loads(v) for k, v in rows}


def write_meta(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
    conn.executemany(
        "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
        [(k, json.dumps(v)) for k, v in values.items()],
    )


def ensure_reembed_table(conn: sqlite3.Connection) -> None:
    conn.execute(_REEMBED_SCHEMA)


def ensure_removed_table(conn: sqlite3.Connection) -> None:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'removed'").fetchone() is None:
        for statement in _REMOVED_SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)


def log_removed(conn: sqlite3.Connection, ids: list[int], generation: int) -> None:
    ensure_removed_table(conn)
    conn.executemany("INSERT OR REPLACE INTO removed (id, generation) VALUES (?, ?)",
                     [(int(i), generation) for i in ids])


def removed_since(conn: sqlite3.Connection, generation: int, *, max_id: int | None = None) -> np.ndarray:
    """Ids removed by commits after `generation` (and <= `max_id`), ascending; none before the table exists."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'removed'").fetchone() is None:
        return np.zeros(0, dtype=np.int64)
    sql, args = "SELECT id FROM removed WHERE generation > ?", [int(generation)]
    if max_id is not None:
        sql, args = sql + " AND id <= ?", [*args, int(max_id)]
    rows = conn.execute(sql + " ORDER BY id", args).fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
