"""`index build --ray`: a real two-node Ray cluster (tests/raycluster.py) embeds the shipped sample into
Parquet shards that the normal builder ingests; the result equals the single-process build, a killed
embedding actor and a killed driver cost time, not the run, and a re-run embeds nothing. Plus
the Ray stage's flags, and a build without --ray that never imports Ray. The shards and their
ingestion without a cluster: tests/test_shard_ingest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from raycluster import LocalRayCluster, assert_same_index, index_vectors, needs_ray, ray_env
from tinymodel import write_tiny_model_dir

from index.cli import main

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[1]
MESSY_FAILURES = {
    "messy/broken.png": "not_an_image", "messy/decompression_bomb.gif": "too_large", "messy/empty_file.jpg": "empty",
    "messy/not_an_image.png": "not_an_image", "messy/truncated_image.png": "truncated",
    "messy/truncated_jpeg.jpg": "truncated",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped CIFAR-10 sample (2,000 JPEGs) plus the messy folder (formats, failures, copies)."""
    folder = tmp_path_factory.mktemp("sample") / "images"
    shutil.copytree(DATA / "cifar10-sample", folder)
    shutil.copytree(DATA / "messy", folder / "messy")
    return folder


def _summary(path: Path) -> dict:
    return json.loads(path.read_text())


def _single_process(folder: Path, model: Path, tmp: Path) -> tuple[dict, dict[str, np.ndarray]]:
    out, summary = tmp / "reference.index", tmp / "reference.json"
    assert main(["build", str(folder), "--model", str(model), "--out", str(out), "--summary", str(summary),
                 "--no-progress", "--decode-workers", "2"]) == 0
    return _summary(summary), index_vectors(out)


def _shard_rows(shard_dir: Path) -> dict[str, tuple]:
    import pyarrow.parquet as pq

    rows: dict[str, tuple] = {}
    for p in sorted(shard_dir.glob("shard-*.parquet")):
        t = pq.read_table(p, columns=["path", "size", "mtime", "reason"]).to_pydict()
        rows.update({path: (s, m, r) for path, s, m, r in zip(t["path"], t["size"], t["mtime"], t["reason"], strict=True)})
    return rows


