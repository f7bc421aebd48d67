"""`index build --ray`: a real two-node Ray cluster (tests/raycluster.py) embeds the shipped sample into
Parquet shards that the normal builder ingests; the result equals the single-process build, a killed
embedding actor and a killed driver cost time, not the run, and a re-run embeds nothing. Plus the
shard format, the vector source in the builder, and a build without --ray that never imports Ray.
"""

from __future__ import annotations

import hashlib
import importlib.util
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
from raycluster import LocalRayCluster, ray_env
from tinymodel import write_tiny_model_dir

from index.cli import main

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[1]
MESSY_FAILURES = {
    "messy/broken.png": "not_an_image", "messy/decompression_bomb.gif": "too_large", "messy/empty_file.jpg": "empty",
    "messy/not_an_image.png": "not_an_image", "messy/truncated_image.png": "truncated",
    "messy/truncated_jpeg.jpg": "truncated",
}
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None,
                               reason="needs the `ray` extra (pip install -e '.[ray]'; make test installs it)")


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


def _contents(out: Path) -> dict[str, np.ndarray]:
    from index.store import ImageIndex

    with ImageIndex.open(out) as ix:
        recs = ix.records()
        assert len(ix) == len(recs) == len({r.path for r in recs})  # FAISS and rows agree
        return {r.path: ix.vector(r.id) for r in recs}


def _assert_same_index(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    a = np.stack([got[p] for p in sorted(want)])
    b = np.stack([want[p] for p in sorted(want)])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999, sorted(want)[int(cos.argmin())]


def _single_process(folder: Path, model: Path, tmp: Path) -> tuple[dict, dict[str, np.ndarray]]:
    out, summary = tmp / "reference.index", tmp / "reference.json"
    assert main(["build", str(folder), "--model", str(model), "--out", str(out), "--summary", str(summary),
                 "--no-progress", "--decode-workers", "2"]) == 0
    return _summary(summary), _contents(out)


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
        _assert_same_index(_contents(out), reference)
        # the vectors are in the index now: only the failed files' rows are kept
        assert set(_shard_rows(shards)) == set(MESSY_FAILURES)

        # 3. nothing changed: nothing is embedded, no cluster needed
        assert main(["build", str(sample), "--model", str(tiny), "--out", str(out), "--summary",
                     str(tmp_path / "s3.json"), "--no-progress", "--ray", cluster.address]) == 0
        s3 = _summary(tmp_path / "s3.json")
        assert s3["ray"]["submitted"] == 0 and s3["embedded"] == 0 and s3["added"] == 0
        assert {f["path"]: f["reason"] for f in s3["failed"]} == MESSY_FAILURES
        _assert_same_index(_contents(out), reference)
    finally:
        for proc in drivers:  # a failed assertion can leave one running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        cluster.stop()


@needs_ray
def test_shards_round_trip_and_refuse_another_model_or_folder(tiny: Path, tmp_path: Path) -> None:
    import dataclasses

    from embed.spec import ModelSpec
    from index.shards import ShardSet, shard_meta, write_shard

    spec = ModelSpec.load(tiny)
    spec = dataclasses.replace(spec, fingerprint="f" * 64)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3, spec.embedding_dim)).astype(np.float32)
    cols = {"path": ["a.jpg", "b/c.png", "bad.gif"], "size": [10, 20, 30], "mtime": [1.5, 2.25, 3.0],
            "sha256": ["aa", "bb", "cc"], "width": [4, 5, 0], "height": [6, 7, 0], "vector": vectors,
            "reason": ["", "", "truncated"], "message": ["", "", "cut short"]}
    name = write_shard(tmp_path / "s", shard_meta(spec, "/root", 1000), cols)
    assert write_shard(tmp_path / "s", shard_meta(spec, "/root", 1000), cols) == name  # a retry rewrites it
    other = dataclasses.replace(spec, fingerprint="e" * 64)
    write_shard(tmp_path / "s", shard_meta(other, "/root", 1000), {**cols, "path": ["a.jpg", "x", "y"]})
    write_shard(tmp_path / "s", shard_meta(spec, "/elsewhere", 1000), {**cols, "path": ["a.jpg", "z", "w"]})

    shards = ShardSet.load(tmp_path / "s", spec, "/root")
    assert sorted(shards.rows) == ["a.jpg", "b/c.png", "bad.gif"] and len(shards.ignored) == 2
    assert shards.lookup("a.jpg", 10, 1.5).sha256 == "aa" and shards.lookup("a.jpg", 10, 1.6) is None
    np.testing.assert_array_equal(shards.vector("b/c.png"), vectors[1])
    assert shards.lookup("bad.gif", 30, 3.0).reason == "truncated"
    assert shards.settled("bad.gif", 30, 3.0, 1000) and not shards.settled("bad.gif", 30, 3.0, 2000)
    assert shards.compact(["bad.gif"], shard_meta(spec, "/root", 1000)) == {"shards_removed": 1, "failures_kept": 1}
    left = ShardSet.load(tmp_path / "s", spec, "/root")
    assert sorted(left.rows) == ["bad.gif"] and len(left.files) == 1 and len(list((tmp_path / "s").iterdir())) == 3


