"""Search options against a brute-force numpy oracle over the same vectors, flat and IVF:
offset pages (disjoint, ordered, together the top-n), filters applied inside the scan (k results
whenever k items pass), min_score, exclude; the filter language (metadata JSON types, path prefix
and glob) and the id sets behind it; `index query` with the options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from index.cli import main as index_main
from index.filters import FilterCache, ItemFilter, matching_ids, parse_where
from index.selectors import BITMAP_DENSITY, IdSet
from index.store import ImageIndex

DIM = 16
N = 3000
TOL = 1e-5  # FAISS and numpy sum in different orders


def _unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _record(i: int) -> dict:
    return {"path": f"c{i % 3}/{i:05d}.{'png' if i % 4 == 0 else 'jpg'}", "sha256": f"{i:064x}",
            "metadata": {"label": ["cat", "dog", "bird", "fish", "cow"][i % 5], "even": i % 2 == 0, "n": i % 7}}


@pytest.fixture(scope="module", params=["flat", "ivf"])
def indexed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """An index of N seeded vectors (a few exact copies among them: tied scores) with metadata and paths."""
    vecs = _unit(N, 0)
    vecs[N - 20 :] = vecs[:20]  # identical vectors: ties that pages must split the same way every time
    directory = tmp_path_factory.mktemp(request.param) / "index"
    with ImageIndex.create(directory, DIM, index_mode=request.param) as ix:
        ids = np.asarray(ix.add(vecs, [_record(i) for i in range(N)]))
        ix.compact()  # the base of the requested kind now (a commit compacts in the background)
        assert ix.stats()["index_kind"] == request.param
    return directory, vecs, ids


def _oracle(vecs: np.ndarray, ids: np.ndarray, query: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All (scores, ids) best first (ties by id), restricted to `mask`."""
    keep = np.ones(len(ids), bool) if mask is None else mask
    s, i = vecs[keep] @ query, ids[keep]
    order = np.lexsort((i, -s))
    return s[order], i[order]


def _assert_top(got_ids: list[int], got_scores: list[float], oracle: tuple[np.ndarray, np.ndarray], n: int) -> None:
    """`got` is the oracle's top-n, up to reorderings among scores within TOL of each other."""
    scores, ids = oracle
    assert len(got_ids) == min(n, len(ids)) and len(set(got_ids)) == len(got_ids)
    assert all(a >= b - 1e-7 for a, b in zip(got_scores, got_scores[1:], strict=False))  # ordered
    if not len(got_ids):
        return
    cutoff = scores[len(got_ids) - 1]
    truth = dict(zip(ids.tolist(), scores.tolist(), strict=True))
    assert set(ids[scores > cutoff + TOL].tolist()) <= set(got_ids)  # nothing clearly better is missing
    assert all(truth[i] >= cutoff - TOL for i in got_ids)  # nothing clearly worse got in
    np.testing.assert_allclose(got_scores, [truth[i] for i in got_ids], atol=TOL)


def test_pages_are_disjoint_ordered_and_together_the_top_n(indexed: tuple[Path, np.ndarray, np.ndarray]) -> None:
    directory, vecs, ids = indexed
    queries = np.concatenate([vecs[:3], _unit(3, 7)])  # 0..2 have exact copies: tied scores at the top
    with ImageIndex.open(directory) as ix:
        kind = ix.stats()["index_kind"]
        exact = {"nprobe": ix.stats()["nlist"]} if kind == "ivf" else None  # every list: IVF is exact
        for params in ([None, exact] if kind == "ivf" else [None]):
            one = ix.search(queries, 60, params=params)
            pages = [ix.search(queries, 15, offset=o, params=params) for o in range(0, 60, 15)]
            for q in range(len(queries)):
                ids_pages = [[h.id for h in p[q]] for p in pages]
                flat_ids = [i for p in ids_pages for i in p]
                assert len(flat_ids) == len(set(flat_ids)) == 60  # disjoint and full
                assert flat_ids == [h.id for h in one[q]]  # together: one search of k = 60, in its order
                scores = [h.score for p in pages for h in p[q]]
                assert scores == sorted(scores, reverse=True)
                if params is exact or kind == "flat":
                    _assert_top(flat_ids, scores, _oracle(vecs, ids, queries[q]), 60)
            # ties: an item and its exact copy score the same and come out in id order, on every page size
            tied = [h.id for h in one[0][:2]]
            assert tied == sorted([int(ids[0]), int(ids[N - 20])])
            assert [h.id for h in ix.search(queries[:1], 1, params=params)[0]] == tied[:1]
            assert [h.id for h in ix.search(queries[:1], 1, offset=1, params=params)[0]] == tied[1:]


