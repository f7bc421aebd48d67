"""Indexes that fit the scale and the memory (issue 12): IVF-PQ recall against exact search, adds
after training, the retrain trigger, memory-mapped bases, writes that leave the base alone,
readers that follow commits by their changes, filters through base and delta, budgets, crashes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest

from index import compaction
from index import vector_index as vi
from index.budget import parse_bytes
from index.faiss_file import base_paths
from index.layered import BaseSnapshot, LayeredIndex
from index.store import ImageIndex

DIM = 32
ROOT = Path(__file__).resolve().parents[1]


def _clustered(n: int, seed: int, centers: int = 200, spread: float = 0.35) -> np.ndarray:
    """Unit vectors around `centers` seeded directions (the same centres for every seed)."""
    c = np.random.default_rng(1234).standard_normal((centers, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    v = c[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _records(n: int, prefix: str = "img") -> list[dict]:
    return [{"path": f"{prefix}/{i}.jpg", "sha256": f"{prefix}{i:08x}"} for i in range(n)]


def _exact(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    return ids[np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :k]]


def _recall(hits: list, exact: np.ndarray) -> float:
    return float(np.mean([len({h.id for h in r} & set(e.tolist())) / exact.shape[1] for r, e in zip(hits, exact, strict=True)]))


def _stat(paths: list[Path]) -> list[tuple[int, int, int]]:
    return [(p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in paths]


def _build(directory: Path, vecs: np.ndarray, **kw: object) -> np.ndarray:
    with ImageIndex.create(directory, DIM, **kw) as ix:
        ids = np.asarray(ix.add(vecs, _records(len(vecs))))
        ix.compact()
    return ids


@pytest.fixture(scope="module")
def pq_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """20,000 clustered vectors in an IVF-PQ (fast-scan, re-ranked) base."""
    vecs = _clustered(20_000, 0)
    directory = tmp_path_factory.mktemp("pq") / "index"
    return directory, vecs, _build(directory, vecs, index_mode="ivfpq")


@pytest.fixture(scope="module")
def sq_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The same vectors in an auto index above its flat threshold: IVF-SQ8, re-ranked."""
    vecs = _clustered(20_000, 0)
    directory = tmp_path_factory.mktemp("sq") / "index"
    return directory, vecs, _build(directory, vecs, flat_max=5_000)


