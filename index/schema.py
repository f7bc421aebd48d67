"""The SQLite schema of an index directory and its key-value metadata table."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

DB_FILE = "index.sqlite"
FORMAT = "simsearch-index"
FORMAT_VERSION = 1
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


class IndexDirError(ValueError):
    """An index directory that is missing, damaged, or built for another model."""


def init_db(conn: sqlite3.Connection, meta: dict[str, Any]) -> None:
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript("BEGIN;" + _SCHEMA + "COMMIT;")
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