@pytest.mark.parametrize("share", [0.5, 0.02, 0.004])
def test_a_filter_returns_k_whenever_k_items_pass(indexed: tuple[Path, np.ndarray, np.ndarray], share: float) -> None:
    """Inside the scan, not after it: a filter passing 12 of 3,000 items still fills a page of 10
    (search-then-filter would return about 0); on IVF even when they sit in lists a search would not probe."""
    directory, vecs, ids = indexed
    rng = np.random.default_rng(1)
    query = _unit(1, 3)[0]
    allowed = np.sort(rng.choice(ids, max(1, int(share * N)), replace=False))
    far = ids[np.argsort(vecs @ query)[:12]]  # the 12 least similar items: lists far from the query
    with ImageIndex.open(directory) as ix:
        for chosen in (allowed, np.sort(far)):
            mask = np.isin(ids, chosen)
            for k in (10, 40):
                hits = ix.search(query, k, allowed_ids=chosen)[0]
                assert len(hits) == min(k, len(chosen))
                assert {h.id for h in hits} <= set(chosen.tolist())
                if ix.stats()["index_kind"] == "flat" or len(chosen) <= k or chosen is far:
                    _assert_top([h.id for h in hits], [h.score for h in hits], _oracle(vecs, ids, query, mask), k)
            pages = [ix.search(query, 5, offset=o, allowed_ids=chosen)[0] for o in (0, 5)]
            assert [h.id for h in pages[0] + pages[1]] == [h.id for h in ix.search(query, 10, allowed_ids=chosen)[0]]
        assert ix.search(query, 10, allowed_ids=[]) == [[]]  # nothing passes: nothing, at once
        assert ix.search(query, 10, allowed_ids=[10**12]) == [[]]  # an id that is not indexed


def test_min_score_and_exclude(indexed: tuple[Path, np.ndarray, np.ndarray]) -> None:
    directory, vecs, ids = indexed
    with ImageIndex.open(directory) as ix:
        exact = {"nprobe": ix.stats()["nlist"]} if ix.stats()["index_kind"] == "ivf" else None
        query = vecs[5]
        scores, order = _oracle(vecs, ids, query)
        cut = float(scores[25])
        hits = ix.search(query, 60, min_score=cut, params=exact)[0]
        assert [h.id for h in hits] == order[: len(hits)].tolist() and all(h.score >= cut for h in hits)
        assert abs(len(hits) - 26) <= 1  # everything at or above the cut, by FAISS's arithmetic
        assert ix.search(query, 10, min_score=1.01)[0] == []
        # the item searched by comes first (score 1); excluded, the rest moves up
        me = int(ids[5])
        assert ix.search(query, 1, params=exact)[0][0].id == me
        rest = ix.search(query, 10, exclude_ids=[me], params=exact)[0]
        assert me not in {h.id for h in rest} and [h.id for h in rest] == [i for i in order.tolist() if i != me][:10]
        # exclude inside a filter
        chosen = ids[:40]
        got = ix.search(query, 10, allowed_ids=chosen, exclude_ids=[me])[0]
        assert len(got) == 10 and me not in {h.id for h in got} and {h.id for h in got} <= set(chosen.tolist())
        with pytest.raises(ValueError, match="offset"):
            ix.search(query, 10, offset=-1)


def test_filters_select_by_metadata_and_path(indexed: tuple[Path, np.ndarray, np.ndarray]) -> None:
    directory, vecs, ids = indexed
    records = [_record(i) for i in range(N)]

    def expect(pred) -> set[int]:  # noqa: ANN001
        return {int(i) for i, r in zip(ids, records, strict=True) if pred(r)}

    def got(**kw: object) -> set[int]:
        flt = ItemFilter.build(**kw)
        assert flt is not None
        found = matching_ids(directory, flt)
        mask = found.contains(ids)
        assert int(mask.sum()) == len(found)
        return {int(i) for i in ids[mask]}

    assert got(metadata={"label": "cat"}) == expect(lambda r: r["metadata"]["label"] == "cat")
    assert got(metadata={"label": "cat", "even": True}) == expect(lambda r: r["metadata"]["label"] == "cat"
                                                                   and r["metadata"]["even"])
    assert got(metadata={"n": 3}) == got(metadata={"n": 3.0}) == expect(lambda r: r["metadata"]["n"] == 3)
    assert got(metadata={"n": "3"}) == set()  # JSON types are respected: "3" is not 3
    assert got(metadata={"even": 1}) == set()  # and 1 is not true (Python says 1 == True; the cache must not)
    assert got(metadata={"missing": None}) == set()  # null matches a JSON null, not a missing key
    assert got(path_prefix="c1/") == expect(lambda r: r["path"].startswith("c1/"))
    assert got(path_glob="*.png") == expect(lambda r: r["path"].endswith(".png"))
    assert got(path_glob="c2/*", metadata={"label": "dog"}) == expect(
        lambda r: r["path"].startswith("c2/") and r["metadata"]["label"] == "dog")
    assert got(path_prefix="nope/") == set()
    assert ItemFilter.build() is None and ItemFilter.build(path_prefix="") is None
    for bad in ({"label": ["a"]}, {"label": {"a": 1}}, {'a"b': 1}, {"x": float("nan")}):
        with pytest.raises(ValueError):
            ItemFilter.build(metadata=bad)
    # a filtered search through the store equals the oracle over the passing items
    with ImageIndex.open(directory) as ix:
        flt = ItemFilter.build(metadata={"label": "bird"}, path_prefix="c0/")
        passing = matching_ids(directory, flt)
        mask = passing.contains(ids)
        exact = {"nprobe": ix.stats()["nlist"]} if ix.stats()["index_kind"] == "ivf" else None
        hits = ix.search(vecs[1], 20, allowed_ids=passing, params=exact)[0]
        _assert_top([h.id for h in hits], [h.score for h in hits], _oracle(vecs, ids, vecs[1], mask), 20)


