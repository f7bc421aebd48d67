"""Model identity of an index: fingerprints, the one check, refusal, `--reembed` (resume, items added
meanwhile, dropped files), a writer that outlives a switch, and `index build` into a server-made index."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tinymodel import write_tiny_model_dir

from embed.backends import open_backend
from embed.embedder import Embedder
from embed.spec import MODEL_JSON, ModelSpec, compute_fingerprint, model_dir_fingerprint, sha256_file
from index import identity
from index.cli import main
from index.faiss_file import remove_stale
from index.identity import IndexModelMismatch, ModelIdentity
from index.reembed import embed_items
from index.schema import UPLOADS_DIR
from index.store import ImageIndex

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[1]
CIFAR = sorted((DATA / "cifar10-sample" / "train").glob("*/*.jpg"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two models under one name, version and dimension: `tiny` and a "retrained" `tiny`."""
    root = tmp_path_factory.mktemp("models")
    return write_tiny_model_dir(root / "a", seed=0), write_tiny_model_dir(root / "b", seed=1)


def _folder(dst: Path, n: int = 12) -> Path:
    for p in CIFAR[::25][:n]:
        (dst / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst / p.parent.name / p.name)
    return dst


def _build(folder: Path, out: Path, model: Path, tmp: Path, *extra: str) -> dict:
    summary = tmp / f"summary-{time.monotonic_ns()}.json"
    rc = main(["build", str(folder), "--model", str(model), "--out", str(out), "--summary", str(summary),
               "--no-progress", "--decode-workers", "2", *extra])
    assert rc == 0
    return json.loads(summary.read_text())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simsearch", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def _stored_vs_model(index_dir: Path, model: Path) -> dict[str, float]:
    """Cosine of each stored vector with `model`'s embedding of the item's file, by path."""
    with ImageIndex.open(index_dir) as ix:
        root, recs = ix.stats()["root"], ix.records()
        stored = {r.path: ix.vector(r.id) for r in recs}
    files = [Path(p) if os.path.isabs(p) else Path(root) / p for p in stored]
    fresh = Embedder(open_backend(model_dir=str(model))).embed_sources(files)
    return {p: float(v @ f) for (p, v), f in zip(stored.items(), fresh, strict=True)}


def test_fingerprint_recorded_by_export_and_computed_for_older_model_json(model_dir: Path, tmp_path: Path) -> None:
    spec = ModelSpec.load(model_dir)
    assert len(spec.fingerprint) == 64
    assert spec.fingerprint == compute_fingerprint(sha256_file(model_dir / "model.onnx"), spec)
    # a Triton client reads model.json from the served config: the fingerprint travels with it
    (config,) = (model_dir / "triton").glob("*/config.pbtxt")
    assert spec.fingerprint in config.read_text()
    # model.json without one (exported before fingerprints): the ONNX Runtime backend computes it
    tiny = write_tiny_model_dir(tmp_path / "tiny")
    old = json.loads((tiny / MODEL_JSON).read_text())
    del old["fingerprint"]
    (tiny / MODEL_JSON).write_text(json.dumps(old))
    backend = open_backend(model_dir=str(tiny))
    assert backend.spec.fingerprint == model_dir_fingerprint(tiny) == compute_fingerprint(
        hashlib.sha256((tiny / "model.onnx").read_bytes()).hexdigest(), backend.spec)
    # the same model.onnx with another resize rule gives other vectors: another fingerprint
    bicubic = dataclasses.replace(backend.spec, interpolation="bicubic")
    assert compute_fingerprint("0" * 64, bicubic) != compute_fingerprint("0" * 64, backend.spec)


def test_the_one_check() -> None:
    meta = {"model_name": "m", "model_version": 1, "dim": 8, "model_fingerprint": "a" * 64}
    same = ModelIdentity("renamed", 2, 8, "a" * 64)
    assert identity.check(meta, same) == identity.SAME  # the fingerprint decides, not the name
    with pytest.raises(IndexModelMismatch) as e:
        identity.check(meta, ModelIdentity("m", 1, 8, "b" * 64), directory="/idx")
    msg = str(e.value)
    assert "\n" not in msg and "aaaaaaaaaaaa" in msg and "bbbbbbbbbbbb" in msg
    assert "simsearch index build FOLDER --out /idx --model MODEL --reembed" in msg
    legacy = {**meta, "model_fingerprint": ""}
    assert identity.check(legacy, ModelIdentity("m", 1, 8, "b" * 64)) == identity.ADOPT
    assert identity.check(legacy, ModelIdentity("m", 1, 8, "")) == identity.UNVERIFIED
    for other in (ModelIdentity("x", 1, 8, "b" * 64), ModelIdentity("m", 1, 16, "a" * 64)):
        with pytest.raises(IndexModelMismatch):
            identity.check(legacy if other.name == "x" else meta, other)
    with pytest.raises(IndexModelMismatch, match="re-export the model"):  # Triton serving an old export
        identity.check(meta, ModelIdentity("m", 1, 8, ""))


