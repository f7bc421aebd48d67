"""PCA whitening learned from the collection (index/whitening.py) and the index option built on it:
the index answers what numpy answers with the fitted transform, before and after save + reopen."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from index import whitening
from index.schema import DB_FILE, read_meta
from index.store import ImageIndex
from index.whitening import WhiteningSpec, apply_whitening, fit_whitening, numpy_matrix

DIM = 16


def _anisotropic(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    """l2-normalised vectors whose variance falls off 50x across the axes, off the origin."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32) * np.geomspace(5, 0.1, dim).astype(np.float32) + 2.0
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_whitening(x: np.ndarray, power: float, shrinkage: float) -> np.ndarray:
    """The whitening written out: centre, rotate onto the eigenvectors, scale, l2-normalise."""
    mu = x.mean(0)
    cov = (x - mu).T @ (x - mu)
    lam, vecs = np.linalg.eigh(cov.astype(np.float64))
    y = (x - mu) @ vecs * (lam + shrinkage * lam.mean()) ** power
    return y / np.linalg.norm(y, axis=1, keepdims=True)


@pytest.mark.parametrize("spec", [WhiteningSpec(), WhiteningSpec(shrinkage=0.1), WhiteningSpec(eigen_power=-0.25)])
def test_fit_equals_the_whitening_written_in_numpy(spec: WhiteningSpec) -> None:
    x = _anisotropic(2000)
    got = apply_whitening(fit_whitening(x, spec), x)
    want = _numpy_whitening(x.astype(np.float64), spec.eigen_power, spec.shrinkage)
    # eigenvectors are defined up to sign: compare what search sees, the cosines between items
    np.testing.assert_allclose(got[:300] @ got[:300].T, want[:300] @ want[:300].T, atol=2e-4)
    if spec == WhiteningSpec():
        y = fit_whitening(x, spec).apply(x)
        np.testing.assert_allclose(np.cov(y.T) / np.cov(y.T).diagonal().mean(), np.eye(DIM), atol=1e-3)


def test_shrinkage_keeps_a_dead_dimension_from_swamping_the_rest() -> None:
    x = _anisotropic(1000)
    dead = np.concatenate([x, np.zeros((len(x), 1), np.float32)], axis=1)  # a ReLU unit that never fires
    dead[:, -1] += np.random.default_rng(1).standard_normal(len(x)).astype(np.float32) * 1e-7  # rounding noise
    ref = apply_whitening(fit_whitening(x, WhiteningSpec(shrinkage=0.1)), x)
    shrunk = apply_whitening(fit_whitening(dead, WhiteningSpec(shrinkage=0.1)), dead)
    full = apply_whitening(fit_whitening(dead, WhiteningSpec()), dead)
    # (the dead axis only lowers the mean eigenvalue, hence the shrinkage, by 1/17)
    np.testing.assert_allclose(shrunk[:200] @ shrunk[:200].T, ref[:200] @ ref[:200].T, atol=0.02)
    # without shrinkage the noise axis gets unit variance like the real ones: cosines change a lot
    assert np.abs(full[:200] @ full[:200].T - ref[:200] @ ref[:200].T).max() > 0.5


def test_errors_name_the_limits() -> None:
    with pytest.raises(ValueError, match="at least 32 vectors, got 10"):
        fit_whitening(_anisotropic(10))
    with pytest.raises(ValueError, match="eigen_power"):
        WhiteningSpec(eigen_power=0.5)
    with pytest.raises(ValueError, match=r"\('auto', 'on', 'off'\)"):
        whitening.check_mode("yes")


def test_when_an_index_whitens_and_refits() -> None:
    assert not whitening.wanted("off", 10**6, DIM)
    assert whitening.wanted("on", 2 * DIM, DIM) and not whitening.wanted("on", 2 * DIM - 1, DIM)
    assert not whitening.wanted("auto", 4 * DIM - 1, DIM) and whitening.wanted("auto", 4 * DIM, DIM)
    assert whitening.auto_min_items(256) == 1024
    meta = {"whiten": "on", "dim": DIM, "whitening_fitted_on": 1000}
    assert whitening.refit_reason(meta, 1999) is None and whitening.refit_reason(meta, 501) is None
    assert "now 2000" in whitening.refit_reason(meta, 2000) and "now 500" in whitening.refit_reason(meta, 500)
    assert whitening.refit_reason({**meta, "whiten": "off"}, 1000) == "whitening off"
    assert whitening.refit_reason({**meta, "whitening_fitted_on": 0}, 1000) == "whitening on"


def _fitted(directory: Path) -> whitening.Whitening:
    conn = sqlite3.connect(directory / DB_FILE)
    try:
        found = whitening.load(conn, read_meta(conn))
    finally:
        conn.close()
    assert found is not None
    return found


def _numpy_search(fitted: whitening.Whitening, gallery: np.ndarray, ids: np.ndarray, queries: np.ndarray,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = numpy_matrix(fitted.transform)

    def space(v: np.ndarray) -> np.ndarray:
        y = v.astype(np.float64) @ a.T.astype(np.float64) + b
        return y / np.linalg.norm(y, axis=1, keepdims=True)

    scores = space(queries) @ space(gallery).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), ids[order]


def _search(index: ImageIndex, queries: np.ndarray, k: int, **params: object) -> tuple[np.ndarray, np.ndarray]:
    hits = index.search(queries, k, params=params or None)
    return np.array([[h.score for h in row] for row in hits]), np.array([[h.id for h in row] for row in hits])


