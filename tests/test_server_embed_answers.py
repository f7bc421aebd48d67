"""/v1/embed's answers in-process: the `.npy` answer holds the JSON answer's vectors exactly; the
multipart fast path (server/fastpath.py) and the FastAPI route answer the same request the same
way, errors included, and the fast path is counted in the metrics under the route's template."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serverkit import CIFAR_TEST
from tinymodel import write_tiny_model_dir

import server.fastpath
import server.routes.embed
from server.app import create_app
from server.routes.embed import wants_npy
from server.settings import Settings
from server.worker_header import WORKER_HEADER

NPY = "application/x-npy"


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for k in [k for k in os.environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    model = write_tiny_model_dir(tmp_path / "model", dim=48)
    settings = Settings(model_dir=model, index_dir=tmp_path / "index", _env_file=None, max_images_per_request=4)
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts requests the fast path parsed (the route parses through server.bodies instead)."""
    calls: list[int] = []
    parse = server.fastpath.parse_multipart

    def counting(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return parse(*args, **kw)

    monkeypatch.setattr(server.fastpath, "parse_multipart", counting)
    return calls


def _files(paths: list[Path]) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (p.name, p.read_bytes())) for p in paths]


def test_npy_answer_holds_the_json_vectors(client: TestClient) -> None:
    files = _files(CIFAR_TEST[:3]) + [("files", ("bad.png", b"not an image"))]
    as_json = client.post("/v1/embed", files=files)
    assert as_json.status_code == 200 and as_json.headers["content-type"] == "application/json"
    as_npy = client.post("/v1/embed", files=files, headers={"Accept": NPY})
    assert as_npy.status_code == 200 and as_npy.headers["content-type"] == NPY
    array = np.load(io.BytesIO(as_npy.content), allow_pickle=False)
    assert array.dtype == np.float32 and array.shape == (4, 48)
    results = as_json.json()["results"]
    want = np.array([r["embedding"] for r in results[:3]], dtype=np.float32)
    np.testing.assert_array_equal(array[:3], want)  # JSON's decimals read back as the same float32
    np.testing.assert_allclose(np.linalg.norm(array[:3], axis=1), 1.0, atol=1e-5)
    assert np.isnan(array[3]).all() and results[3]["error"]["reason"] == "not_an_image"
    assert as_npy.headers["x-simsearch-failed"] == "3=not_an_image"
    assert as_npy.headers["x-simsearch-model"] == "tiny v1"
    # every image failing is an error, in JSON, whatever the Accept header
    r = client.post("/v1/embed", files=files[3:], headers={"Accept": NPY})
    assert r.status_code == 415 and r.json()["reason"] == "not_an_image"


def test_the_fast_path_and_the_route_answer_alike(client: TestClient, fast_calls: list[int]) -> None:
    paths = CIFAR_TEST[5:8]
    fast = client.post("/v1/embed", files=_files(paths))
    assert fast_calls == [1]
    routed = client.post("/v1/embed", files=_files(paths), headers={"Origin": "https://example.org"})
    b64 = client.post("/v1/embed", json={"images": [{"data": base64.b64encode(p.read_bytes()).decode(),
                                                     "filename": p.name} for p in paths]})
    assert fast_calls == [1]  # the cross-origin and the JSON request went through FastAPI
    assert fast.status_code == routed.status_code == b64.status_code == 200
    assert fast.content == routed.content == b64.content
    assert fast.headers["content-type"] == routed.headers["content-type"]
    assert fast.headers["content-length"] == routed.headers["content-length"]
    assert fast.headers[WORKER_HEADER] == routed.headers[WORKER_HEADER] == str(os.getpid())

    # errors: the same status and body either way
    bad_bodies = [
        ({"files": _files(CIFAR_TEST[:5])}, 413, "too_many_images"),
        ({"content": b"--x\r\nno end", "headers": {"content-type": "multipart/form-data; boundary=x"}},
         400, "bad_request"),
        ({"files": [("files", ("t.txt", b"text"))]}, 415, "not_an_image"),
        ({"files": [("other", ("a.jpg", CIFAR_TEST[0].read_bytes()))]}, 422, "no_images"),
    ]
    for kw, status, reason in bad_bodies:
        headers = dict(kw.pop("headers", {}))
        a = client.post("/v1/embed", headers=headers, **kw)
        b = client.post("/v1/embed", headers={**headers, "Origin": "https://example.org"}, **kw)
        assert (a.status_code, a.json()["reason"]) == (status, reason), a.text
        assert (b.status_code, b.content) == (a.status_code, a.content)
    assert len(fast_calls) == 1 + len(bad_bodies)

    metrics = client.get("/metrics").text
    line = next(ln for ln in metrics.splitlines()
                if ln.startswith('simsearch_http_requests_total{method="POST",route="/v1/embed",status="200"}'))
    assert float(line.split()[-1]) == 3.0  # fast, cross-origin, JSON


def test_an_unexpected_failure_is_the_same_500_on_both_paths(
    client: TestClient, fast_calls: list[int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("a bug")

    monkeypatch.setattr(server.routes.embed, "answer", broken)
    fast = client.post("/v1/embed", files=_files(CIFAR_TEST[:1]))
    assert fast_calls == [1]
    assert "a bug" in caplog.text  # logged with its traceback
    lenient = TestClient(client.app, raise_server_exceptions=False)  # no `with`: the app is already started
    routed = lenient.post("/v1/embed", files=_files(CIFAR_TEST[:1]), headers={"Origin": "https://example.org"})
    assert fast.status_code == routed.status_code == 500
    assert fast.json() == routed.json() and fast.json()["reason"] == "internal_error"
    assert fast.headers[WORKER_HEADER] == str(os.getpid())
    metrics = client.get("/metrics").text
    assert 'simsearch_http_requests_total{method="POST",route="/v1/embed",status="500"} 2.0' in metrics


def test_accept_negotiation() -> None:
    assert wants_npy(NPY)
    assert wants_npy(f"{NPY}, application/json;q=0.5")
    assert not wants_npy("")
    assert not wants_npy("*/*")
    assert not wants_npy(f"application/json, {NPY}")  # a tie goes to JSON
    assert not wants_npy(f"{NPY};q=0, */*")
    assert wants_npy(f"text/html, {NPY};q=0.9")


def test_openapi_documents_the_npy_answer(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/embed"]["post"]
    content = op["responses"]["200"]["content"]
    assert set(content) >= {"application/json", NPY}
    assert content["application/json"]["schema"]["$ref"].endswith("/EmbedResponse")
    assert "application/x-npy" in op["description"]