def test_build_refuses_a_retrained_model_and_reembed_switches(models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = models
    folder, out = _folder(tmp_path / "imgs"), tmp_path / "idx"
    _build(folder, out, a, tmp_path)
    fp_a, fp_b = model_dir_fingerprint(a), model_dir_fingerprint(b)
    assert ModelSpec.load(a).name == ModelSpec.load(b).name and fp_a != fp_b

    refused = _cli("index", "build", str(folder), "--model", str(b), "--out", str(out), "--no-progress")
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert fp_a[:12] in lines[0] and fp_b[:12] in lines[0] and "--reembed" in lines[0]
    assert min(_stored_vs_model(out, a).values()) > 0.9999  # nothing was written

    summary = _build(folder, out, b, tmp_path, "--reembed")
    assert summary["reembed"]["reembedded"] == 12 and summary["reembed"]["dropped"] == []
    assert summary["reembed"]["to"]["model_fingerprint"] == fp_b and summary["embedded"] == 0
    assert min(_stored_vs_model(out, b).values()) >= 0.9999
    with ImageIndex.open(out) as ix:
        st = ix.stats()
    assert st["model_fingerprint"] == fp_b and st["vector_generation"] == 2
    assert [h["model_fingerprint"] for h in st["model_history"]] == [fp_a, fp_b]
    # now the old model is the stranger; the same --reembed again has nothing to do
    assert _cli("index", "build", str(folder), "--model", str(a), "--out", str(out)).returncode == 2
    assert _build(folder, out, b, tmp_path, "--reembed")["reembed"] == {
        "skipped": "the index already belongs to this model"}


def test_reembed_resumes_and_catches_items_added_meanwhile(models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = models
    folder, out = _folder(tmp_path / "imgs"), tmp_path / "idx"
    _build(folder, out, a, tmp_path)
    spec_a, spec_b = open_backend(model_dir=str(a)).spec, open_backend(model_dir=str(b)).spec

    # a re-embedding killed after its first committed batch (5 of 12 items)
    with ImageIndex.open(out) as ix:
        assert ix.begin_reembed(spec_b) == 0
        first = ix.reembed_pending()[:5]
        ix.stage_reembed(spec_b, embed_items(Embedder(open_backend(model_dir=str(b))), first, out, str(folder)))
    # meanwhile a server (another handle, bound to the old model) adds an upload
    server = ImageIndex.open(out)
    server.bind_model(spec_a)
    upload = out / UPLOADS_DIR / "upload.jpg"
    upload.parent.mkdir()
    shutil.copy(CIFAR[-1], upload)
    (vec,) = Embedder(open_backend(model_dir=str(a))).embed_sources([upload])
    (upload_id,) = server.add(vec[None], [{"path": str(upload), "sha256": sha256_file(upload)}])
    server.commit()

    summary = _build(folder, out, b, tmp_path, "--reembed")
    assert summary["reembed"]["resumed"] == 5 and summary["reembed"]["reembedded"] == 13
    cos = _stored_vs_model(out, b)
    assert min(cos.values()) >= 0.9999 and cos[str(upload)] >= 0.9999  # the upload too
    # the server's handle still holds the old model: its searches go on, its writes are refused
    assert server.search(vec[None], 1)[0][0].id == upload_id
    with pytest.raises(IndexModelMismatch, match="--reembed"):
        server.add(vec[None], [{"path": str(upload)}])
    with pytest.raises(IndexModelMismatch):
        server.remove([upload_id])
    assert len(server) == 13  # still the old vectors, nothing reloaded
    server.close()
    with ImageIndex.open(out) as ix:
        assert len(ix) == 13 and ix.get(upload_id) is not None


def test_reembed_drops_what_it_cannot_read_and_the_build_adds_changed_files(
        models: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = models
    folder, out = _folder(tmp_path / "imgs"), tmp_path / "idx"
    _build(folder, out, a, tmp_path)
    with ImageIndex.open(out) as ix:  # an upload whose bytes are gone
        ix.bind_model(open_backend(model_dir=str(a)).spec)
        ix.add(np.eye(1, 32, dtype=np.float32), [{"path": str(out / UPLOADS_DIR / "gone.jpg"), "sha256": "0" * 64}])
    changed = sorted(folder.glob("*/*.jpg"))[0]
    shutil.copy(CIFAR[-1], changed)  # other content under the same path

    summary = _build(folder, out, b, tmp_path, "--reembed")
    dropped = {Path(d["path"]).name: d["reason"] for d in summary["reembed"]["dropped"]}
    assert dropped == {"gone.jpg": "unreadable", changed.name: "changed"}
    assert summary["added"] == 1  # the changed file is back, as a new item with the new model's vector
    cos = _stored_vs_model(out, b)
    assert len(cos) == 12 and min(cos.values()) >= 0.9999


def test_build_into_an_index_the_server_created(models: tuple[Path, Path], tmp_path: Path) -> None:
    a, _ = models
    spec = open_backend(model_dir=str(a)).spec
    out = tmp_path / "idx"
    # what the server does: create without a folder, adopt its model, add an upload (absolute path)
    with ImageIndex.create(out, spec.embedding_dim, model_name=spec.name, model_version=spec.version) as ix:
        assert ix.bind_model(spec) == identity.ADOPT
        upload = out / UPLOADS_DIR / "u.jpg"
        upload.parent.mkdir()
        shutil.copy(CIFAR[-1], upload)
        (vec,) = Embedder(open_backend(model_dir=str(a))).embed_sources([upload])
        ix.add(vec[None], [{"path": str(upload), "sha256": sha256_file(upload)}])
    folder = _folder(tmp_path / "imgs")
    first = _build(folder, out, a, tmp_path)
    assert (first["added"], first["removed"], first["count"]) == (12, 0, 13)
    shutil.rmtree(folder / sorted(p.name for p in folder.iterdir())[0])  # files leave the folder
    second = _build(folder, out, a, tmp_path)
    assert second["removed"] >= 1 and second["count"] == 13 - second["removed"]
    with ImageIndex.open(out) as ix:
        st = ix.stats()
        assert st["root"] == str(folder.resolve()) and ix.get_by_path(str(upload)) is not None
        assert not st["model_history"][0].get("adopted")  # created by it, not adopted from an old index


def test_a_legacy_index_adopts_the_fingerprint_with_a_warning(models: tuple[Path, Path], tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    a, b = models
    spec = open_backend(model_dir=str(a)).spec
    folder, out = _folder(tmp_path / "imgs", 3), tmp_path / "idx"
    with ImageIndex.create(out, spec.embedding_dim, model_name=spec.name, model_version=spec.version,
                           root=str(folder.resolve())) as ix:  # as written before fingerprints existed
        ix.add(np.eye(1, 32, dtype=np.float32), [{"path": "x/old.jpg"}])
    _build(folder, out, a, tmp_path)
    assert "records no model fingerprint" in caplog.text
    with ImageIndex.open(out) as ix:
        st = ix.stats()
    assert st["model_fingerprint"] == spec.fingerprint and st["model_history"][0]["adopted"] is True
    assert _cli("index", "build", str(folder), "--model", str(b), "--out", str(out)).returncode == 2


def test_stale_base_files_go_but_newer_ones_and_writes_in_progress_stay(tmp_path: Path) -> None:
    for g in (3, 4, 5):
        (tmp_path / f"base.{g}.faiss").write_bytes(b"x")
        (tmp_path / f"base.{g}.ids.npy").write_bytes(b"x")
    (tmp_path / "vectors.7.faiss").write_bytes(b"x")  # format 1's per-commit cache: never used again
    crashed, writing = tmp_path / ".base.4.faiss.a.tmp", tmp_path / ".base.5.vectors.npy.b.tmp"
    crashed.write_bytes(b"half")
    writing.write_bytes(b"half")
    with open(writing, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # another process's write in progress
        remove_stale(tmp_path, keep=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        writing.name, "base.4.faiss", "base.4.ids.npy", "base.5.faiss", "base.5.ids.npy"]
