"""POST /v1/search options (offset pages, min_score, filter, exclude), JSON and multipart, against a
numpy oracle over the same vectors; max_k bounds offset + k; bad options are 422 in the API's shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serverkit import CIFAR_TEST
from tinymodel import write_tiny_model_dir

from embed.backends.onnxruntime import OnnxRuntimeBackend
from embed.embedder import Embedder
from index.store import ImageIndex
from server.app import create_app
from server.settings import Settings

N, DIM, MAX_K = 800, 32, 60


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    root = tmp_path_factory.mktemp("search-api")
    model = write_tiny_model_dir(root / "model", dim=DIM)
    vecs = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with ImageIndex.create(root / "index", DIM, model_name="tiny", model_version=1) as ix:
        ids = np.asarray(ix.add(vecs, [{"path": f"{['cats', 'dogs'][i % 2]}/{i}.jpg",
                                        "metadata": {"label": ["a", "b", "c"][i % 3], "i": i}} for i in range(N)]))
        ix.commit()
    return model, root / "index", vecs, ids


@pytest.fixture
def client(setup: tuple[Path, Path, np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for k in [k for k in __import__("os").environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    model, index, *_ = setup
    with TestClient(create_app(Settings(model_dir=model, index_dir=index, max_k=MAX_K, _env_file=None))) as c:
        yield c


def _oracle(vecs: np.ndarray, ids: np.ndarray, q: np.ndarray, mask: np.ndarray | None = None) -> list[int]:
    keep = np.ones(len(ids), bool) if mask is None else mask
    s, i = vecs[keep] @ q, ids[keep]
    return i[np.lexsort((i, -s))].tolist()


def _near(got: list[int], want: list[int], vecs: np.ndarray, ids: np.ndarray, q: np.ndarray) -> None:
    """Equal, or differing only where scores tie within float rounding."""
    if got == want:
        return
    score = dict(zip(ids.tolist(), (vecs @ q).tolist(), strict=True))
    assert len(got) == len(want)
    assert all(abs(score[a] - score[b]) < 1e-5 for a, b in zip(got, want, strict=True)), (got, want)


def test_json_pages_filters_min_score_and_exclude(client: TestClient, setup: tuple[Path, Path, np.ndarray, np.ndarray]) -> None:
    _, _, vecs, ids = setup
    q = vecs[7]
    pages, offset = [], 0
    while offset is not None and offset < 45:
        body = client.post("/v1/search", json={"vector": q.tolist(), "k": 15, "offset": offset}).json()
        assert body["offset"] == offset and body["k"] == 15
        pages.append([h["id"] for h in body["neighbours"]])
        offset = body["next_offset"]
    got = [i for p in pages for i in p]
    assert len(got) == len(set(got)) == 45 and offset == 45
    _near(got, _oracle(vecs, ids, q)[:45], vecs, ids, q)
    # the last page allowed by max_k has no next page
    last = client.post("/v1/search", json={"vector": q.tolist(), "k": 15, "offset": MAX_K - 15}).json()
    assert len(last["neighbours"]) == 15 and last["next_offset"] is None

    # by id, excluded: the item itself is gone, the rest moves up
    me = int(ids[7])
    plain = client.post("/v1/search", json={"id": me, "k": 5}).json()["neighbours"]
    assert plain[0]["id"] == me
    excl = client.post("/v1/search", json={"id": me, "k": 5, "exclude": True}).json()["neighbours"]
    assert [h["id"] for h in excl] == [h["id"] for h in client.post(
        "/v1/search", json={"id": me, "k": 6}).json()["neighbours"]][1:]

    # a filter: metadata AND path prefix, inside the search: a full page although 1 in 6 passes
    flt = {"metadata": {"label": "b"}, "path_prefix": "dogs/"}
    mask = np.array([(i % 3 == 1) and (i % 2 == 1) for i in range(N)])
    body = client.post("/v1/search", json={"vector": q.tolist(), "k": 20, "filter": flt}).json()
    assert len(body["neighbours"]) == 20
    assert all(h["metadata"]["label"] == "b" and h["path"].startswith("dogs/") for h in body["neighbours"])
    _near([h["id"] for h in body["neighbours"]], _oracle(vecs, ids, q, mask)[:20], vecs, ids, q)
    glob = client.post("/v1/search", json={"vector": q.tolist(), "k": 5, "filter": {"path_glob": "cats/1*.jpg"}})
    assert glob.status_code == 200 and all(h["path"].startswith("cats/1") for h in glob.json()["neighbours"])
    none = client.post("/v1/search", json={"vector": q.tolist(), "k": 5, "filter": {"metadata": {"label": "z"}}})
    assert none.status_code == 200 and none.json()["neighbours"] == [] and none.json()["next_offset"] is None

    # min_score
    body = client.post("/v1/search", json={"vector": q.tolist(), "k": 50, "min_score": 0.3}).json()
    scores = [h["score"] for h in body["neighbours"]]
    assert scores and min(scores) >= 0.3 and len(scores) == int(((vecs @ q) >= 0.3).sum()) < 50


def test_multipart_takes_the_same_options(client: TestClient, setup: tuple[Path, Path, np.ndarray, np.ndarray]) -> None:
    model, _, vecs, ids = setup
    image = CIFAR_TEST[0]
    backend = OnnxRuntimeBackend(model)
    try:
        (q,) = Embedder(backend).embed_sources([image.read_bytes()])
    finally:
        backend.close()
    flt = {"metadata": {"label": "c"}}
    fields = {"k": "7", "offset": "7", "min_score": "-1", "filter": json.dumps(flt)}
    r = client.post("/v1/search", files={"file": (image.name, image.read_bytes())}, data=fields)
    assert r.status_code == 200 and r.json()["offset"] == 7 and r.json()["next_offset"] == 14
    mask = np.array([i % 3 == 2 for i in range(N)])
    _near([h["id"] for h in r.json()["neighbours"]], _oracle(vecs, ids, q, mask)[7:14], vecs, ids, q)
    as_json = client.post("/v1/search", json={"vector": q.tolist(), "k": 7, "offset": 7, "filter": flt}).json()
    assert [h["id"] for h in as_json["neighbours"]] == [h["id"] for h in r.json()["neighbours"]]


@pytest.mark.parametrize("body, reason", [
    ({"id": 1, "k": 50, "offset": 20}, "invalid_request"),  # offset + k > max_k
    ({"vector": [1.0] * DIM, "exclude": True}, "invalid_request"),  # exclude needs an id
    ({"id": 1, "offset": -1}, "invalid_request"),
    ({"id": 1, "min_score": 2}, "invalid_request"),
    ({"id": 1, "filter": {"metadata": {"label": ["a"]}}}, "invalid_request"),
    ({"id": 1, "filter": {"metadata": {'a"b': 1}}}, "invalid_filter"),
    ({"id": 1, "filter": {"path_prefix": ""}}, "invalid_request"),
    ({"id": 1, "filter": {"nope": 1}}, "invalid_request"),
])
def test_bad_options_are_422(client: TestClient, body: dict, reason: str) -> None:
    r = client.post("/v1/search", json=body)
    assert r.status_code == 422 and r.json()["reason"] == reason, r.json()


def test_bad_multipart_options_are_422(client: TestClient) -> None:
    image = CIFAR_TEST[0].read_bytes()
    for fields, reason in (({"offset": "x"}, "invalid_request"), ({"k": "50", "offset": "20"}, "invalid_request"),
                           ({"filter": "{not json"}, "invalid_filter"), ({"filter": '{"metadata": [1]}'}, "invalid_filter"),
                           ({"exclude": "true"}, "invalid_request"), ({"min_score": "3"}, "invalid_request")):
        r = client.post("/v1/search", files={"file": ("a.jpg", image)}, data=fields)
        assert r.status_code == 422 and r.json()["reason"] == reason, (fields, r.json())


def test_options_in_the_query_string(client: TestClient, setup: tuple[Path, Path, np.ndarray, np.ndarray]) -> None:
    """`/v1/search?k=5` (curl users write it so): the query string's options apply to either body, as
    if they were form fields or JSON keys; one given twice with different values, or an unknown
    parameter, is a 422 rather than silently ignored."""
    image = CIFAR_TEST[0].read_bytes()
    flt = json.dumps({"metadata": {"label": "b"}})
    form = client.post("/v1/search", files={"file": ("a.jpg", image)}, data={"k": "4", "offset": "4", "filter": flt})
    query = client.post("/v1/search", files={"file": ("a.jpg", image)}, params={"k": "4", "offset": "4", "filter": flt})
    assert form.status_code == query.status_code == 200, query.json()
    assert query.json()["k"] == 4 and query.json()["offset"] == 4
    assert [h["id"] for h in query.json()["neighbours"]] == [h["id"] for h in form.json()["neighbours"]]
    assert all(h["metadata"]["label"] == "b" for h in query.json()["neighbours"])
    # the same value in both places is fine
    same = client.post("/v1/search", files={"file": ("a.jpg", image)}, data={"k": "4"}, params={"k": "4"})
    assert same.status_code == 200 and same.json()["k"] == 4
    # JSON: options the body leaves out come from the query string
    body = client.post("/v1/search", json={"id": 3, "k": 6, "min_score": 0.1}).json()
    mixed = client.post("/v1/search", json={"id": 3}, params={"k": "6", "min_score": "0.1"})
    assert mixed.status_code == 200 and mixed.json() == body
    for kwargs, reason in (
            ({"files": {"file": ("a.jpg", image)}, "data": {"k": "4"}, "params": {"k": "5"}}, "invalid_request"),
            ({"json": {"id": 3, "k": 4}, "params": {"k": "5"}}, "invalid_request"),
            ({"json": {"id": 3}, "params": {"kk": "5"}}, "invalid_request"),
            ({"files": {"file": ("a.jpg", image)}, "params": {"top": "5"}}, "invalid_request"),
            ({"json": {"id": 3}, "params": {"k": "x"}}, "invalid_request"),
            ({"json": {"id": 3}, "params": {"k": str(MAX_K + 1)}}, "invalid_request"),
            ({"json": {"id": 3}, "params": {"filter": "{no"}}, "invalid_filter"),
            ({"json": {"id": 3}, "params": [("k", "4"), ("k", "5")]}, "invalid_request")):
        r = client.post("/v1/search", **kwargs)
        assert r.status_code == 422 and r.json()["reason"] == reason, (kwargs.get("params"), r.json())