@pytest.fixture(scope="module")
def flat_index(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    vecs = _clustered(20_000, 0)
    directory = tmp_path_factory.mktemp("flat") / "index"
    return directory, vecs, _build(directory, vecs)


@pytest.mark.parametrize("mode", ["ivfpq", "auto"])
def test_recall_against_exact_search_is_above_the_recorded_target(mode: str, request: pytest.FixtureRequest) -> None:
    directory, vecs, ids = request.getfixturevalue("pq_index" if mode == "ivfpq" else "sq_index")
    with ImageIndex.open(directory) as ix:
        st = ix.stats()
        assert st["index_kind"] == {"ivfpq": "ivfpq", "auto": "ivfsq"}[mode] and st["rerank"]
        assert st["pq_m"] == (DIM // 2 if mode == "ivfpq" else 0)
        est = st["recall_estimate"]
        assert est["reached"] and est["recall_at_10"] >= st["recall_target"] == 0.95 and est["queries"] == 1000
        assert st["trained_on"] == 20_000 and 0 < st["training_size"] <= 20_000
        queries = _clustered(1000, 99)  # fresh points of the same distribution, none of them indexed
        exact = _exact(vecs, ids, queries)
        tuned = _recall(ix.search(queries, 10), exact)
        assert tuned >= st["recall_target"], (tuned, st["nprobe"], st["k_factor"])
        # the recorded parameters are what makes it: one list and no re-ranking fall well short
        worse = _recall(ix.search(queries, 10, params={"nprobe": 1, "rerank": False}), exact)
        assert worse < tuned - 0.1
        # scores are exact cosines after re-ranking
        hits = ix.search(queries[:5], 3)
        for q, row in zip(queries[:5], hits, strict=True):
            assert np.allclose([h.score for h in row], [float(vecs[h.id - 1] @ q) for h in row], atol=1e-5)


def test_vectors_added_after_training_are_found_without_retraining(tmp_path: Path) -> None:
    vecs = _clustered(6_000, 1)
    ix = ImageIndex.create(tmp_path / "ix", DIM, flat_max=1_000)
    ids = ix.add(vecs[:4_000], _records(4_000))
    ix.compact()
    before = ix.stats()
    assert before["index_kind"] == "ivfsq" and before["trained_on"] == 4_000
    new = ix.add(vecs[4_000:], _records(2_000, "new"))
    ix.commit()
    ix.wait_compaction()
    assert ix.stats()["delta_count"] == 2_000  # under the threshold: no new base yet
    assert [row[0].id for row in ix.search(vecs[4_000:4_100], 1)] == new[:100]
    ix.compact()  # folds them into a base, with the same training
    after = ix.stats()
    assert after["delta_count"] == 0 and after["base"]["count"] == 6_000
    assert after["trained_on"] == 4_000 and after["base"]["build"]["trained"] is False
    assert after["base"]["build"]["merged"]  # the last base's codes kept, only the 2,000 new ones encoded
    assert [row[0].id for row in ix.search(vecs[::60], 1)] == (ids + new)[::60]
    ix.close()


def test_retrain_past_the_growth_factor_and_on_demand(tmp_path: Path) -> None:
    vecs = _clustered(8_500, 2)
    ix = ImageIndex.create(tmp_path / "ix", DIM, flat_max=1_000)
    ix.add(vecs[:2_000], _records(2_000))
    ix.compact()
    assert ix.stats()["trained_on"] == 2_000
    ix.add(vecs[2_000:7_900], _records(5_900, "b"))
    ix.commit()
    ix.wait_compaction()  # 7,900 < 4 x 2,000: the delta threshold compacts, with the old training
    assert ix.stats()["trained_on"] == 2_000
    ix.add(vecs[7_900:], _records(600, "c"))
    with ix._rw.read():
        assert "grown 4x" in compaction.due(ix.meta, ix._index)  # 8,500 > 4 x 2,000
    ix.commit()
    ix.wait_compaction()
    st = ix.stats()
    assert st["trained_on"] == 8_500 and st["base"]["build"]["trained"] and st["delta_count"] == 0
    trained_at = ix.meta["trained_at"]
    ix.compact(retrain=True)  # `index build --retrain`
    assert ix.meta["trained_at"] > trained_at and ix.stats()["base"]["build"]["trained"]
    ix.close()


@pytest.mark.parametrize("which", ["pq_index", "sq_index", "flat_index"])
def test_base_opens_memory_mapped_and_answers_as_when_read_into_memory(which: str, request: pytest.FixtureRequest) -> None:
    directory, vecs, _ = request.getfixturevalue(which)
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        from index.store import ImageIndex
        ix = ImageIndex.open({str(directory)!r})
        maps = open("/proc/self/maps").read()
        q = np.load(sys.argv[1])
        hits = ix.search(q, 10)
        print(json.dumps({{"mapped": "base." in maps and ".faiss" in maps,
                          "hits": [[h.id for h in r] for r in hits]}}))
    """)
    queries = _clustered(50, 7)
    np.save(directory.parent / "q.npy", queries)
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", script, str(directory.parent / "q.npy")], check=True,
                                    capture_output=True, text=True, cwd=ROOT).stdout)
    assert out["mapped"]  # the base file is a mapping of the process, not a copy
    with ImageIndex.open(directory) as ix:
        meta = ix.meta
        paths = base_paths(directory, int(meta["base_generation"]))
        loaded = BaseSnapshot(ix._index.base.generation, ix._index.base.hwm, meta["index_kind"],
                              faiss.read_index(str(paths.faiss)), np.load(paths.ids),
                              np.load(paths.vectors) if paths.vectors.is_file() else None)
        in_ram = LayeredIndex(loaded, DIM)
        settings = vi.search_parameters(meta["index_kind"], None, {"nprobe": meta["nprobe"], "k_factor": meta["k_factor"]})
        scores, ids = in_ram.search(queries, 10, params=settings)
        mm_scores, mm_ids = ix._index.search(queries, 10, params=settings)
        _, top = in_ram.search(queries, 11, params=settings)  # ImageIndex.search fetches one more (ties)
    assert ids.tolist() == mm_ids.tolist() and np.array_equal(scores, mm_scores)
    assert out["hits"] == top[:, :10].tolist()


def test_writes_leave_the_base_files_alone_and_readers_apply_only_changes(tmp_path: Path) -> None:
    vecs = _clustered(12_000, 3)
    d = tmp_path / "ix"
    writer = ImageIndex.create(d, DIM, flat_max=2_000)
    ids = writer.add(vecs[:10_000], _records(10_000))
    writer.compact()
    files = sorted(p for p in d.iterdir() if p.name.startswith("base."))
    assert [p.name.split(".", 2)[2] for p in files] == ["faiss", "ids.npy", "vectors.npy"]
    before = _stat(files)
    reader = ImageIndex.open(d)
    base = reader._index.base
    for i in range(3):  # uploads through a server, say
        new = writer.add(vecs[10_000 + 10 * i : 10_010 + 10 * i], _records(10, f"u{i}"))
        writer.remove(ids[i * 5 : i * 5 + 5] + new[:1])
        writer.commit()
        assert reader.refresh()
        assert reader._index.base is base  # the same mapped base: only the changes were read
        assert len(reader) == len(writer) == 10_000 + 10 * (i + 1) - 6 * (i + 1)
        found = [row[0].id for row in reader.search(vecs[10_001 + 10 * i : 10_010 + 10 * i], 1)]
        assert found == new[1:]
        gone = {h.id for row in reader.search(vecs[: 5 * (i + 1)], 5) for h in row}
        assert not gone & set(ids[: 5 * (i + 1)])
    assert _stat(files) == before  # not rewritten, not replaced
    writer.compact()  # a new base (the old one's codes minus the removed rows, plus the delta)
    assert writer.stats()["base"]["build"]["merged"]
    assert reader.refresh() and reader._index.base is not base and reader._index.delta_count == 0
    removed = [ids[j] for i in range(3) for j in range(i * 5, i * 5 + 5)]
    assert len(reader._index.base) == len(writer) and not np.isin(removed, reader._index.base.ids).any()
    assert [row[0].id for row in reader.search(vecs[15:10_000:97], 1)] == ids[15:10_000:97]
    assert not any(p.exists() for p in files)
    assert sorted(reader.ids()) == sorted(writer.ids()) and len(reader) == 10_000 + 30 - 18
    reader.close()
    writer.close()


def test_filters_pass_through_base_and_delta(pq_index, tmp_path: Path) -> None:
    directory, vecs, ids = pq_index
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(directory, d)
    with ImageIndex.open(d) as ix:
        extra = _clustered(300, 5)
        new = np.asarray(ix.add(extra, _records(300, "x")))
        ix.commit()
        allowed = np.concatenate([ids[::400], new[::10]])  # 50 in the base, 30 in the delta
        everything = np.concatenate([vecs, extra])
        all_ids = np.concatenate([ids, new])
        queries = _clustered(20, 6)
        keep = np.isin(all_ids, allowed)
        exact = _exact(everything[keep], all_ids[keep], queries)
        nlist = ix.stats()["nlist"]
        hits = ix.search(queries, 10, allowed_ids=allowed, params={"nprobe": nlist, "k_factor": 16})
        assert [[h.id for h in r] for r in hits] == exact.tolist()  # every list, all 80 re-ranked: exact
        default = ix.search(queries, 10, allowed_ids=allowed)
        assert all(h.id in set(allowed.tolist()) for r in default for h in r)


def test_memory_budget_plans_and_parsing() -> None:
    n, dim = 1_000_000, 256
    assert vi.plan_index(40_000, dim, "auto") == vi.Plan("flat")
    roomy = vi.plan_index(n, dim, "auto", parse_bytes("4GB"))
    assert roomy == vi.Plan("ivfsq", 4000, 0, False, True)  # SQ8 codes + exact vectors fit: re-rank
    assert vi.plan_index(n, dim, "auto", parse_bytes("512MB")) == vi.Plan("ivfsq", 4000)  # codes only
    tight = vi.plan_index(n, dim, "auto", parse_bytes("200MB"))
    assert tight.kind == "ivfpq" and not tight.rerank and tight.pq_m == 128
    tighter = vi.plan_index(n, dim, "auto", parse_bytes("30MB"))
    assert tighter.pq_m == 32 and vi.ram_bytes(tighter, n, dim) <= 30 * 10**6
    assert vi.plan_index(n, dim, "ivfpq", parse_bytes("4GB")) == vi.Plan("ivfpq", 1000, 128, False, True)
    with pytest.raises(ValueError, match="memory budget is 1,000,000"):
        vi.plan_index(n, dim, "auto", 10**6)
    assert vi.plan_index(n, dim, "ivf").kind == "ivf"
    with pytest.raises(ValueError, match="auto"):
        vi.plan_index(n, dim, "hnsw")
    assert parse_bytes("4GiB") == parse_bytes("4G") == 4 * 2**30 and parse_bytes("1.5MB") == 1_500_000
    assert parse_bytes(None) == 0 and parse_bytes("123") == 123
    with pytest.raises(ValueError, match="units"):
        parse_bytes("4 parsecs")


def test_budget_recorded_and_too_small_keeps_the_last_base(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vecs = _clustered(3_000, 4)
    ix = ImageIndex.create(tmp_path / "ix", DIM, flat_max=1_000, memory_budget="200KB")
    ix.add(vecs, _records(3_000))
    ix.compact()
    st = ix.stats()  # 3,000 x (8 bytes of id + 32 of SQ8 codes) fit, the exact vectors do not
    assert st["memory"]["budget_recorded"] == 200_000 and st["index_kind"] == "ivfsq" and not st["rerank"]
    assert st["memory"]["index_ram_bytes"] <= 200_000
    ix.configure(memory_budget="1KB")
    with pytest.raises(ValueError, match="memory budget"):
        ix.compact()
    assert len(ix) == 3_000 and ix.stats()["base"]["count"] == 3_000  # still serving the last base
    ix.close()


def test_kill_during_compaction_leaves_the_last_base(tmp_path: Path) -> None:
    d = tmp_path / "ix"
    vecs = _clustered(3_000, 8)
    with ImageIndex.create(d, DIM) as ix:
        ids = ix.add(vecs[:2_500], _records(2_500))
        ix.compact()
        ids += ix.add(vecs[2_500:], _records(500, "b"))
    script = textwrap.dedent(f"""
        import os, sqlite3
        from pathlib import Path
        from index import compaction
        from index.schema import read_meta
        d = Path({str(d)!r})
        conn = sqlite3.connect(d / "index.sqlite", isolation_level=None)
        conn.execute("BEGIN")
        meta = read_meta(conn)
        compaction.build_base(d, conn, meta, int(meta["generation"]))
        os._exit(0)  # killed after writing the new base's files, before publishing them
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
    generation = int(ImageIndex.open(d).meta["generation"])
    unpublished = sorted(p.name for p in d.glob(f"base.{generation}.*"))
    assert unpublished == [f"base.{generation}.faiss", f"base.{generation}.ids.npy"]
    with ImageIndex.open(d) as ix:
        assert ix.stats()["base"]["generation"] == 1 and ix.ids() == ids
        assert [row[0].id for row in ix.search(vecs, 1)] == ids
        ix.compact()  # the next compaction writes and publishes it
        assert ix.stats()["base"]["generation"] == generation
    assert sorted(p.name for p in d.glob("base.*")) == unpublished
    assert os.path.exists(d / "index.sqlite")


def test_best_k_orders_as_merge_top_k() -> None:
    """The single-query fast path of the re-ranked base ranks exactly as the general merge: score
    descending, ties by id ascending, missing candidates (-1) last."""
    from index.layered import _NONE, best_k, merge_top_k

    rng = np.random.default_rng(5)
    for q in (1, 3):
        scores = rng.choice(np.array([0.5, 0.7, 0.9], dtype=np.float32), size=(q, 40))  # many ties
        ids = rng.permutation(1000)[: q * 40].reshape(q, 40).astype(np.int64)
        ids[:, -5:] = -1
        scores[:, -5:] = _NONE
        got, want = best_k(scores, ids, 10), merge_top_k([(scores, ids)], 10)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
        top = sorted(zip(-scores[0], ids[0], strict=True))[:10]
        assert got[1][0].tolist() == [i for _, i in top]


def test_direct_sq_codes_rank_by_cosine_survive_a_file_and_clip(tmp_path: Path) -> None:
    """ivfsq's DirectSQ: scores are cosines (to the codes' precision) whether or not they are re-ranked,
    the scale travels in the file (memory-mapped read), a component past the training range clips
    instead of wrapping around, and a file of the earlier per-dimension QT_8bit codes still opens."""
    from index.faiss_file import read_index, write_index

    rng = np.random.default_rng(11)
    vecs = _clustered(6_000, 12)
    ix = vi.train(vi.Plan("ivfsq", 60), vecs[:3_000])
    assert isinstance(ix, vi.DirectSQ) and ix.ivf.sq.qtype == faiss.ScalarQuantizer.QT_8bit_direct_signed
    assert ix.scale == pytest.approx(vi.SQ_DIRECT_LIMIT / np.abs(vecs[:3_000]).max())
    ix.add_with_ids(vecs, np.arange(6_000, dtype=np.int64))
    queries = vecs[rng.choice(6_000, 50, replace=False)] + 0.05 * rng.standard_normal((50, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    params = faiss.SearchParametersIVF(nprobe=60)  # every list: only the codes' precision is tested
    scores, ids = ix.search(queries, 10, params=params)
    exact = np.einsum("qd,qkd->qk", queries, vecs[ids])
    assert np.abs(scores - exact).max() < 0.03
    truth = np.argsort(-(queries @ vecs.T), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth, strict=True)]) > 0.9

    write_index(ix, tmp_path / "b.faiss")
    back = read_index(tmp_path / "b.faiss")  # memory-mapped
    assert isinstance(back, vi.DirectSQ) and back.scale == ix.scale and back.ntotal == 6_000
    again = back.search(queries, 10, params=params)
    assert np.array_equal(again[1], ids) and np.allclose(again[0], scores)

    loud = np.zeros((1, DIM), dtype=np.float32)
    loud[0, 0] = 1.0  # far past the training sample's largest component
    assert back.codes(loud)[0, 0] == vi.SQ_DIRECT_LIMIT
    writable = read_index(tmp_path / "b.faiss", mmap=False)
    writable.add_with_ids(loud, np.array([99_999]))
    hit = writable.search(loud, 1, params=params)
    assert hit[1][0, 0] == 99_999 and hit[0][0, 0] > 0  # a wrapped code would score it negative

    old = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(DIM), DIM, 60, faiss.ScalarQuantizer.QT_8bit,
                                        faiss.METRIC_INNER_PRODUCT)
    old.train(vecs[:3_000])
    old.add_with_ids(vecs, np.arange(6_000, dtype=np.int64))
    write_index(old, tmp_path / "old.faiss")
    reopened = read_index(tmp_path / "old.faiss")
    assert not isinstance(reopened, vi.DirectSQ)
    found = reopened.search(queries, 10, params=params)[1]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]) > 0.9
