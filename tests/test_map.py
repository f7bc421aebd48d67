"""The map of the collection: the 2-D layout (index/layout.py), GET /v1/map, and the page in headless
Chromium (a click on a thumbnail searches by that item; the page shows the API's answer).

The page test needs `chromium` and `chromium-driver` (skips, saying so, without them). Its
screenshot goes to the test's temporary folder, and to docs/map-page.png (the README's) when that
is missing or UPDATE_SCREENSHOTS=1; set SCREENSHOT_MODEL_DIR to a trained model directory for a map
whose neighbourhoods mean something (the fixture's model is untrained).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from browserkit import chrome, keep_screenshot, needs_chromium
from fastapi.testclient import TestClient
from serverkit import CIFAR_TRAIN, LiveServer

from index.layout import compute_layout, read_sample, resolve_method
from index.store import ImageIndex
from server.app import create_app
from server.settings import Settings


def _clusters(n_per: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well separated Gaussian clusters of l2-normalised vectors, shuffled; and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:3] * 4
    labels = np.repeat(np.arange(3), n_per)
    x = centres[labels] + rng.standard_normal((len(labels), dim)).astype(np.float32) * 0.3
    order = rng.permutation(len(labels))
    x, labels = x[order], labels[order]
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_pca_layout_keeps_clusters_apart_and_counts_every_item() -> None:
    x, labels = _clusters(200)
    ids = np.arange(1000, 1000 + len(x))
    layout = compute_layout(ids, x, method="pca", max_points=150, grid=32)
    assert layout.method == "pca" and layout.count == 600 and layout.density_of == "all"
    assert len(layout.ids) == 150 and set(layout.ids) <= set(ids)
    assert layout.xy.shape == (150, 2) and layout.xy.min() >= 0 and layout.xy.max() <= 1
    assert layout.density.shape == (32, 32) and layout.density.sum() == pytest.approx(600)
    # each cluster's points are closer to their own centroid on the map than to any other's
    lab = labels[layout.ids - 1000]
    centroids = np.stack([layout.xy[lab == c].mean(0) for c in range(3)])
    nearest = np.argmin(((layout.xy[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == lab).mean() > 0.95


def test_layout_of_a_sample_scales_the_density_to_the_collection() -> None:
    x, _ = _clusters(100)
    layout = compute_layout(np.arange(300), x, 3000, method="pca", max_points=20)
    assert layout.count == 3000 and layout.density_of == "sample"
    assert layout.density.sum() == pytest.approx(3000)
    assert len(layout.ids) == 20


def test_tiny_and_empty_collections() -> None:
    one = compute_layout(np.array([7]), np.ones((1, 8), np.float32), method="pca")
    assert one.ids.tolist() == [7] and one.xy.tolist() == [[0.5, 0.5]] and one.density.sum() == 1
    empty = compute_layout(np.zeros(0, np.int64), np.zeros((0, 8), np.float32), method="pca")
    assert len(empty.ids) == 0 and empty.density.sum() == 0
    with pytest.raises(ValueError, match="pca.*umap"):
        resolve_method("tsne", 10)


def test_read_sample_reads_a_seeded_sample_of_a_real_index(tmp_path: Path) -> None:
    x, _ = _clusters(40)
    with ImageIndex.create(tmp_path / "idx", x.shape[1]) as index:
        ids = index.add(x, [{"path": f"{i}.jpg"} for i in range(len(x))])
        index.commit()
        got_ids, got_vectors, count = read_sample(index, 50, seed=3)
        again, _, _ = read_sample(index, 50, seed=3)
    assert count == 120 and len(got_ids) == 50 and len(set(got_ids.tolist())) == 50
    assert got_ids.tolist() == again.tolist()
    by_id = dict(zip(ids, x, strict=True))
    np.testing.assert_array_equal(got_vectors, np.stack([by_id[int(i)] for i in got_ids]))


# --- GET /v1/map ---------------------------------------------------------------------------------
@pytest.fixture
def client(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for k in [k for k in os.environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    app = create_app(Settings(model_dir=model_dir, index_dir=tmp_path / "index", _env_file=None))
    with TestClient(app) as c:
        yield c


def _add(c: TestClient | httpx.Client, paths: list[Path]) -> list[int]:
    ids = []
    for p in paths:
        r = c.post("/v1/items", files={"file": (f"{p.parent.name}/{p.name}", p.read_bytes())})
        assert r.status_code == 201, r.text
        ids.append(r.json()["item"]["id"])
    return ids


def test_map_api_returns_a_cached_layout_per_commit(client: TestClient) -> None:
    ids = _add(client, CIFAR_TRAIN[:40:2])
    r = client.get("/v1/map", params={"method": "pca", "limit": 8, "grid": 16})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready" and not body["stale"] and body["method"] == "pca"
    assert body["count"] == 20 and body["fitted_on"] == 20 and body["density_of"] == "all"
    assert len(body["points"]) == 8 and {p["id"] for p in body["points"]} <= set(ids)
    assert all(0 <= p["x"] <= 1 and 0 <= p["y"] <= 1 for p in body["points"])
    assert body["points"][0]["thumbnail_url"] == f"/v1/items/{body['points'][0]['id']}/thumbnail"
    assert body["density"]["grid"] == 16 and sum(map(sum, body["density"]["cells"])) == pytest.approx(20)
    # the same commit: the same layout object, not a new computation
    assert client.get("/v1/map", params={"method": "pca", "limit": 8, "grid": 16}).json() == body
    # a new commit: a new layout that counts the new item
    (new_id,) = _add(client, CIFAR_TRAIN[41:42])
    after = client.get("/v1/map", params={"method": "pca", "limit": 100, "grid": 16}).json()
    assert after["generation"] > body["generation"] and after["count"] == 21
    assert new_id in {p["id"] for p in after["points"]}


def test_map_api_errors_and_schema(client: TestClient) -> None:
    r = client.get("/v1/map", params={"method": "tsne"})
    assert r.status_code == 422 and "'pca', 'umap'" in r.json()["detail"]
    assert client.get("/v1/map", params={"limit": 0}).status_code == 422
    empty = client.get("/v1/map").json()
    assert empty["status"] == "ready" and empty["count"] == 0 and empty["points"] == []
    assert empty["method"] == "pca" and "pca" in empty["methods"]
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/v1/map"]["get"]
    assert {p["name"] for p in op["parameters"]} >= {"limit", "method", "grid", "wait"}
    assert {"200", "202"} <= set(op["responses"])
    assert "/map" not in schema["paths"]
    page = client.get("/map")
    assert page.status_code == 200 and "map.js" in page.text


# --- the page in Chromium -------------------------------------------------------------------------
@needs_chromium
def test_map_page_click_searches_by_the_item(model_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = Path(os.environ.get("SCREENSHOT_MODEL_DIR") or model_dir)
    with LiveServer(model, tmp_path / "index", tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            _add(c, CIFAR_TRAIN[::6])
        driver = chrome(tmp_path / "chrome", 1200, 800)  # an explicit driver: nothing is downloaded
        try:
            driver.get(server.url + "/map")
            WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.simsearchMap.ready"))
            n_points = driver.execute_script("return window.simsearchMap.points.length")
            assert n_points == len(CIFAR_TRAIN[::6])
            assert "items" in driver.find_element(By.ID, "status").text
            # the thumbnails drawn on the canvas have loaded
            WebDriverWait(driver, 60).until(lambda d: d.execute_script(
                "return window.simsearchMap.points.every(p => p.img && p.img.complete && p.img.naturalWidth > 0)"))
            canvas = driver.find_element(By.ID, "map")
            # click the item that is on top at some point's position (thumbnails may overlap)
            target = driver.execute_script("return window.simsearchMap.points[3].id")
            sx, sy = driver.execute_script(f"return window.simsearchMap.screenPosition({target})")
            picked = driver.execute_script(f"return window.simsearchMap.topmostAt({sx}, {sy})")
            assert picked is not None
            # selenium 4 offsets are from the element's centre
            w, h = canvas.size["width"], canvas.size["height"]
            ActionChains(driver).move_to_element_with_offset(canvas, sx - w / 2, sy - h / 2).click().perform()
            WebDriverWait(driver, 30).until(
                lambda d: d.find_element(By.ID, "results").get_attribute("data-query") == str(picked))
            shown = [int(e.get_attribute("data-id")) for e in driver.find_elements(By.CSS_SELECTOR, "#results .hit")]
            k = int(driver.find_element(By.ID, "k").get_attribute("value"))
            with httpx.Client(base_url=server.url, timeout=30) as c:
                want = c.post("/v1/search", json={"id": picked, "k": k}).json()["neighbours"]
            assert shown == [n["id"] for n in want] and len(shown) == k
            assert f"of item {picked}" in driver.find_element(By.ID, "message").text
            assert int(driver.find_element(By.CSS_SELECTOR, "#picked .hit").get_attribute("data-id")) == picked
            # zoom in and pan: the page keeps drawing (the picked item moves on screen)
            before = driver.execute_script(f"return window.simsearchMap.screenPosition({picked})")
            driver.find_element(By.ID, "zoom-in").click()
            ActionChains(driver).move_to_element_with_offset(canvas, 10, 10).click_and_hold().move_by_offset(
                60, 30).release().perform()
            time.sleep(0.3)
            after = driver.execute_script(f"return window.simsearchMap.screenPosition({picked})")
            assert after != before
            driver.find_element(By.ID, "zoom-reset").click()
            time.sleep(0.3)
            keep_screenshot(driver, "map-page.png", tmp_path)
        finally:
            driver.quit()
