"""The live index, with real processes: a running `simsearch serve` follows what `simsearch index
build` commits (new files, a `--reembed` switch to a retrained model), a client loop searching
throughout without a single failed request; a server on another model's index exits with the
one-line error; a server whose model directory lags behind a switch degrades and recovers."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch
from export_checkpoints import make_checkpoint
from serverkit import CIFAR_TEST, CIFAR_TRAIN, REPO, LiveServer, clean_env, free_port, wait_until
from tinymodel import write_tiny_model_dir

from embed.backends import open_backend
from embed.embedder import Embedder
from export import export_model
from index.store import ImageIndex
from pretrain.checkpoint import load_checkpoint, save_checkpoint

LATENCY_S = 2.0  # server/README.md: a commit is searchable within 2 s
VERIFY = [REPO / "tests" / "data" / "cifar10-sample" / "test"]


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simsearch", *args], cwd=REPO, env=clean_env(),
                          capture_output=True, text=True, timeout=timeout)


def _build(folder: Path, out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli("index", "build", str(folder), "--model", str(model), "--out", str(out), "--no-progress",
                "--decode-workers", "2", *extra)


def _folder(dst: Path, files: list[Path]) -> Path:
    for p in files:
        (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst / p.parent.name / p.name)
    return dst


def _search(client: httpx.Client, image: Path, k: int = 1) -> list[dict]:
    r = client.post("/v1/search", files={"file": (image.name, image.read_bytes())}, data={"k": str(k)})
    assert r.status_code == 200, r.text
    return r.json()["neighbours"]


def _metric(client: httpx.Client, sample: str) -> float:
    """One sample of /metrics, e.g. 'simsearch_index_reloads_total{what="model"}' (0 when absent)."""
    for line in client.get("/metrics").text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


class SearchLoop:
    """A client searching by image in a loop until stopped; counts answers by status."""

    def __init__(self, url: str, images: list[Path]) -> None:
        self.url, self.images = url, images
        self.statuses: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            i = 0
            while not self._stop.is_set():
                p = self.images[i % len(self.images)]
                i += 1
                try:
                    r = c.post("/v1/search", files={"file": (p.name, p.read_bytes())}, data={"k": "5"})
                    self.statuses[str(r.status_code)] += 1
                except httpx.HTTPError as e:
                    self.statuses[type(e).__name__] += 1

    def __enter__(self) -> SearchLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")




def _retrained(ckpt: Path, out: Path, seed: int) -> Path:
    """One more (simulated) training step: every encoder weight nudged by 10% of its spread."""
    state = load_checkpoint(ckpt)
    gen = torch.Generator().manual_seed(seed)
    for name, t in state["encoder"].items():
        if t.is_floating_point() and t.numel() > 1 and "running" not in name:
            t += 0.1 * t.std() * torch.randn(t.shape, generator=gen)
    return save_checkpoint(state, out)


def _export(ckpt: Path, out: Path) -> Path:
    export_model(ckpt, out, exporter="torchscript", verify_images=VERIFY, verify_limit=8, triton=None)
    return out


def _cosines(index_dir: Path, model: Path) -> list[float]:
    with ImageIndex.open(index_dir) as ix:
        root, recs = ix.stats()["root"], ix.records()
        stored = [ix.vector(r.id) for r in recs]
    files = [Path(r.path) if os.path.isabs(r.path) else Path(root) / r.path for r in recs]
    fresh = Embedder(open_backend(model_dir=str(model))).embed_sources(files)
    return [float(s @ f) for s, f in zip(stored, fresh, strict=True)]


def test_retrain_reexport_reembed_while_serving(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "a.pt", arch="smallcnn", width=0.25, image_size=32)
    model = _export(ckpt, tmp_path / "model")
    folder = _folder(tmp_path / "imgs", CIFAR_TRAIN[::60][:24])
    index = tmp_path / "index"
    assert _build(folder, index, model).returncode == 0

    with LiveServer(model, index, tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=30) as c, SearchLoop(server.url, CIFAR_TEST[:20]) as loop:
        _export(_retrained(ckpt, tmp_path / "b.pt", seed=1), model)  # same name, same directory
        refused = _build(folder, index, model)
        assert refused.returncode == 2
        assert len(refused.stderr.strip().splitlines()) == 1 and "--reembed" in refused.stderr, refused.stderr
        before = loop.statuses["200"]
        reembed = _build(folder, index, model, "--reembed")
        assert reembed.returncode == 0, reembed.stderr
        # the server follows: the new model (re-read from the re-published model directory) and the
        # new vectors together; it answered from the old pair until then
        wait_until("the server serves the new model",
              lambda: _metric(c, 'simsearch_index_reloads_total{what="model"}') == 1
              and c.get("/readyz").status_code == 200)
        assert _metric(c, "simsearch_index_model_mismatch") == 0
        wait_until("more searches after the switch", lambda: loop.statuses["200"] > before + 20)
        top = _search(c, folder / CIFAR_TRAIN[0].parent.name / CIFAR_TRAIN[0].name)[0]
        assert top["path"] == f"{CIFAR_TRAIN[0].parent.name}/{CIFAR_TRAIN[0].name}" and top["score"] > 0.9999
    assert loop.failed == 0 and loop.statuses["200"] > 50, loop.statuses
    cos = _cosines(index, model)
    assert len(cos) == 24 and min(cos) >= 0.9999  # every vector is the new model's embedding of its file
    assert "Traceback" not in (tmp_path / "server.log").read_text()

    # a server started on an index of another model exits with the same one-line error
    other = _export(_retrained(ckpt, tmp_path / "c.pt", seed=2), tmp_path / "model-c")
    port = free_port()
    serve = _cli("serve", "--model", str(other), "--index", str(index), "--port", str(port), timeout=60)
    assert serve.returncode == 2
    lines = serve.stderr.strip().splitlines()
    assert len(lines) == 1 and "--reembed" in lines[0] and "Traceback" not in serve.stderr, serve.stderr


def _committed_at(index_dir: Path) -> float:
    conn = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        return float(conn.execute("SELECT value FROM meta WHERE key='committed_at'").fetchone()[0])
    finally:
        conn.close()


def test_a_live_server_serves_what_index_build_adds(model_dir: Path, tmp_path: Path) -> None:
    folder = _folder(tmp_path / "imgs", CIFAR_TRAIN[:10])
    index = tmp_path / "index"
    assert _build(folder, index, model_dir).returncode == 0
    new = [p for p in CIFAR_TRAIN[::97] if p not in CIFAR_TRAIN[:10]][:6]
    with LiveServer(model_dir, index, tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=30) as c, SearchLoop(server.url, CIFAR_TEST[:20]) as loop:
        assert c.get("/readyz").json()["items"] == 10
        _folder(folder, new)
        probe = folder / new[-1].parent.name / new[-1].name
        want = f"{new[-1].parent.name}/{new[-1].name}"
        build = subprocess.Popen([sys.executable, "-m", "simsearch", "index", "build", str(folder), "--model",
                                  str(model_dir), "--out", str(index), "--no-progress"], cwd=REPO, env=clean_env(),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen_at = None
        deadline = time.monotonic() + 120
        while seen_at is None and time.monotonic() < deadline:
            if _search(c, probe)[0]["path"] == want:
                seen_at = time.time()
            else:
                time.sleep(0.05)
        assert build.wait(60) == 0, build.stderr.read() if build.stderr else ""
        assert seen_at is not None
        latency = seen_at - _committed_at(index)
        assert latency <= LATENCY_S, f"searchable {latency:.2f} s after the commit"
        for p in new:
            assert _search(c, folder / p.parent.name / p.name)[0]["path"] == f"{p.parent.name}/{p.name}"
        assert c.get("/readyz").json()["items"] == 16
    assert loop.failed == 0 and loop.statuses["200"] > 10, loop.statuses
    print(f"new files searchable {latency:.3f} s after the commit")


def test_serve_first_then_index_build_into_it(model_dir: Path, tmp_path: Path) -> None:
    index, folder = tmp_path / "index", _folder(tmp_path / "imgs", CIFAR_TRAIN[200:208])
    uploads = CIFAR_TRAIN[900:902]
    with LiveServer(model_dir, index, tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=30) as c, SearchLoop(server.url, CIFAR_TEST[:10]) as loop:
        ids = []
        for p in uploads:
            r = c.post("/v1/items", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
            assert r.status_code == 201, r.text
            ids.append(r.json()["item"]["id"])
        for _ in range(2):  # the second run: nothing to do, and still nothing lost
            built = _build(folder, index, model_dir)
            assert built.returncode == 0, built.stderr
        first = folder / CIFAR_TRAIN[200].parent.name / CIFAR_TRAIN[200].name
        wait_until("the folder's files are served", lambda: _search(c, first)[0]["path"].endswith(first.name),
              LATENCY_S + 1)
        assert c.get("/readyz").json()["items"] == 10
        for p, item_id in zip(uploads, ids, strict=True):
            assert c.get(f"/v1/items/{item_id}").status_code == 200
            assert _search(c, p)[0]["id"] == item_id
            assert c.get(f"/v1/items/{item_id}/thumbnail").status_code == 200
        # and the server still writes after the build
        r = c.post("/v1/items", files={"file": ("x.jpg", CIFAR_TRAIN[950].read_bytes(), "image/jpeg")})
        assert r.status_code == 201, r.text
    assert loop.failed == 0, loop.statuses
    with ImageIndex.open(index) as ix:
        assert len(ix) == 11 and ix.stats()["root"] == str(folder.resolve())


def test_a_server_whose_model_lags_behind_a_switch_degrades_then_recovers(tmp_path: Path) -> None:
    a = write_tiny_model_dir(tmp_path / "a", seed=0)
    b = write_tiny_model_dir(tmp_path / "b", seed=1)
    current = tmp_path / "model"
    current.symlink_to(a.name)
    folder = _folder(tmp_path / "imgs", CIFAR_TRAIN[300:312])
    index = tmp_path / "index"
    assert _build(folder, index, current).returncode == 0
    upload = CIFAR_TRAIN[960]
    with LiveServer(current, index, tmp_path / "server.log") as server, \
            httpx.Client(base_url=server.url, timeout=30) as c, SearchLoop(server.url, CIFAR_TEST[:10]) as loop:
        # the index moves to model b, but the server's model directory still holds a
        assert _build(folder, index, b, "--reembed").returncode == 0
        wait_until("not ready", lambda: c.get("/readyz").status_code == 503)
        ready = c.get("/readyz").json()
        assert ready["checks"]["model_matches_index"] is False
        assert "--reembed" in ready["detail"]["model_matches_index"]
        assert _metric(c, "simsearch_index_model_mismatch") == 1
        r = c.post("/v1/items", files={"file": (upload.name, upload.read_bytes(), "image/jpeg")})
        assert (r.status_code, r.json()["reason"]) == (503, "model_mismatch"), r.text
        assert len(_search(c, folder / CIFAR_TRAIN[300].parent.name / CIFAR_TRAIN[300].name, k=3)) == 3
        # publish b where the server looks (atomically, as export does): it recovers by itself
        link = tmp_path / ".model.new"
        link.symlink_to(b.name)
        os.replace(link, current)
        wait_until("ready again", lambda: c.get("/readyz").status_code == 200, timeout_s=20)
        assert _metric(c, "simsearch_index_model_mismatch") == 0
        r = c.post("/v1/items", files={"file": (upload.name, upload.read_bytes(), "image/jpeg")})
        assert r.status_code == 201, r.text
        top = _search(c, folder / CIFAR_TRAIN[301].parent.name / CIFAR_TRAIN[301].name)[0]
        assert top["path"].endswith(CIFAR_TRAIN[301].name) and top["score"] > 0.9999
    assert loop.failed == 0 and loop.statuses["200"] > 10, loop.statuses
    assert min(_cosines(index, b)) >= 0.9999


def test_a_write_waiting_for_another_process_does_not_block_searches(tmp_path: Path) -> None:
    """While another process holds SQLite's write lock (a build mid-batch), a server's write waits
    for it without holding the index's reader lock: searches keep answering meanwhile."""
    index = ImageIndex.create(tmp_path / "index", 4)
    index.add(np.eye(4, dtype=np.float32), [{"path": f"{i}.jpg"} for i in range(4)])
    index.commit()
    holder = sqlite3.connect(tmp_path / "index" / "index.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the other process's open write transaction
    writer = threading.Thread(target=lambda: index.add(np.ones((1, 4), np.float32) / 2, [{"path": "x.jpg"}]))
    writer.start()
    time.sleep(0.3)
    assert writer.is_alive()  # waiting for the lock
    hits = index.search(np.eye(4, dtype=np.float32), 1)  # would hang until ROLLBACK if it were blocked
    assert [h[0].record.path for h in hits] == ["0.jpg", "1.jpg", "2.jpg", "3.jpg"]
    assert writer.is_alive()
    holder.execute("ROLLBACK")
    holder.close()
    writer.join(10)
    assert not writer.is_alive()
    index.commit()
    assert len(index) == 5
    index.close()
