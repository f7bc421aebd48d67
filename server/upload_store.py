"""Where the bytes of images added through the API live: `<index_dir>/uploads/<sha256>.<ext>`.

Content-addressed, so the same image uploaded twice is one file; the index records its path like
any other indexed file, so thumbnails work for uploads too. Files are written atomically.

Several processes may serve one index (`--workers N`, or two servers). One of them removing a
file that no committed item uses any more can race another adding an item with the same bytes, so
both steps run under an exclusive lock on `uploads/.lock` (flock) and the adder checks its file
once its item is committed: removal after that check sees the committed item and keeps the file;
removal before it is undone by the check, which writes the file again.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from embed.atomic import atomic_write_bytes
from embed.files import IMAGE_EXTENSIONS

# extensions kept from the client's filename (the project's one list, embed/files.py); anything else
# is stored as ".img" (decoding goes by content, never by extension)
KNOWN_EXTENSIONS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


class UploadStore:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory).resolve()

    def path_for(self, sha256: str, filename: str | None) -> Path:
        ext = (filename or "").rsplit(".", 1)[-1].lower() if filename and "." in filename else ""
        if ext not in KNOWN_EXTENSIONS:
            ext = "img"
        if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.directory / f"{sha256}.{ext}"

    def save(self, data: bytes, sha256: str, filename: str | None) -> Path:
        """Write the bytes (temp file, fsync, rename) unless an identical file is already there."""
        path = self.path_for(sha256, filename)
        if path.is_file() and path.stat().st_size == len(data):
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data)
        return path

    def owns(self, path: str) -> bool:
        return Path(path).resolve().parent == self.directory

    def discard(self, path: str) -> None:
        if self.owns(path):
            Path(path).unlink(missing_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across processes (blocking: call from a worker thread)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def discard_unused(self, path: str, in_use: Callable[[str], bool]) -> bool:
        """Remove the file unless `in_use(path)` (a committed item still has it); True when removed."""
        if not self.owns(path):
            return False
        with self._locked():
            if in_use(path):
                return False
            Path(path).unlink(missing_ok=True)
            return True

    def ensure(self, path: str, data: bytes) -> bool:
        """After the item that uses `path` is committed: write the file again if another process
        removed it meanwhile; True when it had to."""
        with self._locked():
            p = Path(path)
            if p.is_file() and p.stat().st_size == len(data):
                return False
            atomic_write_bytes(p, data)
            return True
