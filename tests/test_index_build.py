"""`simsearch index build/query/stats/remove`: incremental, resumable under kill -9, duplicates, failures."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tinymodel import write_tiny_model_dir

from embed.embedder import default_decode_workers, default_max_decode_workers
from index.cli import main
from index.store import ImageIndex

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[1]
MESSY_FAILURES = {
    "broken.png": "not_an_image", "decompression_bomb.gif": "too_large", "empty_file.jpg": "empty",
    "not_an_image.png": "not_an_image", "truncated_image.png": "truncated", "truncated_jpeg.jpg": "truncated",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def _folder(dst: Path, n_train: int = 0) -> Path:
    shutil.copytree(DATA / "cifar10-sample" / "test", dst)
    for p in sorted((DATA / "cifar10-sample" / "train").glob("*/*.jpg"))[:n_train]:
        (dst / "train" / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst / "train" / p.parent.name / p.name)
    return dst


def _build(folder: Path, out: Path, model: Path, tmp: Path, *extra: str) -> dict:
    summary = tmp / f"summary-{time.monotonic_ns()}.json"
    rc = main(["build", str(folder), "--model", str(model), "--out", str(out), "--summary", str(summary),
               "--no-progress", "--decode-workers", "2", *extra])
    assert rc == 0
    return json.loads(summary.read_text())


def _build_clean(folder: Path, model: Path, tmp: Path) -> Path:
    clean = tmp / f"clean-{time.monotonic_ns()}"
    _build(folder, clean, model, tmp)
    return clean


def _contents(out: Path) -> dict[str, np.ndarray]:
    with ImageIndex.open(out) as ix:
        recs = ix.records()
        assert len(ix) == len(recs) == len({r.path for r in recs})  # FAISS and rows agree; no path twice
        if recs:
            hits = ix.search(np.stack([ix.vector(r.id) for r in recs]), 1)
            assert [h[0].score for h in hits] == pytest.approx([1.0] * len(recs), abs=1e-4)
        return {r.path: ix.vector(r.id) for r in recs}


def _same_index(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for path in a:
        assert np.allclose(a[path], b[path], atol=1e-5), path


def test_build_query_stats_remove(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs")
    for name in list(MESSY_FAILURES) + ["flower.jpg", "transparent.png", "hopper_orientation_6.jpg", "README.md"]:
        shutil.copy(DATA / "messy" / name, folder / name)
    shutil.copy(DATA / "messy" / "flower.jpg", folder / "airplane" / "flower-copy.jpg")
    out = tmp_path / "idx"
    s = _build(folder, out, tiny, tmp_path)
    assert s["added"] == 500 + 3 and s["embedded"] == 503 and s["count"] == 503
    assert {f["path"]: f["reason"] for f in s["failed"]} == MESSY_FAILURES  # README.md is not tried
    # Files are taken in path order: the first copy is indexed, the later one reported.
    assert s["skipped_duplicates"] == [{"path": "flower.jpg", "duplicate_of": "airplane/flower-copy.jpg"}]
    contents = _contents(out)
    rec_size = ImageIndex.open(out).get_by_path("hopper_orientation_6.jpg")
    assert (rec_size.width, rec_size.height) == (128, 128) and len(rec_size.sha256) == 64

    capsys.readouterr()
    assert main(["query", str(folder / "cat" / "0007.jpg"), "--index", str(out), "-k", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["results"][0]["path"] == "cat/0007.jpg" and result["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert len(result["results"]) == 3
    assert main(["query", str(folder / "cat" / "0007.jpg"), "--index", str(out), "-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "id", "path"] and table[1].endswith("cat/0007.jpg")

    assert main(["stats", "--index", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["count"] == 503 and stats["model_name"] == "tiny" and stats["index_kind"] == "flat"

    target = ImageIndex.open(out).get_by_path("cat/0007.jpg").id
    assert main(["remove", str(target), "--path", "dog/0001.jpg", "--index", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == 2
    assert len(_contents(out)) == len(contents) - 2


def test_incremental_rebuild_equals_clean_build(tiny: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs")
    out = tmp_path / "idx"
    first = _build(folder, out, tiny, tmp_path)
    assert first["added"] == 500
    ids_before = {r.path: r.id for r in ImageIndex.open(out).records()}
    (folder / "cat" / "0000.jpg").unlink()                                   # deleted
    shutil.move(folder / "dog" / "0000.jpg", folder / "dog" / "renamed.jpg")  # moved
    shutil.copy(DATA / "messy" / "flower.jpg", folder / "bird" / "0000.jpg")  # content changed
    os.utime(folder / "frog" / "0000.jpg", (1e9, 1e9))                        # only touched
    shutil.copy(DATA / "messy" / "hopper.bmp", folder / "new.bmp")            # new
    shutil.move(folder / "ship" / "0000.jpg", folder / "ship" / "0001.jpg")   # moved over an indexed file
    os.utime(folder / "ship" / "0001.jpg", (2e9, 2e9))
    second = _build(folder, out, tiny, tmp_path)
    assert (second["added"], second["updated"], second["moved"], second["touched"], second["removed"]) == (1, 1, 2, 1, 2)
    assert second["embedded"] == 2 and second["unchanged"] == 494 and second["scanned"] == 499
    after = {r.path: r.id for r in ImageIndex.open(out).records()}
    assert after["dog/renamed.jpg"] == ids_before["dog/0000.jpg"]  # moved, not re-embedded
    assert after["ship/0001.jpg"] == ids_before["ship/0000.jpg"]
    assert after["frog/0000.jpg"] == ids_before["frog/0000.jpg"]
    _same_index(_contents(out), _contents(_build_clean(folder, tiny, tmp_path)))
    third = _build(folder, out, tiny, tmp_path)
    assert third["embedded"] == 0 and third["unchanged"] == third["scanned"] == 499
    # Same size, same mtime, other pixels: only --rehash notices.
    bmp = folder / "new.bmp"
    st = bmp.stat()
    data = bytearray(bmp.read_bytes())
    data[-100:-40] = bytes(255 - b for b in data[-100:-40])
    bmp.write_bytes(bytes(data))
    os.utime(bmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _build(folder, out, tiny, tmp_path)["embedded"] == 0
    fourth = _build(folder, out, tiny, tmp_path, "--rehash")
    assert (fourth["updated"], fourth["embedded"], fourth["unchanged"]) == (1, 1, 498)
    _same_index(_contents(out), _contents(_build_clean(folder, tiny, tmp_path)))


def test_refuses_another_model(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs")
    out = tmp_path / "idx"
    _build(folder, out, tiny, tmp_path)
    other = write_tiny_model_dir(tmp_path / "other", dim=16, name="other")
    capsys.readouterr()
    assert main(["build", str(folder), "--model", str(other), "--out", str(out), "--no-progress"]) == 2
    assert "was built with model 'tiny' v1 (dim 32)" in capsys.readouterr().err
    assert main(["query", str(folder / "cat" / "0001.jpg"), "--index", str(out), "--model", str(other)]) == 2


def _committed_rows(out: Path) -> dict[str, int]:
    db = out / "index.sqlite"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return dict(conn.execute("SELECT path, id FROM items").fetchall())
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()


def _generation(out: Path) -> int:
    db = out / "index.sqlite"
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0]) if row else 0
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def test_kill_9_and_resume_equals_clean_build(tiny: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs", n_train=300)
    shutil.copy(DATA / "messy" / "truncated_jpeg.jpg", folder / "bad.jpg")
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "simsearch.cli", "index", "build", str(folder), "--model", str(tiny),
           "--out", str(out), "--no-progress", "--batch-size", "8", "--commit-every", "16", "--decode-workers", "1"]
    rng = random.Random(os.getpid())
    kills = 0
    for attempt in range(4):
        before = _committed_rows(out)
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start_gen = _generation(out)
        # Kill after a random number of further commits; the first time at a random early moment.
        target = rng.randint(1, 8)
        early = time.monotonic() + rng.uniform(0.2, 1.5) if attempt == 0 else None
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            if _generation(out) - start_gen >= target or (early is not None and time.monotonic() > early):
                time.sleep(rng.uniform(0, 0.05))
                break
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        after = _committed_rows(out)
        # Committed work survives a kill and is never redone: every earlier row keeps its id.
        assert all(after.get(p) == i for p, i in before.items())
    assert kills >= 3
    rows_before = _committed_rows(out)
    assert 0 < len(rows_before) < 800
    summary = tmp_path / "final.json"
    subprocess.run([*cmd, "--summary", str(summary)], cwd=REPO, check=True, stderr=subprocess.DEVNULL)
    final = json.loads(summary.read_text())
    assert final["embedded"] == 800 - len(rows_before)  # only what had not been committed
    assert [f["path"] for f in final["failed"]] == ["bad.jpg"]
    assert all(_committed_rows(out)[p] == i for p, i in rows_before.items())
    clean = tmp_path / "clean"
    _build(folder, clean, tiny, tmp_path)
    _same_index(_contents(out), _contents(clean))


def test_ctrl_c_stops_a_build_in_one_line_and_a_rerun_continues(tiny: Path, tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) in the middle of a build: exit status 130 and one line on stderr saying the
    committed work is kept, no traceback; the next run adds only the rest."""
    folder = _folder(tmp_path / "imgs", n_train=300)
    out = tmp_path / "idx"
    cmd = [sys.executable, "-m", "simsearch.cli", "index", "build", str(folder), "--model", str(tiny),
           "--out", str(out), "--no-progress", "--batch-size", "1", "--commit-every", "1", "--decode-workers", "1"]
    # a default SIGINT handler in the child, whatever this process inherited
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline and not _committed_rows(out):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "index build: interrupted; what it committed is kept" in err, err
    kept = _committed_rows(out)
    assert 0 < len(kept) < 800
    summary = tmp_path / "rest.json"
    subprocess.run([*cmd, "--summary", str(summary)], cwd=REPO, check=True, stderr=subprocess.DEVNULL)
    assert json.loads(summary.read_text())["embedded"] == 800 - len(kept)


