"""One `index build` at a time per index: an exclusive flock on `INDEX/.build.lock` for the run.

Two builds of one folder into one index, started together (a cron job that overlaps the last
one, a command run twice), would each see the same files missing from the index and both add
them: every such file twice. Other writers need no such lock (the server adds uploads, which no
build adds; SQLite serialises the commits), so only builds take it. The second build stops at
once with the holder's pid rather than wait, so an overlapping scheduled run ends instead of
queueing behind the first.

The lock is re-entrant within a process (`build_index_on_ray` holds it across its Ray stage and
the `build_index` it runs), and a crash releases it with the process. The file may exist before
the index does: index/dir_init.py creates an index beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from index.schema import IndexDirError

BUILD_LOCK = ".build.lock"

_held: set[str] = set()  # the index directories this process holds the lock of


class IndexBusy(IndexDirError):
    """Another process is building this index."""


@contextlib.contextmanager
def exclusive_build(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the build lock of the index at `directory` (made if missing) inside; IndexBusy when
    another process holds it."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IndexDirError(f"{directory} is a file, not an index directory")
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    if key in _held:
        yield
        return
    fd = os.open(directory / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            raise IndexBusy(f"another `index build` is writing {directory}"
                            f"{f' (pid {holder})' if holder.isdigit() else ''}: wait for it to finish, "
                            "or stop it; what it commits is kept") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # releases the lock