def _ray_build(folder: Path, model: Path, out: Path, summary: Path, log: Path, address: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "index.cli", "build", str(folder), "--model", str(model), "--out", str(out),
           "--summary", str(summary), "--no-progress", "--batch-size", "16",
           "--ray-files-per-task", "32", "--ray", address, "--ray-actors", "1",
           "--ray-actor-resources", '{"worker2": 1}', *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=ray_env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait(proc: subprocess.Popen, log: Path, timeout_s: float = 400) -> None:
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the Ray build did not finish in {timeout_s} s:\n{log.read_text()[-4000:]}") from None
    assert rc == 0, log.read_text()[-4000:]


@needs_ray
@pytest.mark.slow
def test_ray_cluster_build_equals_single_process_survives_kills_and_resumes(tiny: Path, sample: Path,
                                                                           tmp_path: Path) -> None:
    ref_summary, reference = _single_process(sample, tiny, tmp_path)
    n_files = ref_summary["scanned"]
    assert {f["path"]: f["reason"] for f in ref_summary["failed"]} == MESSY_FAILURES
    out, shards, log = tmp_path / "ray.index", tmp_path / "ray.index" / "shards", tmp_path / "ray-build.log"
    cluster = LocalRayCluster(head_cpus=1, worker_cpus=1, worker_resources={"worker2": 1}).start()
    drivers: list[subprocess.Popen] = []
    try:
        # 1. the driver is killed (kill -9) once the first shard is written: whole shards stay, no index rows
        first = _ray_build(sample, tiny, out, tmp_path / "s1.json", log, cluster.address, "--ray-decode", "actors")
        drivers.append(first)
        deadline = time.monotonic() + 300
        while not list(shards.glob("shard-*.parquet")) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, f"the first build ended before it could be killed:\n{log.read_text()[-3000:]}"
        first.send_signal(signal.SIGKILL)
        first.wait()
        time.sleep(3)  # Ray ends the dead driver's workers; a writer it killed left only a hidden temporary file
        done_before = _shard_rows(shards)
        assert 0 < len(done_before) < n_files

        # 2. the same command resumes; its embedding actor (on the second node) is killed mid-run
        # small decoding tasks: the run lasts long enough for the actor to be found while it works
        second = _ray_build(sample, tiny, out, tmp_path / "s2.json", log, cluster.address, "--ray-decode", "tasks",
                            "--ray-files-per-task", "16")
        drivers.append(second)
        victim = None
        deadline = time.monotonic() + 300
        while victim is None and second.poll() is None and time.monotonic() < deadline:
            alive = cluster.actors("EmbedActor", state="ALIVE")
            victim = alive[0] if alive else None
            time.sleep(0.2)
        assert victim is not None and second.poll() is None, log.read_text()[-3000:]
        os.kill(victim.pid, signal.SIGSTOP)  # frozen: nothing more is embedded until it is gone
        rows_at_kill = len(_shard_rows(shards))
        assert second.poll() is None and rows_at_kill < n_files  # mid-run, by construction
        os.kill(victim.pid, signal.SIGKILL)
        _wait(second, log)
        restarted = [a for a in cluster.actors("EmbedActor") if a.actor_id == victim.actor_id]
        assert restarted and int(restarted[0].num_restarts) >= 1

        s2 = _summary(tmp_path / "s2.json")
        assert s2["ray"]["nodes"] == 2
        # resumed: the first run's shards (and any its dying workers finished) were not embedded again
        assert s2["ray"]["done_in_shards"] >= len(done_before)
        assert s2["ray"]["submitted"] + s2["ray"]["done_in_shards"] == n_files
        assert s2["ray"]["decode"] == "tasks"
        assert {f["path"]: f["reason"] for f in s2["failed"]} == MESSY_FAILURES
        assert sorted(d["path"] for d in s2["skipped_duplicates"]) == sorted(
            d["path"] for d in ref_summary["skipped_duplicates"])
        assert s2["added"] == ref_summary["added"] == s2["from_vector_source"]
        assert_same_index(index_vectors(out), reference)
        # the vectors are in the index now: only the failed files' rows are kept
        assert set(_shard_rows(shards)) == set(MESSY_FAILURES)

        # 3. nothing changed: nothing is embedded, no cluster needed
        assert main(["build", str(sample), "--model", str(tiny), "--out", str(out), "--summary",
                     str(tmp_path / "s3.json"), "--no-progress", "--ray", cluster.address]) == 0
        s3 = _summary(tmp_path / "s3.json")
        assert s3["ray"]["submitted"] == 0 and s3["embedded"] == 0 and s3["added"] == 0
        assert {f["path"]: f["reason"] for f in s3["failed"]} == MESSY_FAILURES
        assert_same_index(index_vectors(out), reference)
    finally:
        for proc in drivers:  # a failed assertion can leave one running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.stop()


def test_a_build_without_ray_imports_neither_ray_nor_pyarrow(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    shutil.copytree(DATA / "cifar10-sample" / "test" / "cat", folder)
    code = ("import sys; from index.cli import main; "
            f"rc = main(['build', {str(folder)!r}, '--model', {str(tiny)!r}, '--out', {str(tmp_path / 'idx')!r}, "
            f"'--summary', {str(tmp_path / 's.json')!r}, '--no-progress']); "
            "bad = sorted(m for m in ('ray', 'pyarrow', 'pandas') if m in sys.modules); "
            "print('loaded:', bad); sys.exit(rc or (3 if bad else 0))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert _summary(tmp_path / "s.json")["added"] == len(list(folder.glob("*.jpg")))


def test_ray_flags_need_ray(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["build", str(tmp_path), "--model", str(tiny), "--out", str(tmp_path / "idx"), "--shard-dir", "x",
               "--ray-actors", "2"])
    assert rc == 2 and "--shard-dir, --ray-actors only apply with --ray" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


@needs_ray
def test_ray_refuses_reembed_before_any_cluster_work(tiny: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["build", str(tmp_path), "--model", str(tiny), "--out", str(tmp_path / "idx"), "--reembed",
               "--ray", "127.0.0.1:1"])  # nothing listens there: refused before connecting
    assert rc == 2 and "--ray does not re-embed" in capsys.readouterr().err


@needs_ray
def test_actor_plan_follows_the_cluster() -> None:
    from index.ray_config import RayConfig
    from index.ray_embed import ActorPlan, plan_actors

    # GPUs: one actor per GPU (or per gpus_per_actor), decoding in tasks on the CPUs
    assert plan_actors({"CPU": 64, "GPU": 4}, RayConfig()) == ActorPlan(4, 1.0, 1.0, False)
    assert plan_actors({"CPU": 64, "GPU": 4}, RayConfig(gpus_per_actor=0.5)) == ActorPlan(8, 1.0, 0.5, False)
    # CPUs only: each actor decodes its own files, one actor per cpus_per_actor CPUs
    assert plan_actors({"CPU": 16}, RayConfig()) == ActorPlan(16, 1.0, 0.0, True)
    assert plan_actors({"CPU": 16}, RayConfig(cpus_per_actor=4)) == ActorPlan(4, 4, 0.0, True)
    # decoding in tasks on CPUs: half of what one decoding task leaves
    assert plan_actors({"CPU": 16}, RayConfig(decode="tasks")) == ActorPlan(7, 1.0, 0.0, False)
    assert plan_actors({"CPU": 2}, RayConfig(decode="tasks")) == ActorPlan(1, 1.0, 0.0, False)
    assert plan_actors({"CPU": 2}, RayConfig(actors=3)).actors == 3  # asked for: warned, not refused
