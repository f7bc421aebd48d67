"""`simsearch export`: the happy path in-process, and one-line errors with exit code 2."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from export_checkpoints import make_checkpoint
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from embed.spec import MODEL_ONNX, ModelSpec
from export.cli import main
from pretrain.checkpoint import save_checkpoint
from pretrain.models import ARCHS, ModelConfig


def _run_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_exports_and_prints_a_json_summary(tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "c.pt")
    out = tmp_path / "m"
    rc = main([str(ckpt), "--out", str(out), "--name", "tiny", "--version", "3", "--exporter", "torchscript",
               "--triton-cpu", "--max-batch-size", "16", "--verify-images", "tests/data/messy", "-q"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    spec = ModelSpec.load(out)
    assert (summary["name"], summary["version"], spec.name, spec.version) == ("tiny", 3, "tiny", 3)
    assert summary["parity"]["fp32"]["worst_cosine"] >= 0.9999
    config = text_format.Parse((out / "triton" / "tiny" / "config.pbtxt").read_text(), pb.ModelConfig())
    assert config.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
    assert not config.HasField("optimization") and config.max_batch_size == 16
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert (out / "triton" / "tiny" / "3" / MODEL_ONNX).is_file()


def test_missing_checkpoint(tmp_path: Path, capsys) -> None:
    err = _run_error([str(tmp_path / "nope.pt"), "--out", str(tmp_path / "m")], capsys)
    assert "not found" in err and "nope.pt" in err


@pytest.mark.parametrize("content", ["text", "foreign"])
def test_not_our_checkpoint(tmp_path: Path, capsys, content: str) -> None:
    path = tmp_path / "other.pt"
    if content == "text":
        path.write_text("hello")
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    err = _run_error([str(path), "--out", str(tmp_path / "m")], capsys)
    assert "simsearch-simclr-checkpoint" in err
    assert not (tmp_path / "m").exists()


def test_unknown_architecture(tmp_path: Path, capsys) -> None:
    model = asdict(ModelConfig(arch="smallcnn"))
    model["arch"] = "vgg11"
    path = save_checkpoint({"config": {"model": model, "data": {"image_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3}},
                            "encoder": {}, "head": {}, "step": 0}, tmp_path / "vgg.pt")
    err = _run_error([str(path), "--out", str(tmp_path / "m")], capsys)
    assert "vgg11" in err and all(a in err for a in ARCHS)


def test_weights_that_do_not_fit_the_architecture(tmp_path: Path, capsys) -> None:
    ckpt = torch.load(make_checkpoint(tmp_path / "c.pt"), weights_only=True)
    ckpt["config"]["model"]["width"] = 0.5
    path = save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "format_version")}, tmp_path / "w.pt")
    err = _run_error([str(path), "--out", str(tmp_path / "m")], capsys)
    assert "do not fit" in err


def test_bad_triton_option(tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "c.pt")
    err = _run_error([str(ckpt), "--out", str(tmp_path / "m"), "--name", "bad name!"], capsys)
    assert "bad name!" in err


def test_default_verification_images_come_from_the_training_config(tmp_path: Path, capsys) -> None:
    ckpt = torch.load(make_checkpoint(tmp_path / "c.pt"), weights_only=True)
    messy = str(Path(__file__).parent / "data" / "messy")
    ckpt["config"]["train"] = {"val_test": messy}
    path = save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "format_version")}, tmp_path / "v.pt")
    assert main([str(path), "--out", str(tmp_path / "m"), "--exporter", "torchscript", "--no-triton", "-q"]) == 0
    images = ModelSpec.load(tmp_path / "m").parity["images"]
    assert images["sources"] == [messy] and images["real"] > 10
    assert not (tmp_path / "m" / "triton").exists()


def _checkpoint_with(tmp_path: Path, name: str, **sections: dict) -> Path:
    """make_checkpoint's weights with extra config entries, e.g. data={"folder": ...}."""
    ckpt = torch.load(make_checkpoint(tmp_path / "c.pt"), weights_only=True)
    for section, values in sections.items():
        ckpt["config"].setdefault(section, {}).update(values)
    return save_checkpoint({k: v for k, v in ckpt.items() if k not in ("format", "format_version")}, tmp_path / name)


def test_the_training_folder_is_the_default_verification_set(tmp_path: Path) -> None:
    cifar = str(Path(__file__).parent / "data" / "cifar10-sample" / "test")
    messy = str(Path(__file__).parent / "data" / "messy")
    path = _checkpoint_with(tmp_path, "f.pt", data={"folder": cifar}, train={"val_test": messy})
    assert main([str(path), "--out", str(tmp_path / "m"), "--exporter", "torchscript", "--no-triton",
                 "--verify-limit", "20", "-q"]) == 0
    images = ModelSpec.load(tmp_path / "m").parity["images"]
    assert images["sources"] == [cifar] and images["real"] == 20 and images["synthetic"] == 4


def test_export_refuses_without_real_images(tmp_path: Path, capsys) -> None:
    # no --verify-images and a config that names no image folder: no synthetic-only fallback
    err = _run_error([str(make_checkpoint(tmp_path / "c.pt")), "--out", str(tmp_path / "m")], capsys)
    assert "no images to verify" in err and "--verify-images" in err
    # a training folder that is not on this machine is named in the message
    gone = _checkpoint_with(tmp_path, "g.pt", data={"folder": "/data/moved-away"})
    err = _run_error([str(gone), "--out", str(tmp_path / "m")], capsys)
    assert "data.folder=/data/moved-away (not found)" in err and "--verify-images" in err
    assert not (tmp_path / "m").exists()


def test_export_refuses_when_no_verification_image_decodes(tmp_path: Path, capsys) -> None:
    messy = Path(__file__).parent / "data" / "messy"
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("broken.png", "empty_file.jpg", "not_an_image.png"):
        (bad / name).write_bytes((messy / name).read_bytes())
    (bad / "notes.txt").write_text("not an image, not even tried")
    ckpt = str(make_checkpoint(tmp_path / "c.pt"))
    err = _run_error([ckpt, "--out", str(tmp_path / "m"), "--verify-images", str(bad)], capsys)
    assert "none of the 3 image files could be decoded" in err and "--verify-images" in err
    (tmp_path / "empty").mkdir()
    err = _run_error([ckpt, "--out", str(tmp_path / "m"), "--verify-images", str(tmp_path / "empty")], capsys)
    assert "no image files found" in err
    err = _run_error([ckpt, "--out", str(tmp_path / "m"), "--verify-images", str(tmp_path / "nowhere")], capsys)
    assert "not found" in err and "nowhere" in err
    assert not (tmp_path / "m").exists()
