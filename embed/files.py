"""Which files are images, and the walk of a folder that finds them: one set of rules for every stage.

The folder indexer (`index/scan.py`), pretraining and `eval` (`pretrain/data.py`), export
verification (`export/verify.py`) and the upload store all list images through this module, so a
folder means the same set of files to each of them.

The rules:

- **Extensions** decide which files are *tried*: `IMAGE_EXTENSIONS`, compared case-insensitively
  (`IMG_0001.JPG` is an image). A file without an extension is not tried. Decoding then goes by
  content, never by extension (a PNG named `.jpg` decodes), and a file that fails to decode is a
  per-file error of the stage that reads it.
- **Hidden** entries are skipped, files and folders alike: any name below the root that starts with
  `.` (`.DS_Store`, `.git/`, macOS `._IMG_0001.JPG` resource forks, `.thumbnails/`, the `.*.tmp`
  files of an atomic write in progress). The root itself may be hidden.
- **Symlinks** are followed, to files and to folders: a link is listed under its own path (the
  relative path goes through the link) with the size and mtime of its target. Each real folder is
  walked once, identified by (device, inode), under the path with the fewest symlinked folders on
  it (then the fewest levels, then name order): a folder that is in the tree anyway keeps its real
  path, and a link back to an ancestor (a loop) or a second link to the same folder adds nothing.
  Two links to one *file* are two entries (the indexer reports the second as a duplicate).
- **Not listed, but reported** in `FolderListing.skipped` (relative path, reason) and logged:
  a broken symlink or a FIFO/device/socket with an image extension, a sub-folder that cannot
  be read, and an image file or sub-folder whose name is not valid UTF-8 (bytes from another
  encoding, e.g. an old archive's Latin-1 names: the index stores and answers paths as text, so such
  a name is reported under its escaped form, `caf\\xe9.jpg`, to be renamed). Nothing here ever
  raises for one bad entry; only a root that is not a folder is an error.
- **Order**: sorted by the '/'-separated relative path, the same on every machine.
"""

from __future__ import annotations

import heapq
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

# Formats Pillow (with pillow-heif for HEIF/HEIC) decodes, lower-case with the dot.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".webp", ".tif", ".tiff",
    ".avif", ".heif", ".heic", ".ppm", ".pgm", ".pbm", ".pnm",
})


@dataclass(frozen=True)
class ImageFile:
    rel: str  # relative to the root, '/'-separated, through any symlinked folder
    size: int
    mtime: float
    root: Path

    @property
    def path(self) -> Path:
        """root / rel (built on demand: a Path costs more than the walk's own work per file)."""
        return self.root / self.rel


@dataclass
class FolderListing:
    root: Path
    files: list[ImageFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def has_image_extension(name: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> bool:
    """True when `name` (a file name or '/'-separated path) ends in one of `extensions`, any case."""
    base = name.rpartition("/")[2]
    dot = base.rfind(".")
    return dot > 0 and base[dot:].lower() in extensions


def is_image_name(name: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> bool:
    """The walk's test for one directory entry's name: not hidden, and an image extension."""
    return not is_hidden(name) and has_image_extension(name, extensions)


def walk_images(root: str | os.PathLike[str], extensions: Iterable[str] = IMAGE_EXTENSIONS) -> FolderListing:
    """Every image file under `root` by the rules above, sorted by relative path."""
    root = Path(root)
    try:
        root_stat = root.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"image folder not found: {root}") from None
    if not stat.S_ISDIR(root_stat.st_mode):
        raise NotADirectoryError(f"{root} is not a directory")
    exts = frozenset(e.lower() for e in extensions)
    listing = FolderListing(root)
    visited: set[tuple[int, int]] = set()
    # (symlinked folders on the path, depth, relative prefix, folder, its (device, inode))
    pending: list[tuple[int, int, str, str, tuple[int, int]]] = [
        (0, 0, "", str(root), (root_stat.st_dev, root_stat.st_ino))]
    while pending:
        links, depth, prefix, folder, key = heapq.heappop(pending)
        if key in visited:
            continue
        visited.add(key)
        for entry, st, image_named in _entries(folder, prefix, exts, listing):
            rel = prefix + entry.name
            if stat.S_ISDIR(st.st_mode):
                heapq.heappush(pending, (links + entry.is_symlink(), depth + 1, rel + "/", entry.path,
                                         (st.st_dev, st.st_ino)))
            elif image_named:
                if stat.S_ISREG(st.st_mode):
                    listing.files.append(ImageFile(rel, st.st_size, st.st_mtime, root))
                else:
                    listing.skipped.append((rel, "not a regular file"))
    listing.files.sort(key=lambda f: f.rel)
    listing.skipped.sort()
    for rel, reason in listing.skipped:
        logger.warning("%s: skipping %s: %s", root, rel, reason)
    return listing


def _entries(folder: str, prefix: str, exts: frozenset[str],
             listing: FolderListing) -> list[tuple[os.DirEntry[str], os.stat_result, bool]]:
    """The folder's visible sub-folders and image-named entries with their (symlink-followed) stat.

    Other files are not stat'ed (the directory entry's type says they are not folders), so a folder
    of many non-images costs one `scandir`. Problems go to `listing.skipped`.
    """
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not is_hidden(e.name)]
    except OSError as e:
        listing.skipped.append((prefix.rstrip("/") or ".", f"unreadable folder: {e.strerror or e}"))
        return []
    out = []
    for entry in entries:
        image_named = has_image_extension(entry.name, exts)
        try:
            if not image_named and not entry.is_dir():  # is_dir: free unless a symlink
                continue
            if not _is_utf8(entry.name):
                listing.skipped.append((_escaped(prefix + entry.name), "name is not valid UTF-8; rename it"))
                continue
            out.append((entry, entry.stat(), image_named))
        except OSError as e:
            if image_named:  # a dangling link to anything else is not ours to report
                reason = "broken symlink" if entry.is_symlink() else f"cannot stat: {e.strerror or e}"
                listing.skipped.append((prefix + entry.name, reason))
    return out


def _is_utf8(name: str) -> bool:
    """False for a name with bytes that are not UTF-8 (Python holds them as lone surrogates)."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _escaped(rel: str) -> str:
    """A printable, storable form of a name with undecodable bytes: each such byte as `\\xNN`."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")
