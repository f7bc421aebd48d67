"""Walk a folder for image files: relative path -> (size, mtime), hashing, and file jobs."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# By extension, compared lower-case. Content decides the format when decoding; the extension only
# decides which files are tried at all, so README.md or .DS_Store never show up as failures.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".jpe", ".png", ".apng", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".avif",
    ".heif", ".heic", ".ppm", ".pgm", ".pbm", ".pnm", ".jfif",
)


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


def scan_folder(root: str | os.PathLike[str], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> dict[str, FileStat]:
    """Every image file under `root` (recursive, hidden files and folders skipped), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    found: dict[str, FileStat] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # an unreadable sub-folder: its files simply are not there
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in extensions:
                st = entry.stat()
                rel = Path(entry.path).relative_to(root).as_posix()
                found[rel] = FileStat(st.st_size, st.st_mtime)
    return dict(sorted(found.items()))


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


def read_and_hash(root: str | os.PathLike[str], jobs: Iterable[FileJob], *, workers: int = 2,
                  window: int = 64) -> Iterator[FileJob]:
    """Fill each job's bytes and sha256 in threads (hashlib releases the GIL); order kept, memory bounded."""
    root = Path(root)
    pending: deque[Future[FileJob]] = deque()
    it = iter(jobs)
    with ThreadPoolExecutor(workers, thread_name_prefix="hash") as pool:
        try:
            for job in it:
                pending.append(pool.submit(_read_and_hash, root, job))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