@pytest.mark.parametrize("mode", ["flat", "ivf"])
def test_index_with_whitening_answers_like_numpy_and_the_same_after_reopening(tmp_path: Path, mode: str) -> None:
    n = 600 if mode == "flat" else 3000
    gallery, queries = _anisotropic(n, seed=2), _anisotropic(20, seed=3)
    with ImageIndex.create(tmp_path / "idx", DIM, whiten="on", index_mode=mode) as index:
        ids = np.asarray(index.add(gallery[: n - 50], [{"path": f"{i}.jpg"} for i in range(n - 50)]))
        index.compact()  # fits the whitening and builds the base in its space
        # added after the fit: the delta is searched in the same space
        ids = np.concatenate([ids, index.add(gallery[n - 50 :], [{"path": f"d{i}.jpg"} for i in range(50)])])
        index.commit()
        stats = index.stats()
        assert stats["whitening"]["active"] and stats["whitening"]["fitted_on"] == n - 50
        exact = {"nprobe": int(stats["nlist"])} if mode == "ivf" else {}
        got_scores, got_ids = _search(index, queries, 10, **exact)
    fitted = _fitted(tmp_path / "idx")
    want_scores, want_ids = _numpy_search(fitted, gallery, ids, queries, 10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    # whitening changes the answer: the raw cosine ranks differently
    raw_ids = ids[np.argsort(-(queries @ gallery.T), axis=1, kind="stable")[:, :10]]
    assert (raw_ids != want_ids).any()
    with ImageIndex.open(tmp_path / "idx") as again:
        scores2, ids2 = _search(again, queries, 10, **exact)
    np.testing.assert_array_equal(ids2, got_ids)
    np.testing.assert_array_equal(scores2, got_scores)


def test_auto_leaves_small_collections_alone_and_refits_as_they_grow(tmp_path: Path) -> None:
    small = _anisotropic(whitening.auto_min_items(DIM) - 1, seed=4)
    queries = _anisotropic(5, seed=5)
    with ImageIndex.create(tmp_path / "idx", DIM, whiten=whitening.DEFAULT_MODE) as index:
        assert index.stats()["whitening"]["mode"] == "auto"
        ids = np.asarray(index.add(small, [{"path": f"{i}.jpg"} for i in range(len(small))]))
        index.compact()
        assert not index.stats()["whitening"]["active"]
        scores, got = _search(index, queries, 5)
        want = ids[np.argsort(-(queries @ small.T), axis=1, kind="stable")[:, :5]]
        np.testing.assert_array_equal(got, want)  # plain cosine
        more = _anisotropic(whitening.auto_min_items(DIM) + 1, seed=6)
        index.add(more, [{"path": f"m{i}.jpg"} for i in range(len(more))])
        index.commit()
        assert index.stats()["compaction_due"] == "whitening on"
        index.compact()
        first = index.stats()["whitening"]
        assert first["active"] and first["fitted_on"] == 2 * whitening.auto_min_items(DIM)
        index.configure(whiten="off")
        index.commit()
        index.compact()
        assert not index.stats()["whitening"]["active"] and index.stats()["compaction_due"] is None


def test_min_score_stays_a_raw_cosine_under_whitening(tmp_path: Path) -> None:
    gallery, query = _anisotropic(400, seed=7), _anisotropic(1, seed=8)
    with ImageIndex.create(tmp_path / "idx", DIM, whiten="on") as index:
        ids = np.asarray(index.add(gallery, [{"path": f"{i}.jpg"} for i in range(len(gallery))]))
        index.compact()
        everything = index.search(query, 50)[0]
        raw = {int(i): float(c) for i, c in zip(ids, gallery @ query[0], strict=True)}
        threshold = float(np.median([raw[h.id] for h in everything]))
        kept = index.search(query, 50, min_score=threshold)[0]
    assert [h.id for h in kept] == [h.id for h in everything if raw[h.id] >= threshold]
    assert 0 < len(kept) < 50
    # the scores themselves are whitened cosines, not the raw ones the threshold compares
    assert any(abs(h.score - raw[h.id]) > 0.01 for h in kept)


def test_index_build_whiten_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tinymodel import write_tiny_model_dir

    from index.cli import main

    model = write_tiny_model_dir(tmp_path / "tiny")  # 32-d vectors: whitening needs 64 of them
    folder = Path(__file__).parent / "data" / "cifar10-sample" / "test"
    out = tmp_path / "idx"
    build = ["build", str(folder), "--model", str(model), "--out", str(out), "--no-progress",
             "--summary", str(tmp_path / "summary.json")]
    assert main([*build, "--whiten", "on"]) == 0
    assert main(["stats", "--index", str(out)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["whitening"]["mode"] == "on" and stats["whitening"]["active"]
    assert stats["whitening"]["fitted_on"] == stats["count"] > 64
    query = sorted(folder.glob("cat/*.jpg"))[0]
    assert main(["query", str(query), "--index", str(out), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["results"]
    assert hits[0]["path"] == f"cat/{query.name}" and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert main([*build, "--whiten", "off"]) == 0  # a rebuild with nothing new: the index drops it
    assert main(["stats", "--index", str(out)]) == 0
    assert not json.loads(capsys.readouterr().out)["whitening"]["active"]
    with pytest.raises(SystemExit):
        main([*build, "--whiten", "maybe"])
