"""Exporting over an existing model directory: readers see the old model or the new one, whole."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from export_checkpoints import make_checkpoint

from embed.spec import MODEL_JSON, MODEL_ONNX, ModelSpec
from export import ExportError, export_model

# stdlib only, so it starts fast: resolve the link once, then check that model.json describes the
# model.onnx beside it (its recorded sha256) and that the Triton copy is the same file
READER = r"""
import hashlib, json, os, sys, time
model, stop = sys.argv[1], sys.argv[2]
seen, errors, n = set(), [], 0
while True:
    last = os.path.exists(stop)  # one full read after the last export has been published
    try:
        real = os.path.realpath(model)
        spec = json.load(open(os.path.join(real, "model.json")))
        onnx = open(os.path.join(real, "model.onnx"), "rb").read()
        if hashlib.sha256(onnx).hexdigest() != spec["extra"]["files_sha256"]["model.onnx"]:
            errors.append(f"{real}: model.onnx does not match model.json")
        triton = os.path.join(real, "triton", spec["name"], str(spec["version"]), "model.onnx")
        if open(triton, "rb").read() != onnx:
            errors.append(f"{real}: triton copy differs")
        seen.add(spec["checkpoint_sha256"])
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
    n += 1
    if last:
        break
print(json.dumps({"iterations": n, "errors": errors[:5], "seen": sorted(seen)}))
"""


def _export(ckpt: Path, out: Path) -> ModelSpec:
    return export_model(ckpt, out, exporter="torchscript", verify_limit=4,
                        verify_images=[Path(__file__).parent / "data" / "cifar10-sample" / "test"])


def test_concurrent_reader_sees_old_or_new_whole(tmp_path: Path) -> None:
    out = tmp_path / "model"
    checkpoints = [make_checkpoint(tmp_path / f"c{i}.pt", seed=10 + i) for i in range(3)]
    shas = {_export(checkpoints[0], out).checkpoint_sha256}
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        for ckpt in checkpoints[1:]:
            shas.add(_export(ckpt, out).checkpoint_sha256)
    finally:
        stop.touch()
        stdout, _ = reader.communicate(timeout=60)
    report = json.loads(stdout)
    assert report["errors"] == []
    assert report["iterations"] >= 3
    assert set(report["seen"]) <= shas and len(shas) == 3
    assert {_sha(checkpoints[0]), _sha(checkpoints[2])} <= set(report["seen"])
    assert ModelSpec.load(out).checkpoint_sha256 == _sha(checkpoints[2])
    # the current and the previous version are kept, older ones are removed
    assert out.is_symlink()
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".model.v-")]) == 2


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_over_a_real_directory(tmp_path: Path) -> None:
    first = tmp_path / "first"
    _export(make_checkpoint(tmp_path / "a.pt", seed=1), first)
    out = tmp_path / "model"
    shutil.copytree(first, out)  # a plain directory, e.g. copied from another machine
    ckpt = make_checkpoint(tmp_path / "b.pt", seed=2)
    spec = _export(ckpt, out)
    assert out.is_symlink() and ModelSpec.load(out) == spec
    assert spec.checkpoint_sha256 == _sha(ckpt)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith(".model.v-") and p.name.endswith("-old")]
    assert len(kept) == 1 and (kept[0] / MODEL_ONNX).is_file()


def test_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"not really")
    with pytest.raises(ExportError, match="not a model directory"):
        _export(make_checkpoint(tmp_path / "a.pt"), out)
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]
    assert not (out / MODEL_JSON).exists()
