"""server/upload_store.py across processes: a file removed by one server process while another adds
an item with the same bytes is written again once that item is committed, and removing and
re-checking exclude each other through `uploads/.lock` even between processes. (The race itself is
too narrow to hit reliably under load in tests/test_server_workers.py, so its steps are played here
in the order that loses the file without the check.)"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from pathlib import Path

from server.upload_store import UploadStore

HOLD_S = 1.0


def _saved(store: UploadStore, data: bytes) -> Path:
    return store.save(data, hashlib.sha256(data).hexdigest(), "a.jpg")


def test_a_file_removed_before_the_adders_commit_is_written_again(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads")
    data = b"\xff\xd8 some jpeg bytes"
    path = _saved(store, data)  # worker B saved the file; its item is not committed yet
    # worker A deleted the last committed item with these bytes: it sees no user and removes the file
    assert store.discard_unused(str(path), lambda p: False)
    assert not path.exists()
    assert store.ensure(str(path), data)  # B, once its item is committed: the file is back
    assert path.read_bytes() == data
    assert not store.ensure(str(path), data)  # nothing to do the second time
    # a removal that finds a committed user keeps the file
    assert not store.discard_unused(str(path), lambda p: True) and path.exists()
    # a path outside the uploads folder is never touched
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(data)
    assert not store.discard_unused(str(outside), lambda p: False) and outside.exists()


def test_removal_waits_for_another_process_holding_the_lock(tmp_path: Path) -> None:
    store = UploadStore(tmp_path / "uploads")
    path = _saved(store, b"bytes")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         f"time.sleep({HOLD_S})\n",
         str(store.directory / ".lock")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        assert store.discard_unused(str(path), lambda p: False)
        waited = time.monotonic() - start
    finally:
        holder.wait(10)
    assert waited >= HOLD_S / 2, f"removed after {waited:.2f} s while another process held the lock"
    assert not path.exists()