def test_a_second_build_of_one_index_stops_at_once_while_the_first_runs(tiny: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Two builds of one folder into one index would both add the files the index lacks: while one
    process holds the build lock (here a stand-in that holds it and waits), a build is one line and
    exit 2, and the index is left as it was; once the lock is free, the build runs. The lock file
    may be there before the index is (it is taken first)."""
    folder = _folder(tmp_path / "imgs", n_train=20)
    out = tmp_path / "idx"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom index.build_lock import exclusive_build\n"
         f"with exclusive_build({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["build", str(folder), "--model", str(tiny), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"simsearch index build: error: another `index build` is writing {out} (pid {holder.pid}): "
                       "wait for it to finish, or stop it; what it commits is kept"]
        assert not (out / "index.sqlite").exists()
    finally:
        holder.communicate("", timeout=30)
    assert main(["build", str(folder), "--model", str(tiny), "--out", str(out), "--no-progress"]) == 0
    assert len(_committed_rows(out)) == len(list(folder.rglob("*.jpg")))


def test_an_index_inside_its_folder_is_not_part_of_the_folder(tiny: Path, tmp_path: Path) -> None:
    """`--out` below the folder: the index's own files (its uploads/, the server's copies of the
    images it was sent) are never scanned as the folder's images."""
    folder = _folder(tmp_path / "imgs")
    n = len(list(folder.rglob("*.jpg")))
    out = folder / "search-index"
    assert _build(folder, out, tiny, tmp_path)["added"] == n
    (out / "uploads").mkdir(exist_ok=True)
    shutil.copy(DATA / "messy" / "flower.jpg", out / "uploads" / "0123abcd.jpg")  # as the server stores one
    again = _build(folder, out, tiny, tmp_path)
    assert again["scanned"] == n and again["added"] == 0 and again["skipped_duplicates"] == []


