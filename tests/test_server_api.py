"""The app in-process (TestClient / ASGI transport): limits, error codes, auth, batching, metrics,
and the messy corpus through /v1/embed."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serverkit import CIFAR_TEST, CIFAR_TRAIN, MESSY
from tinymodel import SlowBackend

from embed.backends.onnxruntime import OnnxRuntimeBackend
from embed.embedder import Embedder
from server.app import create_app
from server.settings import Settings

KEY = "s3cret"


def make_settings(model_dir: Path, index_dir: Path, **kw: object) -> Settings:
    return Settings(model_dir=model_dir, index_dir=index_dir, _env_file=None, **kw)


@pytest.fixture
def client(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for k in [k for k in __import__("os").environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    app = create_app(make_settings(model_dir, tmp_path / "index", max_pixels=2_000_000, max_images_per_request=4,
                                   max_body_bytes=200_000))
    with TestClient(app) as c:
        yield c


def _files(paths: list[Path], field: str = "files") -> list[tuple[str, tuple[str, bytes]]]:
    return [(field, (p.name, p.read_bytes())) for p in paths]


def test_embed_matches_the_embedder(client: TestClient, model_dir: Path) -> None:
    paths = CIFAR_TEST[:3]
    r = client.post("/v1/embed", files=_files(paths))
    assert r.status_code == 200
    got = np.array([x["embedding"] for x in r.json()["results"]], dtype=np.float32)
    backend = OnnxRuntimeBackend(model_dir)
    try:
        want = np.stack(Embedder(backend).embed_sources([p.read_bytes() for p in paths]))
    finally:
        backend.close()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert [x["filename"] for x in r.json()["results"]] == [p.name for p in paths]


def test_per_image_errors_and_whole_request_errors(client: TestClient) -> None:
    good, text = CIFAR_TEST[0], b"this is not an image"
    r = client.post("/v1/embed", files=[("files", ("a.jpg", good.read_bytes())), ("files", ("b.png", text))])
    assert r.status_code == 200
    ok, bad = r.json()["results"]
    assert ok["embedding"] is not None and ok["error"] is None
    assert bad["embedding"] is None and bad["error"]["reason"] == "not_an_image" and bad["error"]["index"] == 1
    # the only image fails: the request fails with that image's status and reason
    r = client.post("/v1/embed", files=[("files", ("b.png", text))])
    assert r.status_code == 415 and r.json()["reason"] == "not_an_image"
    r = client.post("/v1/embed", json={"images": [{"data": "@@not base64@@"}]})
    assert r.status_code == 422 and r.json()["errors"][0]["reason"] == "invalid_base64"
    r = client.post("/v1/embed", content=b"raw", headers={"content-type": "image/jpeg"})
    assert r.status_code == 415 and r.json()["reason"] == "unsupported_media_type"


def test_limits(client: TestClient) -> None:
    # body size: declared Content-Length, and a chunked body with no length at all
    big = b"\0" * 300_000
    r = client.post("/v1/embed", files=[("files", ("big.jpg", big))])
    assert r.status_code == 413 and r.json()["reason"] == "too_large"

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 10_000

    r = client.post("/v1/embed", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    # images per request
    r = client.post("/v1/embed", files=_files(CIFAR_TEST[:5]))
    assert r.status_code == 413 and r.json()["reason"] == "too_many_images"
    b64 = base64.b64encode(CIFAR_TEST[0].read_bytes()).decode()
    r = client.post("/v1/embed", json={"images": [{"data": b64}] * 5})
    assert r.status_code == 413
    # pixels per image: the decompression bomb, and a real image over the configured limit
    bomb = next(p for p in MESSY if p.name == "decompression_bomb.gif")
    r = client.post("/v1/embed", files=_files([bomb]))
    assert r.status_code == 413 and r.json()["reason"] == "too_large"
    flower = next(p for p in MESSY if p.name == "flower.jpg")  # 480 x 360 = 172,800 pixels
    small = create_app(make_settings(client.app.state.settings.model_dir,  # type: ignore[attr-defined]
                                     client.app.state.settings.index_dir, max_pixels=100_000))  # type: ignore[attr-defined]
    with TestClient(small) as c2:
        assert c2.post("/v1/embed", files=_files([flower])).status_code == 413
        assert c2.post("/v1/embed", files=_files(CIFAR_TEST[:1])).status_code == 200


def test_validation_errors_have_the_common_shape(client: TestClient) -> None:
    for body in ({"vector": [0.1] * 3, "id": 1}, {"k": 3}, {"id": 1, "k": 0}, {"id": 1, "extra": 1}):
        r = client.post("/v1/search", json=body)
        assert r.status_code == 422, body
        assert r.json()["reason"] == "invalid_request" and r.json()["errors"][0]["loc"][0] == "body"
    r = client.post("/v1/search", json={"id": 1, "k": 10_000})
    assert r.status_code == 422 and "between 1 and 100" in r.json()["detail"]
    r = client.post("/v1/search", files=_files(CIFAR_TEST[:1], "file"), data={"k": "many"})
    assert r.status_code == 422
    r = client.post("/v1/search", json={"vector": [0.0] * 64})
    assert r.status_code == 422 and r.json()["reason"] == "invalid_vector"
    assert client.get("/v1/items/-1").status_code == 422
    r = client.post("/v1/items", files=_files(CIFAR_TEST[:1], "file"), data={"metadata": "[1, 2]"})
    assert r.status_code == 422 and r.json()["reason"] == "invalid_metadata"
    r = client.post("/v1/items", files=_files(CIFAR_TEST[:1], "file"), data={"metadata": '{"x": NaN}'})
    assert r.status_code == 422


def test_items_search_and_thumbnails(client: TestClient) -> None:
    paths = CIFAR_TRAIN[:4]
    ids = []
    for p in paths:
        r = client.post("/v1/items", files=_files([p], "file"), data={"metadata": json.dumps({"n": p.name})})
        assert r.status_code == 201
        ids.append(r.json()["item"]["id"])
    # the same bytes again: a new item, reported as a duplicate
    r = client.post("/v1/items", json={"image": {"data": base64.b64encode(paths[0].read_bytes()).decode(),
                                                 "filename": "again.jpg"}})
    assert r.status_code == 201 and r.json()["duplicate_of"] == [ids[0]]
    dup = r.json()["item"]["id"]
    by_id = client.post("/v1/search", json={"id": ids[1], "k": 2}).json()
    assert by_id["query"] == "id" and by_id["neighbours"][0]["id"] == ids[1]
    vec = client.post("/v1/embed", files=_files([paths[2]])).json()["results"][0]["embedding"]
    by_vec = client.post("/v1/search", json={"vector": [3 * v for v in vec], "k": 1}).json()  # normalised
    assert by_vec["neighbours"][0]["id"] == ids[2] and by_vec["neighbours"][0]["score"] > 0.999
    assert by_vec["neighbours"][0]["metadata"] == {"filename": paths[2].name, "n": paths[2].name}

    thumb = client.get(f"/v1/items/{ids[0]}/thumbnail")
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert client.get("/v1/items/999999/thumbnail").status_code == 404
    # deleting one of two items sharing an upload keeps the file; deleting the last removes it
    path = Path(client.get(f"/v1/items/{dup}").json()["path"])
    assert client.delete(f"/v1/items/{dup}").status_code == 200
    assert path.is_file() and client.get(f"/v1/items/{ids[0]}/thumbnail").status_code == 200
    assert client.delete(f"/v1/items/{ids[0]}").status_code == 200
    assert not path.exists()
    assert client.delete(f"/v1/items/{ids[0]}").status_code == 404


def test_thumbnail_of_a_vanished_file_is_404(client: TestClient) -> None:
    r = client.post("/v1/items", files=_files(CIFAR_TRAIN[10:11], "file"))
    item = r.json()["item"]
    Path(item["path"]).unlink()
    r = client.get(item["thumbnail_url"])
    assert r.status_code == 404 and r.json()["reason"] == "file_missing"


def test_writes_need_the_api_key(model_dir: Path, tmp_path: Path) -> None:
    app = create_app(make_settings(model_dir, tmp_path / "index", api_key=KEY))
    with TestClient(app) as c:
        upload = _files(CIFAR_TEST[:1], "file")
        assert c.post("/v1/items", files=upload).status_code == 401
        assert c.post("/v1/items", files=upload, headers={"X-API-Key": "wrong"}).status_code == 401
        r = c.post("/v1/items", files=upload, headers={"X-API-Key": KEY})
        assert r.status_code == 201
        item_id = r.json()["item"]["id"]
        assert c.get(f"/v1/items/{item_id}").status_code == 200  # reads are open
        assert c.post("/v1/search", json={"id": item_id}).status_code == 200
        assert c.delete(f"/v1/items/{item_id}").status_code == 401
        assert c.delete(f"/v1/items/{item_id}", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_messy_corpus_never_5xx(client: TestClient) -> None:
    outcomes = {}
    for p in MESSY:
        r = client.post("/v1/embed", files=_files([p]))
        assert r.status_code < 500, (p.name, r.status_code, r.text)
        if r.status_code == 200:
            (res,) = r.json()["results"]
            assert len(res["embedding"]) == r.json()["dim"]
            assert abs(np.linalg.norm(res["embedding"]) - 1) < 1e-3
        else:
            assert 400 <= r.status_code < 500 and r.json()["reason"] and r.json()["detail"]
        outcomes[p.name] = r.status_code
    assert outcomes["flower.jpg"] == 200 and outcomes["pil_sample_cmyk.jpg"] == 200
    assert outcomes["empty_file.jpg"] == 415 and outcomes["not_an_image.png"] == 415
    assert outcomes["truncated_jpeg.jpg"] == 422 and outcomes["decompression_bomb.gif"] == 413


async def _gather_embeds(app: object, n: int) -> list[httpx.Response]:
    async with app.router.lifespan_context(app):  # type: ignore[attr-defined]
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            data = CIFAR_TEST[0].read_bytes()
            return list(await asyncio.gather(
                *(c.post("/v1/embed", files={"files": ("a.jpg", data)}) for _ in range(n))
            ))


def test_concurrent_requests_are_batched(model_dir: Path, tmp_path: Path) -> None:
    backend = SlowBackend(OnnxRuntimeBackend(model_dir), delay_s=0.05)
    app = create_app(make_settings(model_dir, tmp_path / "index", batch_size=8, batch_wait_ms=20), backend=backend)
    responses = asyncio.run(_gather_embeds(app, 24))
    assert [r.status_code for r in responses] == [200] * 24
    assert sum(backend.batches) == 24 and max(backend.batches) > 1 and max(backend.batches) <= 8
    backend.close()


def test_full_queue_answers_503_with_retry_after(model_dir: Path, tmp_path: Path) -> None:
    backend = SlowBackend(OnnxRuntimeBackend(model_dir), delay_s=0.3)
    app = create_app(make_settings(model_dir, tmp_path / "index", batch_size=1, queue_max=2, batch_wait_ms=0),
                     backend=backend)
    responses = asyncio.run(_gather_embeds(app, 8))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.json()["reason"] == "queue_full" and int(rejected.headers["retry-after"]) >= 1
    backend.close()


def test_readyz_is_a_real_check(model_dir: Path, tmp_path: Path) -> None:
    backend = SlowBackend(OnnxRuntimeBackend(model_dir), delay_s=0.0, ready=False)
    with TestClient(create_app(make_settings(model_dir, tmp_path / "index"), backend=backend)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["backend"] is False
        backend._ready = True
        assert c.get("/readyz").status_code == 200
        assert c.get("/healthz").json() == {"status": "ok"}
    backend.close()


def test_metrics(client: TestClient) -> None:
    client.post("/v1/items", files=_files(CIFAR_TEST[:1], "file"))
    client.post("/v1/embed", files=_files(CIFAR_TEST[:2]))
    client.get("/v1/items/424242")
    text = client.get("/metrics").text
    assert 'simsearch_http_requests_total{method="GET",route="/v1/items/{item_id}",status="404"} 1.0' in text
    assert 'route="/v1/embed",status="200"' in text
    assert "simsearch_index_items 1.0" in text
    assert "simsearch_batch_size_count" in text and "simsearch_queue_depth 0.0" in text
    count = float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith("simsearch_batch_size_count")))
    assert count >= 2


def test_openapi_documents_both_body_types(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/v1/embed", "/v1/search", "/v1/items"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}
        ref = content["application/json"]["schema"]["$ref"].split("/")[-1]
        assert ref in schema["components"]["schemas"]
    assert "413" in schema["paths"]["/v1/embed"]["post"]["responses"]


def test_thumbnails_of_folder_indexed_items_resolve_under_the_root(model_dir: Path, tmp_path: Path) -> None:
    from embed.spec import ModelSpec
    from index.store import ImageIndex

    spec = ModelSpec.load(model_dir)
    root = CIFAR_TRAIN[0].parents[1]
    rel = CIFAR_TRAIN[0].relative_to(root).as_posix()
    with ImageIndex.create(tmp_path / "index", spec.embedding_dim, model_name=spec.name, root=str(root)) as idx:
        (item_id,) = idx.add(np.ones((1, spec.embedding_dim), np.float32), [{"path": rel, "width": 32, "height": 32}])
        idx.commit()
    with TestClient(create_app(make_settings(model_dir, tmp_path / "index"))) as c:
        assert c.get(f"/v1/items/{item_id}").json()["path"] == rel
        r = c.get(f"/v1/items/{item_id}/thumbnail")
        assert r.status_code == 200 and r.content[:2] == b"\xff\xd8"


def test_an_index_of_another_model_is_refused(model_dir: Path, tmp_path: Path) -> None:
    from embed.spec import ModelSpec
    from index.identity import IndexModelMismatch
    from index.store import ImageIndex

    spec = ModelSpec.load(model_dir)
    ImageIndex.create(tmp_path / "index", spec.embedding_dim, model_name="some-other-model").close()
    with pytest.raises(IndexModelMismatch, match="some-other-model"), \
            TestClient(create_app(make_settings(model_dir, tmp_path / "index"))):
        pass


def test_malformed_bodies_are_4xx(client: TestClient) -> None:
    bodies = [
        ("multipart/form-data", b"garbage"),
        ("multipart/form-data; boundary=abc", b"garbage"),
        ("multipart/form-data; boundary=abc", b'--abc\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nxx'),
        ("multipart/form-data; boundary=abc", b"--abc\r\n\r\nxx\r\n--abc--\r\n"),
        ("application/json", b"{"),
        ("application/json", b"null"),
        ("application/json", b"\xff\xfe"),
        ("text/plain", b"hello"),
    ]
    for path in ("/v1/embed", "/v1/search", "/v1/items"):
        for ctype, body in bodies:
            r = client.post(path, content=body, headers={"content-type": ctype})
            assert 400 <= r.status_code < 500, (path, ctype, body, r.status_code, r.text)
            assert r.json()["reason"]
    assert client.post("/v1/search", json={"id": 2**64}).status_code == 422


def test_search_and_items_read_one_image_the_same_way(client: TestClient) -> None:
    """server/bodies.py's `read_image_body`, through the routes: multipart or base64 JSON alike."""
    image = CIFAR_TRAIN[5]
    b64 = {"data": base64.b64encode(image.read_bytes()).decode(), "filename": image.name}
    added = client.post("/v1/items", json={"image": b64, "metadata": {"via": "json"}})
    assert added.status_code == 201 and added.json()["item"]["metadata"] == {"via": "json", "filename": image.name}
    by_json = client.post("/v1/search", json={"image": b64, "k": 1}).json()
    by_form = client.post("/v1/search", files=_files([image], "file"), data={"k": "1"}).json()
    assert by_json["query"] == by_form["query"] == "image"
    assert by_json["neighbours"][0]["id"] == by_form["neighbours"][0]["id"] == added.json()["item"]["id"]
    assert by_json["neighbours"][0]["score"] == pytest.approx(by_form["neighbours"][0]["score"], abs=1e-6)
    for route, extra in (("/v1/search", {"k": 1}), ("/v1/items", {})):
        r = client.post(route, data={"k": "1"}, files=[("other", ("x.txt", b"not the file part"))])
        assert r.status_code == 422 and r.json()["reason"] == "no_images", route
        r = client.post(route, files=_files(CIFAR_TEST[:2], "file"))
        assert r.status_code == 413 and r.json()["reason"] == "too_many_images", route
        r = client.post(route, json={"image": {"data": "@@not base64@@"}, **extra})
        assert r.status_code == 422 and r.json()["reason"] == "invalid_base64", route
        r = client.post(route, content=b"raw", headers={"content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["reason"] == "unsupported_media_type", route
