"""index.store.ImageIndex: exact search vs brute force, ids, persistence, crash recovery, IVF, threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from index.schema import IndexDirError
from index.store import ImageIndex, ItemRecord

DIM = 16


def _unit(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _records(n: int, prefix: str = "img") -> list[dict]:
    return [{"path": f"{prefix}/{i}.jpg", "size": i, "sha256": f"{prefix}{i:08x}", "width": 32, "height": 32,
             "metadata": {"i": i}} for i in range(n)]


def _brute(base: np.ndarray, base_ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ base.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), base_ids[order]


def test_flat_search_equals_brute_force(tmp_path: Path) -> None:
    vecs = _unit(500, 0)
    with ImageIndex.create(tmp_path / "ix", DIM, model_name="m", model_version=3) as ix:
        ids = np.asarray(ix.add(vecs, _records(500)))
        removed = ix.remove(ids[::7].tolist() + [10**9])
        assert removed == len(ids[::7])
        keep = np.ones(500, bool)
        keep[::7] = False
        queries = _unit(20, 1)
        hits = ix.search(queries, 10)
        assert [[h.id for h in r] for r in ix.search(queries, 10, params={"nprobe": 1})] == [[h.id for h in r] for r in hits]
        with pytest.raises(ValueError, match="valid"):
            ix.search(queries, 10, params={"ef": 3})
        exp_scores, exp_ids = _brute(vecs[keep], ids[keep], queries, 10)
        assert [[h.id for h in row] for row in hits] == exp_ids.tolist()
        assert np.allclose([[h.score for h in row] for row in hits], exp_scores, atol=1e-5)
        # Each stored vector finds itself first.
        self_hits = ix.search(vecs[keep][:50], 1)
        assert [row[0].id for row in self_hits] == ids[keep][:50].tolist()
        assert ix.stats()["index_kind"] == "flat"


def test_records_ids_and_reopen(tmp_path: Path) -> None:
    d = tmp_path / "ix"
    vecs = _unit(30, 2)
    ix = ImageIndex.create(d, DIM, model_name="m", root="/photos")
    ids = ix.add(vecs, _records(30))
    assert ids == sorted(set(ids)) and len(ix) == 30
    rec = ix.get(ids[3])
    assert isinstance(rec, ItemRecord) and rec.path == "img/3.jpg" and rec.metadata == {"i": 3}
    assert ix.get_by_path("img/4.jpg").id == ids[4]
    assert [r.id for r in ix.find_by_sha256("img00000005")] == [ids[5]]
    assert ix.find_by_sha256("nope") == [] and ix.get(10**9) is None
    assert np.array_equal(ix.vector(ids[6]), vecs[6])
    assert ix.update(ids[7], path="moved/7.jpg", mtime=5.0)
    with pytest.raises(ValueError, match="updatable"):
        ix.update(ids[7], sha256="x")
    ix.remove([ids[-1]])
    ix.close()
    ix = ImageIndex.open(d)
    assert ix.ids() == ids[:-1]
    assert ix.get(ids[7]).path == "moved/7.jpg"
    new = ix.add(_unit(1, 3), _records(1, "new"))
    assert new[0] > ids[-1]  # a removed id is never handed out again
    assert ix.stats()["root"] == "/photos"
    ix.close()
    with pytest.raises(FileExistsError):
        ImageIndex.create(d, DIM)
    with pytest.raises(IndexDirError, match="16-dimensional"):
        ImageIndex.open_or_create(d, 8)
    with pytest.raises(FileNotFoundError):
        ImageIndex.open(tmp_path / "missing")
    with pytest.raises(ValueError, match="expected vectors"):
        ImageIndex.open(d).add(_unit(2, 0, dim=8), _records(2))


def test_uncommitted_changes_vanish_after_kill(tmp_path: Path) -> None:
    d = tmp_path / "ix"
    ImageIndex.create(d, DIM).close()
    script = textwrap.dedent(f"""
        import os, numpy as np
        from index.store import ImageIndex
        ix = ImageIndex.open({str(d)!r})
        v = np.eye({DIM}, dtype=np.float32)
        ix.add(v[:5], [{{"path": f"a{{i}}"}} for i in range(5)])
        ix.commit()
        ix.add(v[5:9], [{{"path": f"b{{i}}"}} for i in range(4)])
        ix.remove(ix.ids()[:2])
        os._exit(0)  # no commit, no close: like kill -9
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).parents[1])
    ix = ImageIndex.open(d)
    assert sorted(r.path for r in ix.records()) == [f"a{i}" for i in range(5)]
    assert len(ix) == 5 and ix.stats()["generation"] == 1
    ix.close()


