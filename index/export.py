"""`index export`: every item's id, path, metadata and vector, streamed to Parquet or .npy files.

    F.parquet   one row per item: id int64, path, sha256, width, height, size, mtime, added_at,
                metadata (the JSON object as text: its keys differ from item to item) and
                vector (fixed_size_list<float32>[D]); row groups of CHUNK_ROWS rows.
                pandas: pd.read_parquet(F); numpy: np.stack(table["vector"].to_numpy(zero_copy_only=False))
                or pyarrow's table["vector"].combine_chunks().flatten().to_numpy().reshape(-1, D).
    F.npy       float32 [N, D], the vectors, row i = item i
    F.ids.npy   int64 [N], the ids, in the same order
    F.jsonl     N lines, line i = item i: {"id", "path", "sha256", "width", "height", "size",
                "mtime", "added_at", "metadata"}

For .npy the vectors stay a plain array that `np.load(F, mmap_mode="r")` opens without reading
it, so ids and records travel in two files beside it (a structured array would tie the vectors to
variable-length strings). Rows are in id order, read from one committed generation of the SQLite
rows (the source of truth: float32 exactly as indexed, never a compressed FAISS code) in chunks of
CHUNK_ROWS, so memory stays at one chunk whatever the number of items. Each file is written to a
temporary name and renamed into place when complete. pyarrow is imported only for .parquet
(the `export` extra).
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from index.schema import DB_FILE

CHUNK_ROWS = 4096  # rows in memory at a time (about 10 MB with 512-d vectors), and per Parquet row group
FORMATS = (".parquet", ".npy")


RECORD_COLUMNS = ("id", "path", "sha256", "width", "height", "size", "mtime", "added_at", "metadata")


@dataclass
class Chunk:
    ids: np.ndarray
    vectors: np.ndarray
    rows: list[tuple]  # RECORD_COLUMNS, then the vector blob; metadata is JSON text


def npy_companions(out: Path) -> tuple[Path, Path]:
    """F.ids.npy and F.jsonl beside F.npy."""
    stem = out.with_suffix("")
    return stem.with_name(stem.name + ".ids.npy"), stem.with_name(stem.name + ".jsonl")


def _chunks(conn: sqlite3.Connection, dim: int) -> Iterator[Chunk]:
    cur = conn.execute("SELECT id, path, sha256, width, height, size, mtime, added_at, metadata, vector "
                       "FROM items ORDER BY id")
    while rows := cur.fetchmany(CHUNK_ROWS):
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.frombuffer(b"".join(r[9] for r in rows), dtype="<f4").reshape(len(rows), dim)
        yield Chunk(ids, vectors, rows)


class _Staged:
    """Files written under temporary names beside their targets, renamed into place on success."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._moves: list[tuple[str, Path]] = []
        stack.callback(self._discard)

    def open(self, target: Path) -> BinaryIO:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.fchmod(fd, 0o644)
        self._moves.append((tmp, target))
        return self._stack.enter_context(os.fdopen(fd, "wb"))

    def commit(self, files: list[BinaryIO]) -> None:
        for f in files:
            f.flush()
            os.fsync(f.fileno())
        for tmp, target in self._moves:
            os.replace(tmp, target)
        self._moves = []

    def _discard(self) -> None:
        for tmp, _ in self._moves:
            Path(tmp).unlink(missing_ok=True)


def _write_npy(out: Path, conn: sqlite3.Connection, count: int, dim: int, progress: Callable[[int], None]) -> list[Path]:
    ids_path, jsonl_path = npy_companions(out)
    with ExitStack() as stack:
        staged = _Staged(stack)
        fv, fi, fj = staged.open(out), staged.open(ids_path), staged.open(jsonl_path)
        np.lib.format.write_array_header_2_0(fv, {"descr": "<f4", "fortran_order": False, "shape": (count, dim)})
        np.lib.format.write_array_header_2_0(fi, {"descr": "<i8", "fortran_order": False, "shape": (count,)})
        written = 0
        for chunk in _chunks(conn, dim):
            fv.write(np.ascontiguousarray(chunk.vectors, dtype="<f4").tobytes())
            fi.write(chunk.ids.astype("<i8").tobytes())
            fj.write("".join(_json_line(r) for r in chunk.rows).encode())
            written += len(chunk.ids)
            progress(len(chunk.ids))
        if written != count:  # the read transaction makes this impossible; a torn file must not be renamed in
            raise RuntimeError(f"read {written} rows of {count}")
        staged.commit([fv, fi, fj])
    return [out, ids_path, jsonl_path]


def _json_line(row: tuple) -> str:
    rec = dict(zip(RECORD_COLUMNS, row, strict=False))
    rec["metadata"] = json.loads(rec["metadata"])
    return json.dumps(rec, ensure_ascii=False) + "\n"


def parquet_schema(dim: int) -> Any:
    import pyarrow as pa

    return pa.schema([
        ("id", pa.int64()), ("path", pa.string()), ("sha256", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("size", pa.int64()), ("mtime", pa.float64()), ("added_at", pa.float64()),
        ("metadata", pa.string()), ("vector", pa.list_(pa.float32(), dim)),
    ])


def _write_parquet(out: Path, conn: sqlite3.Connection, dim: int, progress: Callable[[int], None]) -> list[Path]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("Parquet export needs pyarrow: pip install 'simsearch[export]' "
                         "(or export to a .npy file)") from None
    schema = parquet_schema(dim)
    with ExitStack() as stack:
        staged = _Staged(stack)
        f = staged.open(out)
        writer = pq.ParquetWriter(f, schema, compression="zstd")
        for chunk in _chunks(conn, dim):
            cols = {k: [r[n] for r in chunk.rows] for n, k in enumerate(RECORD_COLUMNS) if k != "id"}
            flat = pa.array(np.ascontiguousarray(chunk.vectors, dtype=np.float32).ravel(), type=pa.float32())
            table = pa.table({"id": pa.array(chunk.ids), **cols,
                              "vector": pa.FixedSizeListArray.from_arrays(flat, dim)}, schema=schema)
            writer.write_table(table, row_group_size=CHUNK_ROWS)
            progress(len(chunk.ids))
        writer.close()
        staged.commit([f])
    return [out]


def export_index(directory: str | Path, out: str | Path, *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write every committed item of the index in `directory` to `out` (.parquet or .npy)."""
    out = Path(out)
    if out.suffix not in FORMATS:
        raise ValueError(f"export to a file ending in one of {list(FORMATS)}, not {out.name!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent} is not a directory")
    db = Path(directory) / DB_FILE
    if not db.is_file():
        raise FileNotFoundError(f"{directory} is not an index directory ({DB_FILE} is missing)")
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None, timeout=60)
    try:
        conn.execute("BEGIN")  # one commit throughout, while writers go on
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        dim, count = int(meta["dim"]), int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        step = progress or (lambda n: None)
        files = (_write_parquet(out, conn, dim, step) if out.suffix == ".parquet"
                 else _write_npy(out, conn, count, dim, step))
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    return {"rows": count, "dim": dim, "generation": int(meta["generation"]), "model_name": meta.get("model_name", ""),
            "model_fingerprint": meta.get("model_fingerprint", ""), "files": [str(p) for p in files],
            "bytes": sum(p.stat().st_size for p in files)}
