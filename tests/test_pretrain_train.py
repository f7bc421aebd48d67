"""The real `simsearch pretrain` / `simsearch eval` commands, in-process, on the shipped sample; the loop's stop plan."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain import evaluate, train
from pretrain.build import StepLayout
from pretrain.checkpoint import load_checkpoint
from pretrain.config import PretrainConfig, TrainConfig
from pretrain.schedule import WarmupCosine
from pretrain.step import SLOW_RANK_ENV, injected_delay
from pretrain.stopping import StopPlan

ROOT = Path(__file__).resolve().parents[1]
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
    # the folder trained on is recorded: export verifies on its images by default
    assert json.loads((run / "config.json").read_text())["data"]["folder"] == str((SAMPLE / "train").resolve())
    assert summary["step"] == 32 and 0 < summary["aug_share"] < 1

    out = tmp_path / "eval.json"
    argv = [str(run / "last.pt"), "--train", str(SAMPLE / "train"), "--test", str(SAMPLE / "test"),
            "--probe-iters", "30", "--out", str(out), "--workers", "1"]
    assert evaluate.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n_train"] == 1500 and result["n_test"] == 500 and result["step"] == 32
    assert 0.1 < result["knn_top1"] <= 1 and 0 <= result["probe_top1"] <= 1  # better than chance (10 classes)


def test_a_wrong_input_is_one_line_and_exit_2_not_a_traceback(tmp_path, capsys):
    """What the user named is wrong: the folder, the config, the batch for the folder, the checkpoint."""
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"train": {"batch_sise": 8}}))
    (tmp_path / "empty").mkdir()
    few = tmp_path / "few"
    few.mkdir()
    for i in range(5):
        (few / f"{i}.jpg").write_bytes((SAMPLE / "train" / "cat" / f"{i:04d}.jpg").read_bytes())
    out = ["--out", str(tmp_path / "x")]
    for argv, says in [
        ([str(SAMPLE / "train"), *out, "--config", str(bad)], "unknown key(s) ['batch_sise'] in config section 'train'"),
        ([str(tmp_path / "missing"), *out], f"image folder not found: {tmp_path / 'missing'}"),
        ([str(tmp_path / "empty"), *out], "no image files"),
        ([str(bad), *out], "is not a directory"),
        ([str(few), *out, *TINY], "5 images are fewer than one batch of 256: pass --batch-size 4 or fewer"),
    ]:
        assert train.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("simsearch pretrain: error: ") and says in err[0], (argv, err)
    assert not (tmp_path / "x" / "last.pt").exists()
    argv = [str(tmp_path / "none.pt"), "--train", str(few), "--test", str(few)]
    assert evaluate.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"simsearch eval: error: checkpoint not found: {tmp_path / 'none.pt'}"


@pytest.mark.timeout(300)
def test_streaming_path_skips_bad_files_and_trains(tmp_path):
    messy = SAMPLE.parent / "messy"
    summary = pretrain(tmp_path / "s", "--no-in-memory", "--workers", "0", "--batch-size", "8", "--epochs", "1",
                       "--warmup-epochs", "0.5", "--log-every", "1", folder=messy)
    # 31 files listed, 6 undecodable: each one met is reported and replaced by the next good file
    assert summary["step"] == 31 // 8
    assert 1 <= summary["skipped_files"] <= 6
    assert load_checkpoint(tmp_path / "s" / "last.pt")["step"] == summary["step"]


@pytest.mark.timeout(300)
def test_ctrl_c_stops_after_a_whole_step_with_a_checkpoint_and_resume_goes_on(tmp_path):
    """Ctrl-C sent to the whole process group, as a terminal does (the streaming path's decoding
    workers get it too): exit 130 with one line saying how to go on, a checkpoint of the step reached."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pretrain.train", str(SAMPLE / "train"), "--out", str(out), *TINY,
           "--batch-size", "32", "--epochs", "50", "--log-every", "1", "--no-in-memory", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").stat().st_size) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["stop_reason"] == "interrupted" and 1 <= summary["step"] < 50 * (1500 // 32)
    said = [line for line in stderr.splitlines() if line.startswith("simsearch pretrain:")]
    assert said == [f"simsearch pretrain: interrupted at step {summary['step']}; checkpoint {out / 'last.pt'} saved: "
                    f"run `simsearch pretrain {SAMPLE / 'train'} --out {out} --resume` to continue"], stderr
    assert "Traceback" not in stderr
    assert load_checkpoint(out / "last.pt")["step"] == summary["step"]
    resumed = subprocess.run([*cmd[:4], "--out", str(out), "--resume", "--stop-after-steps", str(summary["step"] + 2),
                              "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == summary["step"] + 2


def test_a_global_batch_the_processes_do_not_divide_names_the_nearest_that_work():
    cfg = PretrainConfig().updated({"train": {"batch_size": 8}})
    assert StepLayout.of(cfg, 64, 2).local_batch == 4
    with pytest.raises(ValueError, match=r"global batch.*3 processes; use a multiple of 3, e.g. 6 or 9"):
        StepLayout.of(cfg, 64, 3)


def test_stop_plan_one_process_stops_at_the_first_step_that_ends_past_the_budget():
    t = TrainConfig(time_budget_min=0.01, epochs=100)  # 0.6 s, a schedule far longer
    plan = StopPlan(t, WarmupCosine(2, 10**6), adaptive=False, first_step=0, device=torch.device("cpu"))
    step, before, after = 0, [], []
    while plan.stop_reason(step) is None:
        time.sleep(0.05)
        step += 1
        before.append(time.monotonic())
        plan.after_step(step)  # reads the clock between `before` and `after`
        after.append(time.monotonic())
    assert plan.stop_reason(step) == "time_budget" and plan.stop_at == step
    assert before[-2] < plan.deadline <= after[-1]  # the step before the last still ended inside the budget
    plan.close()


def test_stop_plan_lays_the_cosine_out_over_the_rest_of_the_budget_at_each_log_point():
    schedule = WarmupCosine(2, 10**9)
    t = TrainConfig(time_budget_min=0.01, epochs=0, log_every=2)  # 0.6 s
    plan = StopPlan(t, schedule, adaptive=True, first_step=0, device=torch.device("cpu"))
    step = 0
    while plan.stop_reason(step) is None:
        time.sleep(0.05)
        step += 1
        plan.after_step(step)
        if step == 2:  # at >= 0.05 s per step, at most (0.6 - 0.1) / 0.05 = 10 steps fit in the rest of the budget
            assert 1 <= schedule.total_steps - step <= 10
    assert plan.stop_reason(step) == "time_budget" and step in (schedule.total_steps, plan.stop_at)
    plan.close()


def test_stop_plan_without_a_budget_stops_at_the_schedule_end_or_stop_after_steps():
    plan = StopPlan(TrainConfig(stop_after_steps=3), WarmupCosine(1, 5), adaptive=False, first_step=0,
                    device=torch.device("cpu"))
    assert [plan.stop_reason(s) for s in range(4)] == [None, None, None, "stop_after_steps"]
    plan = StopPlan(TrainConfig(), WarmupCosine(1, 5), adaptive=False, first_step=0, device=torch.device("cpu"))
    assert plan.stop_reason(4) is None and plan.stop_reason(5) == "epochs"


def test_slow_rank_variable_is_checked():
    os.environ[SLOW_RANK_ENV] = "1:0.25"
    try:
        assert injected_delay(1) == 0.25 and injected_delay(0) == 0.0
        os.environ[SLOW_RANK_ENV] = "0.25"
        with pytest.raises(ValueError, match="expected RANK:SECONDS"):
            injected_delay(0)
    finally:
        del os.environ[SLOW_RANK_ENV]