def test_missing_or_damaged_base_files_are_rebuilt(tmp_path: Path) -> None:
    d = tmp_path / "ix"
    vecs = _unit(40, 4)
    ix = ImageIndex.create(d, DIM)
    ids = ix.add(vecs[:20], _records(20))
    ix.compact()  # a base snapshot of 20 ...
    ids += ix.add(vecs[20:], _records(20, "b"))
    ix.remove(ids[:2])  # ... minus 2, plus a delta of 20
    ix.commit()
    ix.close()
    (base,) = d.glob("base.*.faiss")
    base.write_bytes(b"damaged")
    (d / ".base.9.faiss.junk.tmp").write_bytes(b"half a file")  # a crashed writer's temporary file
    (d / "vectors.3.faiss").write_bytes(b"a format-1 cache file")
    ix = ImageIndex.open(d)
    assert len(ix) == 38 and ix.ids() == ids[2:]
    assert [row[0].id for row in ix.search(vecs[2:], 1)] == ids[2:]
    names = sorted(p.name for p in d.iterdir() if "base" in p.name or "vectors" in p.name)
    assert names == [base.name, base.name.replace(".faiss", ".ids.npy")]
    ix.close()


def test_ivf_flat_is_approximate_with_per_call_params(tmp_path: Path) -> None:
    vecs = _unit(3000, 5)
    ix = ImageIndex.create(tmp_path / "ix", DIM, index_mode="ivf")
    ids = np.asarray(ix.add(vecs, _records(3000)))
    ix.compact()
    st = ix.stats()
    assert st["index_kind"] == "ivf" and st["nlist"] > 1 and 1 <= st["nprobe"] <= st["nlist"]
    assert st["recall_estimate"]["recall_at_10"] >= st["recall_target"] == 0.95
    queries = _unit(30, 6)
    exact_scores, exact_ids = _brute(vecs, ids, queries, 10)
    full = ix.search(queries, 10, params={"nprobe": st["nlist"]})  # every list: exact again
    assert [[h.id for h in row] for row in full] == exact_ids.tolist()
    one = ix.search(queries, 10, params={"nprobe": 1})
    recall_one = np.mean([len({h.id for h in r} & set(e)) / 10 for r, e in zip(one, exact_ids, strict=True)])
    assert recall_one < 1.0  # one list of many really is approximate
    assert ix.stats()["nprobe"] == st["nprobe"]  # per-call params never change the shared index
    with pytest.raises(ValueError, match="valid: \\['k_factor', 'nprobe', 'rerank'\\]"):
        ix.search(queries, 10, params={"efSearch": 3})
    ix.close()
    ix = ImageIndex.open(tmp_path / "ix")
    again = ix.search(queries, 10, params={"nprobe": st["nlist"]})
    assert [[h.id for h in row] for row in again] == exact_ids.tolist()
    gone = set(exact_ids[:, 0].tolist())
    assert ix.remove(gone) == len(gone)
    ix.commit()
    keep = ~np.isin(ids, list(gone))
    _, exact_after = _brute(vecs[keep], ids[keep], queries, 10)
    after = ix.search(queries, 10, params={"nprobe": st["nlist"]})
    assert [[h.id for h in row] for row in after] == exact_after.tolist()
    ix.close()
    with ImageIndex.open(tmp_path / "ix") as ix:
        assert len(ix) == 3000 - len(gone) and ix.stats()["index_kind"] == "ivf"


def test_concurrent_searches_and_writes(tmp_path: Path) -> None:
    ix = ImageIndex.create(tmp_path / "ix", DIM)
    ix.add(_unit(200, 7), _records(200))
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        q = _unit(5, 8)
        try:
            while not stop.is_set():
                for row in ix.search(q, 5):
                    assert len(row) == 5 and all(h.record.id == h.id for h in row)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(20):
        new = ix.add(_unit(10, 100 + i), _records(10, f"w{i}"))
        ix.remove(new[:3])
        if i % 5 == 0:
            ix.commit()
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert len(ix) == 200 + 20 * 7 == len(ix.ids())
    ix.close()
    assert os.path.exists(tmp_path / "ix" / "index.sqlite")


def test_two_writers_on_one_directory(tmp_path: Path) -> None:
    d = tmp_path / "ix"
    ImageIndex.create(d, DIM).close()
    a, b = ImageIndex.open(d), ImageIndex.open(d)
    va, vb = _unit(30, 10), _unit(20, 11)
    ids_a = a.add(va, _records(30, "a"))
    a.commit()
    ids_b = b.add(vb, _records(20, "b"))  # b catches up with a's commit before writing
    b.commit()
    assert len(b) == 50 and ids_b[0] > ids_a[-1]
    assert len(a) == 30 and a.refresh() and len(a) == 50
    hits = a.search(np.concatenate([va, vb]), 1)
    assert [h[0].id for h in hits] == ids_a + ids_b
    a.close()
    b.close()
    with ImageIndex.open(d) as c:
        assert c.ids() == ids_a + ids_b and len(c) == 50


def test_rollback(tmp_path: Path) -> None:
    with ImageIndex.create(tmp_path / "ix", DIM) as ix:
        kept = ix.add(_unit(5, 20), _records(5))
        ix.commit()
        ix.add(_unit(3, 21), _records(3, "x"))
        ix.remove(kept[:2])
        ix.rollback()
        assert ix.ids() == kept and len(ix) == 5
        assert [h[0].id for h in ix.search(_unit(5, 20), 1)] == kept
