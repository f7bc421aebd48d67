"""Publishing a model directory atomically: build it aside, then flip a symlink.

    model            -> .model.v-20261130T004512-1a2b3c   (a symlink: what readers open)
    .model.v-...     the current version, complete, never modified after it is published
    .model.v-...     the previous version, kept until the next export so that a reader that
                     resolved the link just before the flip can finish reading it

An export writes everything into `.model.tmp-<stamp>`, fsyncs it, renames it to
`.model.v-<stamp>` and then replaces the `model` symlink with `os.replace` (atomic on POSIX).
A reader therefore sees the old directory or the new one, whole. A reader that needs several
files to agree (model.json and model.onnx) should resolve the link once
(`Path(model).resolve()`) and read both from there; versions older than the previous one are
deleted, so a reader holding a directory across two exports must reopen.

When `model` is an existing real directory (exported some other way), it is swapped with the
link by `renameat2(RENAME_EXCHANGE)` where the kernel has it (Linux), so the swap is atomic
too; elsewhere it is renamed aside first, leaving a moment with no `model` at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from embed.spec import MODEL_JSON
from export.errors import ExportError

log = logging.getLogger(__name__)

STALE_TMP_S = 24 * 3600


def staging_dir(target: str | os.PathLike[str]) -> Path:
    """A new empty directory next to `target` to build the model directory in."""
    target = Path(target)
    if target.exists() and not target.is_symlink():
        if not target.is_dir():
            raise ExportError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not (target / MODEL_JSON).is_file():
            raise ExportError(f"{target} exists and is not a model directory (no {MODEL_JSON}); refusing to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    path = target.parent / f".{target.name}.tmp-{_stamp()}"
    path.mkdir()
    return path


def publish(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Make `target` a symlink to the finished `staging` directory atomically; returns the version dir."""
    staging, target = Path(staging), Path(target)
    _fsync_tree(staging)
    with _publish_lock(target):
        return _publish_locked(staging, target)


@contextlib.contextmanager
def _publish_lock(target: Path) -> Iterator[None]:
    """Serialise concurrent exports to one target, so none deletes a version another just made."""
    fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _publish_locked(staging: Path, target: Path) -> Path:
    version = staging.with_name(staging.name.replace(".tmp-", ".v-", 1))
    staging.rename(version)
    previous = _current_version(target)
    link = target.with_name(f".{target.name}.link-{_stamp()}")
    link.symlink_to(version.name)  # relative: the pair can be moved or mounted together
    try:
        if target.is_dir() and not target.is_symlink():
            previous = _swap_in_real_dir(link, target)
        else:
            os.replace(link, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
    _fsync_dir(target.parent)
    _remove_old_versions(target, keep={version, previous} if previous else {version})
    log.info("published %s -> %s", target, version.name)
    return version


def _swap_in_real_dir(link: Path, target: Path) -> Path:
    """Put `link` where the directory `target` is; the old directory becomes a kept version."""
    aside = target.with_name(f".{target.name}.v-{_stamp()}-old")
    if _rename_exchange(link, target):
        link.rename(aside)  # after the exchange `link` names the old directory
    else:
        log.warning("atomic exchange unavailable: %s is briefly absent while it is replaced", target)
        target.rename(aside)
        os.replace(link, target)
    return aside


def _rename_exchange(a: Path, b: Path) -> bool:
    libc_name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    log.debug("renameat2(RENAME_EXCHANGE) failed: %s", os.strerror(ctypes.get_errno()))
    return False


def _current_version(target: Path) -> Path | None:
    if not target.is_symlink():
        return None
    dest = target.parent / os.readlink(target)
    return dest if dest.name.startswith(f".{target.name}.v-") else None


def _remove_old_versions(target: Path, keep: set[Path]) -> None:
    now = time.time()
    for p in target.parent.glob(f".{target.name}.*"):
        stale_tmp = ".tmp-" in p.name and now - p.stat().st_mtime > STALE_TMP_S
        if (p.name.startswith(f".{target.name}.v-") and p not in keep) or stale_tmp:
            shutil.rmtree(p, ignore_errors=True)


def discard(staging: str | os.PathLike[str]) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def _stamp() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