def test_filter_answers_follow_commits(tmp_path: Path) -> None:
    cache = FilterCache()
    with ImageIndex.create(tmp_path / "ix", DIM) as ix:
        ix.add(_unit(10, 0), [_record(i) for i in range(10)])
        ix.commit()
        flt = ItemFilter.build(metadata={"label": "cat"})
        first = cache.matching_ids(tmp_path / "ix", flt)
        assert cache.matching_ids(tmp_path / "ix", flt) is first  # same commit: the cached answer
        ix.add(_unit(1, 1), [{"path": "new.jpg", "metadata": {"label": "cat"}}])
        assert len(cache.matching_ids(tmp_path / "ix", flt)) == len(first)  # not committed yet: not seen
        ix.commit()
        assert len(cache.matching_ids(tmp_path / "ix", flt)) == len(first) + 1


def test_id_sets_use_a_bitmap_when_dense_and_an_array_when_sparse() -> None:
    dense = np.arange(0, 1_000_000, 3, dtype=np.int64)
    s = IdSet.of(dense)
    assert s.bitmap is not None and s.nbytes() <= 1_000_000 // 8 + 1 and len(s) == len(dense)
    sparse = np.array([5, 10**9, 2 * 10**9], dtype=np.int64)
    t = IdSet.of(sparse)
    assert t.ids is not None and t.nbytes() == 24
    probe = np.array([0, 3, 4, 5, 999_999, 10**9, 2 * 10**9, -1, 3 * 10**9])
    assert s.contains(probe).tolist() == [True, True, False, False, True, False, False, False, False]
    assert t.contains(probe).tolist() == [False, False, False, True, False, True, True, False, False]
    # built from chunks (a SQL cursor): the same set, never the whole id array when it goes dense
    chunks = [dense[i : i + 10_000] for i in range(0, len(dense), 10_000)]
    u = IdSet.from_chunks(chunks)
    assert u.bitmap is not None and np.array_equal(u.contains(np.arange(1_000_000)), s.contains(np.arange(1_000_000)))
    sparse_chunks = IdSet.from_chunks([np.array([7]), np.array([7 * BITMAP_DENSITY * 10])])
    assert sparse_chunks.ids is not None and sparse_chunks.ids.tolist() == [7, 7 * BITMAP_DENSITY * 10]
    assert len(IdSet.from_chunks([])) == 0


def test_where_values_parse_as_json_scalars_else_text() -> None:
    assert parse_where(["label=cat", "year=2020", 'code="2020"', "ok=true", "x=null", "f=1.5", "s=a=b"]) == {
        "label": "cat", "year": 2020, "code": "2020", "ok": True, "x": None, "f": 1.5, "s": "a=b"}
    for bad in ("novalue", "=1", "l=[1]"):
        with pytest.raises(ValueError):
            parse_where([bad])


def test_index_query_takes_the_options(indexed: tuple[Path, np.ndarray, np.ndarray],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    directory, vecs, ids = indexed
    me = int(ids[2])

    def run(*args: str) -> dict:
        assert index_main(["query", "--index", str(directory), "--id", str(me), "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    with ImageIndex.open(directory) as ix:
        flt = ItemFilter.build(metadata={"label": "bird"}, path_prefix="c2/")
        want = ix.search(vecs[2], 5, offset=5, allowed_ids=matching_ids(directory, flt), exclude_ids=[me])[0]
    out = run("-k", "5", "--offset", "5", "--where", "label=bird", "--path-prefix", "c2/", "--exclude")
    assert [r["id"] for r in out["results"]] == [h.id for h in want] and len(want) == 5
    assert [r["rank"] for r in out["results"]] == [6, 7, 8, 9, 10]
    assert out["filter"] == {"metadata": {"label": "bird"}, "path_prefix": "c2/"}
    assert all(r["metadata"]["label"] == "bird" and r["path"].startswith("c2/") for r in out["results"])
    assert run("-k", "3")["results"][0]["id"] == me  # not excluded unless asked
    assert all(r["score"] >= 0.5 for r in run("-k", "50", "--min-score", "0.5")["results"])
    assert run("--path-glob", "*.gif")["results"] == []
    assert index_main(["query", "--index", str(directory), "--exclude", str(Path(__file__))]) == 2
    assert "needs --id" in capsys.readouterr().err
    assert index_main(["query", "--index", str(directory)]) == 2
    assert index_main(["query", "--index", str(directory), "--id", "999999999"]) == 2
