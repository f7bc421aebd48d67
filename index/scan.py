"""The folder indexer's view of a folder: relative path -> (size, mtime), hashing, and file jobs.

Which files are images, hidden files, symlinks and case are decided once for every stage in
`embed.files` (see its docstring); `scan_folder` is that walk keyed by relative path.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from embed import files

# Compared lower-case. Content decides the format when decoding; the extension only decides which
# files are tried at all, so README.md or .DS_Store never show up as failures.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(sorted(files.IMAGE_EXTENSIONS))


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime: float


@dataclass
class FileJob:
    path: str  # relative to the root, '/'-separated
    size: int
    mtime: float
    data: bytes | None = None
    sha256: str = ""
    error: OSError | None = None


def scan_folder(root: str | os.PathLike[str], extensions: Iterable[str] = IMAGE_EXTENSIONS,
                index_dir: str | os.PathLike[str] | None = None) -> dict[str, FileStat]:
    """Every image file under `root` by the `embed.files` rules, sorted by relative path; none under
    `index_dir` (the index being built, when it lies inside the folder: its uploads/ are items already).

    Raises NotADirectoryError (FileNotFoundError when missing) for a root that is not a folder;
    broken links and unreadable sub-folders are logged and left out.
    """
    listing = files.walk_images(root, extensions)
    inside = _relative_inside(Path(index_dir), Path(root)) if index_dir is not None else None
    return {f.rel: FileStat(f.size, f.mtime) for f in listing.files
            if inside is None or not f.rel.startswith(inside)}


def _relative_inside(directory: Path, root: Path) -> str | None:
    """`directory` as a '/'-ended path relative to `root`, or None when it is not below it."""
    try:
        rel = directory.resolve().relative_to(root.resolve())
    except ValueError:
        return None
    return rel.as_posix() + "/" if rel.parts else None


def _read_and_hash(root: Path, job: FileJob) -> FileJob:
    try:
        with open(root / job.path, "rb") as f:
            job.data = f.read()
        st = os.stat(root / job.path)
        job.size, job.mtime = st.st_size, st.st_mtime
        job.sha256 = hashlib.sha256(job.data).hexdigest()
    except OSError as e:
        job.error = e
    return job


def read_and_hash(root: str | os.PathLike[str], jobs: Iterable[FileJob | None], *, workers: int = 2,
                  window: int = 64) -> Iterator[FileJob]:
    """Fill each job's bytes and sha256 in threads (hashlib releases the GIL); order kept, memory bounded.

    A None from `jobs` says "no next job known yet": the oldest job in flight is handed back then,
    rather than waiting for the window to fill (the source must not answer None with none in flight).
    """
    root = Path(root)
    pending: deque[Future[FileJob]] = deque()
    it = iter(jobs)
    with ThreadPoolExecutor(workers, thread_name_prefix="hash") as pool:
        try:
            for job in it:
                if job is None:
                    if not pending:
                        raise RuntimeError("read_and_hash: the job source had nothing ready with no job in flight")
                    yield pending.popleft().result()
                    continue
                pending.append(pool.submit(_read_and_hash, root, job))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
