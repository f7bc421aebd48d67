"""Where the bytes of images added through the API live: `<index_dir>/uploads/<sha256>.<ext>`.

Content-addressed, so the same image uploaded twice is one file; the index records its path like
any other indexed file, so thumbnails work for uploads too. Files are written atomically.
"""

from __future__ import annotations

import os
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
