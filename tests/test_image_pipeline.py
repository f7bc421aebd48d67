"""One image pipeline: the pixels and vectors of training time are the served model's.

A checkpoint whose BatchNorm statistics are calibrated on real images (so its features tell images
apart: a freshly initialised encoder maps every image to nearly the same vector and would hide any
pixel difference) is exported by the real `simsearch export` with no --verify-images (it verifies on
the training folder its config names), evaluated by the real `simsearch eval --features-out`,
indexed by a `simsearch index build` process and served by a `simsearch serve` process. The folder
is the messy corpus plus CIFAR images, with the walk's special cases (hidden, upper-case, symlinks).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from export_checkpoints import make_checkpoint
from serverkit import REPO, LiveServer, clean_env

from embed.backends.onnxruntime import OnnxRuntimeBackend
from embed.decode import DecodeError
from embed.embedder import Embedder
from embed.files import walk_images
from embed.preprocess import load_image_array
from embed.spec import ModelSpec
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.data import StreamingImageFolder, load_folder, training_rule
from pretrain.evaluate import load_encoder

DATA = Path(__file__).parent / "data"
SIZE = 40  # CIFAR's 32 px are scaled up and the messy photos down: the resize rule matters
MIN_COS = 0.9999


def _reason(failure: str) -> str:
    return failure.split(":", 1)[0]


def _calibrated_checkpoint(path: Path, folder: Path) -> Path:
    """make_checkpoint's encoder with BatchNorm statistics measured on real images, trained on `folder`."""
    ckpt = load_checkpoint(make_checkpoint(path, arch="smallcnn", width=0.25, image_size=SIZE, seed=5))
    encoder = load_encoder(ckpt, torch.device("cpu"))
    images = load_folder(DATA / "cifar10-sample" / "train", SIZE, max_images=300, progress=False).images
    mean = torch.tensor(ckpt["config"]["data"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(ckpt["config"]["data"]["std"]).view(1, 3, 1, 1)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the calibration batch
    encoder.train()
    with torch.no_grad():
        encoder((images.float() / 255 - mean) / std)
    ckpt["encoder"] = encoder.state_dict()
    ckpt["config"]["data"]["folder"] = str(folder)
    return save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "format_version")}, path)


def _corpus(root: Path) -> Path:
    corpus = root / "corpus"
    shutil.copytree(DATA / "messy", corpus / "messy")
    (corpus / "cifar").mkdir()
    for p in sorted((DATA / "cifar10-sample" / "test").glob("*/*.jpg"))[::50]:
        shutil.copy(p, corpus / "cifar" / f"{p.parent.name}-{p.name}")
    shutil.copy(DATA / "messy" / "flower.jpg", corpus / "messy" / "FLOWER-UPPER.JPG")
    shutil.copy(DATA / "messy" / "flower.jpg", corpus / "messy" / ".hidden.jpg")
    shutil.copy(DATA / "messy" / "flower.jpg", corpus / "messy" / "._flower.jpg")
    outside = root / "outside"
    outside.mkdir()
    shutil.copy(DATA / "messy" / "hopper_orientation_6.jpg", outside / "rotated.jpg")
    os.symlink(outside, corpus / "linked")
    os.symlink(corpus / "messy" / "hopper.webp", corpus / "cifar" / "link-to-hopper.webp")
    return corpus


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from export.cli import main as export_main
    from pretrain.evaluate import main as eval_main

    root = tmp_path_factory.mktemp("pipeline")
    corpus = _corpus(root)
    ckpt = _calibrated_checkpoint(root / "ckpt.pt", corpus)
    model_dir = root / "model"
    assert export_main([str(ckpt), "--out", str(model_dir), "--exporter", "torchscript", "--no-triton",
                        "--verify-limit", "1000", "-q"]) == 0
    features = root / "features.npz"
    assert eval_main([str(ckpt), "--train", str(corpus), "--test", str(corpus), "--probe-iters", "0",
                      "--device", "cpu", "--out", str(root / "eval.json"), "--features-out", str(features)]) == 0
    npz = np.load(features)
    return {"root": root, "corpus": corpus, "ckpt": ckpt, "model_dir": model_dir, "spec": ModelSpec.load(model_dir),
            "eval_paths": [Path(p) for p in npz["train_paths"]], "eval_features": npz["train_features"]}


def test_the_export_records_the_training_rule(pipeline: dict[str, Any]) -> None:
    spec = pipeline["spec"]
    rule = training_rule(SIZE)
    assert (spec.resize_mode, spec.resize_size, spec.interpolation, spec.input_size) == (
        rule.mode, rule.resize_size, rule.interpolation, (rule.height, rule.width))
    assert spec.interpolation == "bicubic"


def test_eval_features_are_the_served_models_vectors(pipeline: dict[str, Any]) -> None:
    paths, features = pipeline["eval_paths"], pipeline["eval_features"]
    assert len(paths) > 30
    backend = OnnxRuntimeBackend(pipeline["model_dir"])
    try:
        served = Embedder(backend).embed_sources(paths)  # the indexer's and the server's code path
        assert not [p for p, v in zip(paths, served, strict=True) if isinstance(v, DecodeError)]
        cos = (features * np.stack(served)).sum(1)
        worst = int(np.argmin(cos))
        assert cos.min() >= MIN_COS, f"{paths[worst]}: eval feature vs served vector cos {cos[worst]:.6f}"
        # the bound can fail: the features tell images apart, and serving with the old default rule
        # (bilinear) instead of the training rule moves some vectors below it
        sims = features @ features.T
        assert (sims.sum() - len(sims)) / (len(sims) ** 2 - len(sims)) < 0.99
        bilinear = dataclasses.replace(pipeline["spec"], interpolation="bilinear")
        moved = backend.embed(np.stack([load_image_array(p, bilinear)[0] for p in paths]))
        assert (features * moved).sum(1).min() < MIN_COS
    finally:
        backend.close()


