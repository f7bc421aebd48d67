"""Creating an index directory in place: every file written is inside it, and a crash is harmless.

The directory may be a volume mount whose parent the process cannot write (docker-compose mounts
INDEX_DIR at `/index`, whose parent is `/`), and a mount point can be neither removed nor renamed.
So nothing is built beside it: the database is built under a temporary name inside the directory
(`.index.sqlite.<random>.tmp`) and linked to `index.sqlite` as the last step. A crash before that
leaves no `index.sqlite`, which means "not created yet": the next create removes the leftover and
starts again. `index.sqlite` therefore exists only complete, as after the old rename-into-place.

A brand-new directory is made with `mkdir` first (its parent must be writable, as for any
`mkdir`) and then takes the same path: one way to create an index, whatever the directory is.
Creators of one directory take a `flock` on it, and the link never replaces an `index.sqlite`
another process made (a lost race is a FileExistsError, never a lost index). The one file that
may be there before the index is `index build`'s lock (index/build_lock.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from index.build_lock import BUILD_LOCK
from index.schema import DB_FILE, init_db

logger = logging.getLogger(__name__)

TMP_PREFIX = f".{DB_FILE}."  # + <random>.tmp, and SQLite's -journal/-wal/-shm beside it


def create_in_place(directory: Path, meta: dict[str, Any]) -> None:
    """Make `directory` (missing, or an empty directory) an index with this metadata."""
    directory.mkdir(parents=True, exist_ok=True)  # FileExistsError when it is a file
    with _locked(directory) as dir_fd:
        target = directory / DB_FILE
        if target.exists():
            raise FileExistsError(f"{directory} already holds an index ({DB_FILE})")
        names = [p.name for p in directory.iterdir()]
        others = sorted(n for n in names if not n.startswith(TMP_PREFIX) and n != BUILD_LOCK)
        if others:
            raise FileExistsError(f"{directory} is not empty ({', '.join(others[:5])}): an index needs an empty directory")
        for name in names:  # a crashed create's files: nothing refers to them
            if name.startswith(TMP_PREFIX):
                (directory / name).unlink(missing_ok=True)
        tmp = directory / f"{TMP_PREFIX}{secrets.token_hex(8)}.tmp"
        try:
            _write_db(tmp, meta)
            _publish(tmp, target)
        finally:
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        os.fsync(dir_fd)


def _publish(tmp: Path, target: Path) -> None:
    # link, not rename: it never replaces an index.sqlite that a racing creator published
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise FileExistsError(f"{target.parent} already holds an index: another process created it") from None
    except OSError:  # a filesystem without hard links (some FUSE/SMB mounts): rename, under the lock
        os.rename(tmp, target)


def _write_db(path: Path, meta: dict[str, Any]) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        init_db(conn, meta)
        # a rollback-journal file holds everything in itself: no -wal to carry along with it
        # (ImageIndex.open switches it to WAL again)
        mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        if mode != "delete":
            raise OSError(f"cannot checkpoint {path} (journal mode stays {mode!r})")
    finally:
        conn.close()
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[int]:
    """An exclusive flock on the directory itself (no lock file to leave behind)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without flock: the link below still never overwrites
            logger.debug("no flock on %s (%s)", directory, e)
        yield fd
    finally:
        os.close(fd)  # releases the lock
