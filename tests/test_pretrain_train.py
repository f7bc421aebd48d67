"""The real `simsearch pretrain` / `simsearch eval` commands, in-process, on the shipped sample."""

import json
from pathlib import Path

import pytest
import torch

from pretrain import evaluate, train
from pretrain.checkpoint import load_checkpoint

SAMPLE = Path(__file__).parent / "data" / "cifar10-sample"
TINY = ["--arch", "smallcnn", "--width", "0.25", "--image-size", "16", "--precision", "fp32", "--no-channels-last",
        "--no-progress", "--workers", "1"]


def pretrain(out: Path, *extra: str, folder: Path = SAMPLE / "train") -> dict:
    assert train.main([str(folder), "--out", str(out), *TINY, *extra]) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.timeout(300)
def test_resume_continues_the_same_run_exactly(tmp_path):
    common = ["--max-images", "64", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "0.5", "--seed", "5"]
    straight = pretrain(tmp_path / "a", *common)
    pretrain(tmp_path / "b", *common, "--stop-after-steps", "5")
    middle = load_checkpoint(tmp_path / "b" / "last.pt")
    assert middle["step"] == 5
    assert train.main([str(SAMPLE / "train"), "--out", str(tmp_path / "b"), "--resume", "--no-progress"]) == 0
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert a["step"] == b["step"] == straight["step"] == 8
    for key in ("encoder", "head"):
        for name, tensor in a[key].items():
            assert torch.allclose(tensor.float(), b[key][name].float(), rtol=1e-4, atol=1e-6), name
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]
    assert middle["config"]["optim"] == a["config"]["optim"] and middle["config"]["model"] == a["config"]["model"]
    # the steps after the resume did change the weights
    assert any(not torch.allclose(middle["encoder"][k].float(), b["encoder"][k].float()) for k in b["encoder"])


@pytest.mark.timeout(300)
def test_short_run_lowers_the_loss_and_eval_reads_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    summary = pretrain(run, "--max-images", "256", "--batch-size", "32", "--epochs", "4", "--warmup-epochs", "0.5",
                       "--optimizer", "adamw", "--base-lr", "0.002", "--temperature", "0.2", "--log-every", "4")
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) >= 4 and losses[-1] < losses[0]
    assert (run / "config.json").is_file() and any((run / "tb").iterdir())
    assert summary["step"] == 32 and 0 < summary["aug_share"] < 1

    out = tmp_path / "eval.json"
    argv = [str(run / "last.pt"), "--train", str(SAMPLE / "train"), "--test", str(SAMPLE / "test"),
            "--probe-iters", "30", "--out", str(out), "--workers", "1"]
    assert evaluate.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n_train"] == 1500 and result["n_test"] == 500 and result["step"] == 32
    assert 0.1 < result["knn_top1"] <= 1 and 0 <= result["probe_top1"] <= 1  # better than chance (10 classes)


def test_unknown_config_key_is_an_error(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"train": {"batch_sise": 8}}))
    with pytest.raises(ValueError, match="batch_sise"):
        train.main([str(SAMPLE / "train"), "--out", str(tmp_path / "x"), "--config", str(bad)])


@pytest.mark.timeout(300)
def test_streaming_path_skips_bad_files_and_trains(tmp_path):
    messy = SAMPLE.parent / "messy"
    summary = pretrain(tmp_path / "s", "--no-in-memory", "--workers", "0", "--batch-size", "8", "--epochs", "1",
                       "--warmup-epochs", "0.5", "--log-every", "1", folder=messy)
    # 31 files listed, 6 undecodable: each one met is reported and replaced by the next good file
    assert summary["step"] == 31 // 8
    assert 1 <= summary["skipped_files"] <= 6
    assert load_checkpoint(tmp_path / "s" / "last.pt")["step"] == summary["step"]