def test_an_out_that_is_a_file_is_one_line(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs")
    (tmp_path / "notes.txt").write_text("not an index")
    assert main(["build", str(folder), "--model", str(tiny), "--out", str(tmp_path / "notes.txt"), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"simsearch index build: error: {tmp_path / 'notes.txt'} is a file, not an index directory"]
    assert (tmp_path / "notes.txt").read_text() == "not an index"


def test_decode_workers_flag_fixes_the_threads(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _folder(tmp_path / "imgs")
    fixed = _build(folder, tmp_path / "fixed", tiny, tmp_path, "--decode-workers", "1")
    assert fixed["decode_threads"] == 1 and fixed["embedded"] > 0
    summary = tmp_path / "adaptive.json"  # without the flag: threads adapt, from one per core but one
    assert main(["build", str(folder), "--model", str(tiny), "--out", str(tmp_path / "adaptive"), "--no-progress",
                 "--summary", str(summary)]) == 0
    adaptive = json.loads(summary.read_text())
    assert default_decode_workers() <= adaptive["decode_threads"] <= default_max_decode_workers()
    assert adaptive["embedded"] == fixed["embedded"]
    capsys.readouterr()
    assert main(["build", str(folder), "--model", str(tiny), "--out", str(tmp_path / "none"), "--no-progress",
                 "--decode-workers", "0"]) == 2
    assert "--decode-workers must be at least 1" in capsys.readouterr().err


def test_a_copy_of_an_indexed_file_is_skipped_on_a_later_run(tiny: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs")
    out = tmp_path / "idx"
    assert _build(folder, out, tiny, tmp_path)["added"] == 500
    shutil.copy(folder / "horse" / "0003.jpg", folder / "zz-copy.jpg")  # content the index holds already
    shutil.copy(DATA / "messy" / "flower.jpg", folder / "zz-new.jpg")
    second = _build(folder, out, tiny, tmp_path)
    assert second["skipped_duplicates"] == [{"path": "zz-copy.jpg", "duplicate_of": "horse/0003.jpg"}]
    assert (second["added"], second["embedded"], second["count"]) == (1, 1, 501)
    assert ImageIndex.open(out).get_by_path("horse/0003.jpg") is not None
    assert ImageIndex.open(out).get_by_path("zz-copy.jpg") is None