def test_a_messy_folder_through_every_path(pipeline: dict[str, Any]) -> None:
    corpus, spec, root = pipeline["corpus"], pipeline["spec"], pipeline["root"]
    listed = [f.rel for f in walk_images(corpus).files]
    assert "messy/FLOWER-UPPER.JPG" in listed and "linked/rotated.jpg" in listed
    assert "cifar/link-to-hopper.webp" in listed and not [r for r in listed if "/." in r]

    # pretraining, in memory: every listed file is either kept or a per-file failure with a reason
    data = load_folder(corpus, spec.input_height, progress=False)
    kept = [p.relative_to(corpus).as_posix() for p in data.paths]
    failed = {Path(p).relative_to(corpus).as_posix(): _reason(r) for p, r in data.failures}
    assert sorted(kept + list(failed)) == listed
    assert failed == {"messy/broken.png": "not_an_image", "messy/decompression_bomb.gif": "too_large",
                      "messy/empty_file.jpg": "empty", "messy/not_an_image.png": "not_an_image",
                      "messy/truncated_image.png": "truncated", "messy/truncated_jpeg.jpg": "truncated"}
    # ... and the training pixels are the pixels every later stage computes from model.json
    for path, image in zip(data.paths, data.images, strict=True):
        assert torch.equal(image, torch.from_numpy(np.array(load_image_array(path, spec)[0])).permute(2, 0, 1)), path

    # pretraining, streaming: the same pixels, the same failures
    stream = StreamingImageFolder(corpus, spec.input_height)
    by_path = {p: i for i, p in enumerate(data.paths)}
    for i, path in enumerate(stream.listing.paths):
        image, _ = stream[i]
        if path.relative_to(corpus).as_posix() in kept:
            assert torch.equal(image, data.images[by_path[path]]), path
    assert {Path(p).relative_to(corpus).as_posix() for p in stream.failures} == set(failed)

    # export verification (on the training folder from the checkpoint's config): the same files
    images = spec.parity["images"]
    assert images["sources"] == [str(corpus)]
    assert (images["real"], images["skipped"]) == (len(kept), len(failed))

    # a `simsearch index build` process: the same files scanned, the same failures
    summary_file = root / "build.json"
    env = clean_env(PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-m", "simsearch", "index", "build", str(corpus), "--model", str(pipeline["model_dir"]),
                    "--out", str(root / "index"), "--summary", str(summary_file), "--no-progress"],
                   check=True, env=env, cwd=root, timeout=300, capture_output=True)
    summary = json.loads(summary_file.read_text())
    assert summary["scanned"] == len(listed)
    assert {f["path"]: f["reason"] for f in summary["failed"]} == failed
    duplicates = [d["path"] for d in summary["skipped_duplicates"]]
    assert summary["added"] + len(duplicates) == len(kept)

    # a `simsearch serve` process on that index: uploads decode like everything else, and every
    # vector (uploaded or indexed) is the eval feature of its file
    eval_feature = dict(zip(pipeline["eval_paths"], pipeline["eval_features"], strict=True))
    with LiveServer(pipeline["model_dir"], root / "index", root / "serve.log") as server, httpx.Client(
            base_url=server.url, timeout=30) as client:
        for rel in listed:
            body = (corpus / rel).read_bytes()
            r = client.post("/v1/embed", files=[("files", (Path(rel).name, body))])
            if rel in failed:
                assert r.status_code >= 400 and r.json()["reason"] == failed[rel], (rel, r.text)
                continue
            assert r.status_code == 200, (rel, r.text)
            vector = np.asarray(r.json()["results"][0]["embedding"], dtype=np.float32)
            assert float(vector @ eval_feature[corpus / rel]) >= MIN_COS, rel
            hits = client.post("/v1/search", files=[("file", (Path(rel).name, body))], data={"k": "1"}).json()
            assert hits["neighbours"][0]["score"] >= MIN_COS, (rel, hits)


@pytest.mark.parametrize("name", ["flower.jpg", "hopper_orientation_6.jpg", "hopper_bw_500.png", "tiny.png"])
def test_the_training_rule_is_torchvisions_resize_and_centre_crop(name: str) -> None:
    from torchvision import transforms as tv

    from embed.decode import decode_image
    from pretrain.data import load_resized

    rule = training_rule(SIZE)
    assert rule.draft_size == (SIZE, SIZE)
    decoded = decode_image(DATA / "messy" / name, draft_size=rule.draft_size)
    want = tv.Compose([tv.Resize(SIZE, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(SIZE)])(decoded)
    got = load_resized(DATA / "messy" / name, SIZE)
    assert got.shape == (SIZE, SIZE, 3) and got.flags.writeable
    assert np.array_equal(got, np.asarray(want))


def test_a_bad_rule_names_the_valid_choices() -> None:
    from embed.preprocess import ResizeRule

    with pytest.raises(ValueError, match="bilinear.*bicubic.*nearest"):
        ResizeRule(32, 32, interpolation="lanczos")
    with pytest.raises(ValueError, match="shorter_side_center_crop.*stretch"):
        ResizeRule(32, 32, mode="pad")
    wide = ResizeRule(20, 30, resize_size=24)
    assert wide.draft_size == (30, 24) and ResizeRule.of(wide) is wide
