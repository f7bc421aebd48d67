"""Creating an index writes only inside its directory (index/dir_init.py): an existing empty directory
is initialised in place (its inode, its parent untouched), a crash before the last step leaves a
directory that is simply created again, and racing creators never replace each other's index."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest

from index.dir_init import TMP_PREFIX
from index.schema import DB_FILE
from index.store import ImageIndex

ROOT = Path(__file__).resolve().parents[1]


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_existing_empty_directory_is_initialised_in_place(tmp_path: Path) -> None:
    target = tmp_path / "parent" / "index"
    target.mkdir(parents=True)
    inode = target.stat().st_ino
    with ImageIndex.create(target, 4, root="/images") as idx:
        idx.add(np.eye(4, dtype=np.float32)[:2], [{"path": "a.jpg"}, {"path": "b.jpg"}])
        idx.commit()
    # the same directory (a mount point cannot be replaced), and nothing beside it
    assert target.stat().st_ino == inode
    assert _names(tmp_path / "parent") == ["index"]
    assert not [n for n in _names(target) if n.startswith(TMP_PREFIX)]
    with ImageIndex.open(target) as idx:
        assert len(idx) == 2 and idx.stats()["root"] == "/images"


def test_missing_directory_is_created(tmp_path: Path) -> None:
    with ImageIndex.create(tmp_path / "a" / "b", 4) as idx:
        assert len(idx) == 0
    assert (tmp_path / "a" / "b" / DB_FILE).is_file()


def test_a_directory_with_other_files_or_an_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=r"not empty \(cat\.jpg\)"):
        ImageIndex.create(tmp_path / "photos", 4)
    assert _names(tmp_path / "photos") == ["cat.jpg"]
    ImageIndex.create(tmp_path / "index", 4).close()
    with pytest.raises(FileExistsError, match="already holds an index"):
        ImageIndex.create(tmp_path / "index", 4)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileExistsError):
        ImageIndex.create(tmp_path / "file", 4)


def test_a_crash_before_the_last_step_is_created_again(tmp_path: Path) -> None:
    """A real process dies (os._exit) right before index.sqlite would appear."""
    target = tmp_path / "index"
    target.mkdir()
    code = (
        "import os, sys\n"
        "import index.dir_init as d\n"
        "d._publish = lambda tmp, target: os._exit(9)\n"
        "from index.store import ImageIndex\n"
        "ImageIndex.create(sys.argv[1], 4)\n"
    )
    crashed = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT, timeout=60)
    assert crashed.returncode == 9
    left = _names(target)
    assert left and all(n.startswith(TMP_PREFIX) for n in left)  # the half-built database, nothing else
    with pytest.raises(FileNotFoundError):
        ImageIndex.open(target)  # not an index yet
    with ImageIndex.create(target, 4) as idx:
        assert len(idx) == 0
    assert not [n for n in _names(target) if n.startswith(TMP_PREFIX)]


def test_racing_creators_never_replace_each_other(tmp_path: Path) -> None:
    target = tmp_path / "index"
    target.mkdir()
    results: list[str] = []
    start = threading.Barrier(4)

    def create() -> None:
        start.wait()
        try:
            with ImageIndex.create(target, 4) as idx:
                idx.add(np.ones((1, 4), np.float32), [{"path": f"{threading.get_ident()}.jpg"}])
                idx.commit()
            results.append("created")
        except FileExistsError:
            results.append("exists")

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == ["created", "exists", "exists", "exists"]
    with ImageIndex.open(target) as idx:
        assert len(idx) == 1  # the winner's item, in the index it created


def test_only_the_index_directory_is_written_as_a_user_who_cannot_write_its_parent() -> None:
    """The compose case by permissions alone: run as uid 65534 (nobody) with the parent root-owned."""
    if os.geteuid() != 0:
        pytest.skip("switching to another uid needs root (CI runs the suite as root)")
    from composekit import as_user, needs_read_capability

    uid = gid = 65534
    with tempfile.TemporaryDirectory(prefix="simsearch-dirinit-") as tmp:  # pytest's tmp is private to root
        base = Path(tmp)
        os.chmod(base, 0o755)
        (base / "index").mkdir()
        os.chown(base / "index", uid, gid)
        prefix = as_user(uid, gid, read_capability=needs_read_capability(uid, gid))
        code = "import sys\nfrom index.store import ImageIndex\nImageIndex.create(sys.argv[1], 4).close()\n"
        run = subprocess.run([*prefix, sys.executable, "-c", code, str(base / "index")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        assert _names(base) == ["index"] and (base / "index" / DB_FILE).stat().st_uid == uid