def test_vector_source_build_equals_the_plain_build(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder fed vectors by a source makes the same index, summary and failures as reading and
    embedding itself; a file the source does not know is embedded here."""
    from embed.backends import open_backend
    from embed.decode import DecodeError
    from embed.embedder import Embedder
    from index.builder import INGEST_COMMIT_FACTOR, BuildConfig, build_index
    from index.scan import scan_folder
    from index.vector_source import Precomputed

    folder = tmp_path / "images"
    shutil.copytree(DATA / "cifar10-sample" / "test", folder)
    for name in ["flower.jpg", "broken.png", "truncated_jpeg.jpg"]:
        shutil.copy(DATA / "messy" / name, folder / name)
    shutil.copy(DATA / "messy" / "flower.jpg", folder / "flower-copy.jpg")
    backend = open_backend(model_dir=str(tiny))
    files = scan_folder(folder)
    left = [p for p in sorted(files) if p.startswith("truck/")][:5]  # for the builder to embed itself
    known = [p for p in sorted(files) if p not in left]
    results = Embedder(backend).embed_sources([(folder / p).read_bytes() for p in known])  # as the builder

    class Source:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def lookup(self, path: str, size: int, mtime: float) -> Precomputed | None:
            if path not in known or (files[path].size, files[path].mtime) != (size, mtime):
                return None
            r = results[known.index(path)]
            sha = hashlib.sha256((folder / path).read_bytes()).hexdigest()
            if isinstance(r, DecodeError):
                return Precomputed(sha, reason=r.reason, message=r.message)
            return Precomputed(sha, 32, 32)

        def vector(self, path: str) -> np.ndarray:
            self.asked.append(path)
            return results[known.index(path)]

    source = Source()
    import index.builder as builder

    flushes: list[int] = []

    def counting_flush(index, run) -> None:
        flushes[-1] += 1
        flush(index, run)

    flush = builder._flush
    monkeypatch.setattr(builder, "_flush", counting_flush)
    summaries = []
    for out, vectors in (("a", None), ("b", source)):
        # commit_every 8: the plain build commits every 8 embedded files; the source's vectors, which
        # cost nothing to take again, commit in batches INGEST_COMMIT_FACTOR times as large
        flushes.append(0)
        cfg = BuildConfig(folder=str(folder), out=str(tmp_path / out), progress=False, commit_every=8)
        summaries.append(build_index(cfg, backend, vectors=vectors))
    plain, fed = summaries
    backend.close()
    for key in ("scanned", "added", "embedded", "skipped_duplicates", "failed"):
        assert fed[key] == plain[key], key
    # every vector but those of the five files left out came from the source
    assert fed["from_vector_source"] == len(source.asked) == plain["added"] - 5
    _assert_same_index(_contents(tmp_path / "b"), _contents(tmp_path / "a"))
    assert flushes[0] >= plain["added"] // 8, flushes
    assert flushes[1] <= 1 + -(-plain["added"] // (8 * INGEST_COMMIT_FACTOR)) < flushes[0] // 4, flushes


@needs_ray
def test_the_build_ingests_shards_while_the_stage_is_still_writing_them(tiny: Path, tmp_path: Path) -> None:
    """`LiveShards`, as `index build --ray` feeds the builder: a file still pending is waited for until
    its shard lands, so the builder commits the first shards' rows before the last one exists,
    also past a file it must read itself (its shard row is for other bytes: the file changed) in
    the first shard; a file the stage never wrote is embedded here once the stage ends; the index
    equals the plain build's. A failed stage fails the build instead of embedding everything here."""
    import sqlite3
    import threading

    from embed.backends import open_backend
    from embed.embedder import Embedder
    from index.builder import BuildConfig, build_index
    from index.scan import scan_folder
    from index.shards import LiveShards, ShardSet, shard_meta, write_shard

    folder = tmp_path / "images"
    for cls in ("cat", "dog", "ship", "truck"):
        shutil.copytree(DATA / "cifar10-sample" / "test" / cls, folder / cls)
    backend = open_backend(model_dir=str(tiny))
    root = str(folder.resolve())
    files = scan_folder(folder)
    order = list(files)  # the builder's order
    never_written = order[-7:]
    written = order[: -len(never_written)]
    chunks = [written[i : i + 40] for i in range(0, len(written), 40)]
    changed = chunks[0][5]  # its shard row says size + 1: stale, so the builder reads the file itself
    meta = shard_meta(backend.spec, root, 40_000_000)
    shard_dir, out = tmp_path / "shards", tmp_path / "live"
    committed_before_last: list[int] = []

    def stage(live: LiveShards) -> None:
        try:
            for n, chunk in enumerate(chunks):
                if n == len(chunks) - 1:  # the last shard only once the builder has committed rows past `changed`
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline and not committed_before_last:
                        try:
                            with sqlite3.connect(out / "index.sqlite") as db:
                                count = db.execute("SELECT count(*) FROM items").fetchone()[0]
                        except sqlite3.Error:
                            count = 0
                        if count > 2 * 40:
                            committed_before_last.append(count)
                        time.sleep(0.02)
                data = [(folder / p).read_bytes() for p in chunk]
                vectors = Embedder(backend).embed_sources(data)
                name = write_shard(shard_dir, meta, {
                    "path": chunk, "size": [files[p].size + (p == changed) for p in chunk],
                    "mtime": [files[p].mtime for p in chunk],
                    "sha256": [hashlib.sha256(d).hexdigest() for d in data], "width": [32] * len(chunk),
                    "height": [32] * len(chunk), "vector": np.stack(vectors), "reason": [""] * len(chunk),
                    "message": [""] * len(chunk)})
                live.landed(name)
        finally:
            live.finish()

    live = LiveShards(ShardSet.load(shard_dir, backend.spec, root), order)
    thread = threading.Thread(target=stage, args=(live,))
    thread.start()
    summary = build_index(BuildConfig(folder=str(folder), out=str(out), progress=False, commit_every=1), backend,
                          vectors=live)
    thread.join()
    assert committed_before_last and committed_before_last[0] < len(written), committed_before_last
    assert summary["added"] == summary["embedded"] == len(order) and not summary["failed"]
    assert summary["from_vector_source"] == len(written) - 1  # all but `changed`
    plain = build_index(BuildConfig(folder=str(folder), out=str(tmp_path / "plain"), progress=False), backend)
    assert plain["added"] == len(order)
    _assert_same_index(_contents(out), _contents(tmp_path / "plain"))

    failed = LiveShards(ShardSet.load(tmp_path / "none", backend.spec, root), order)
    failed.finish(ConnectionError("the cluster went away"))
    with pytest.raises(RuntimeError, match="the Ray stage failed before embedding .*the cluster went away"):
        build_index(BuildConfig(folder=str(folder), out=str(tmp_path / "failed"), progress=False), backend,
                    vectors=failed)
    backend.close()


@needs_ray
def test_a_failed_ray_stage_fails_the_build_with_its_own_error(tiny: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The builder, waiting for shards in the driver's main thread, stops when the stage's thread
    fails, and the command raises the stage's error itself (not the builder's wait)."""
    import contextlib

    import index.ray_embed as ray_embed
    from embed.backends import open_backend
    from index.builder import BuildConfig
    from index.ray_build import build_index_on_ray
    from index.ray_config import RayConfig

    def failing_stage(files: list, **kw: object) -> dict:
        time.sleep(0.2)  # the builder is waiting for the first file by now
        raise ConnectionError("the head node went away")

    monkeypatch.setattr(ray_embed, "embed_on_ray", failing_stage)
    monkeypatch.setattr(ray_embed, "ray_connected", lambda cfg: contextlib.nullcontext())
    folder = tmp_path / "images"
    shutil.copytree(DATA / "cifar10-sample" / "test" / "cat", folder)
    backend = open_backend(model_dir=str(tiny))
    try:
        with pytest.raises(ConnectionError, match="the head node went away"):
            build_index_on_ray(BuildConfig(folder=str(folder), out=str(tmp_path / "idx"), progress=False), backend,
                               {"model_dir": str(tiny)}, RayConfig())
    finally:
        backend.close()


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
