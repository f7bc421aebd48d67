"""The Parquet shards of `index build --ray` and their ingestion, without a cluster: the shard format
and which shards a build may take, the builder fed by a vector source (the same index as reading
and embedding itself, in larger commits), the builder ingesting shards while the stage still
writes them (`LiveShards`), and a failed stage's error. The cluster itself: tests/test_ray_embed.py.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from raycluster import assert_same_index, index_vectors, needs_ray
from tinymodel import write_tiny_model_dir

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


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
    assert_same_index(index_vectors(tmp_path / "b"), index_vectors(tmp_path / "a"))
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
    assert_same_index(index_vectors(out), index_vectors(tmp_path / "plain"))

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
    fails, and the command raises the stage's error itself (not the builder's wait). The folder is
    walked once, for the stage and the builder both."""
    import contextlib

    import embed.files
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
    walks: list[object] = []
    walk = embed.files.walk_images
    monkeypatch.setattr(embed.files, "walk_images", lambda *a, **kw: walks.append(a[0]) or walk(*a, **kw))
    folder = tmp_path / "images"
    shutil.copytree(DATA / "cifar10-sample" / "test" / "cat", folder)
    backend = open_backend(model_dir=str(tiny))
    try:
        with pytest.raises(ConnectionError, match="the head node went away"):
            build_index_on_ray(BuildConfig(folder=str(folder), out=str(tmp_path / "idx"), progress=False), backend,
                               {"model_dir": str(tiny)}, RayConfig())
        assert len(walks) == 1
    finally:
        backend.close()
