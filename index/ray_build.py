"""`index build --ray`: embed a folder on a Ray cluster into Parquet shards, then ingest them with
the normal builder.

1. Open (or create) the index for this folder and model as the single-process build does, so a
   wrong model or folder is refused in one line before any cluster work.
2. Scan the folder (embed/files.py: the one walk, so the same files as without --ray). The files
   to embed are those whose (path, size, mtime) neither the index nor a shard of this model has
   (index/shards.py: `ShardSet.settled`; a failed file counts as done unless its failure was
   "unreadable" or `--max-pixels` changed), or every file with `--rehash`.
3. Embed them on the cluster into the shard directory (index/ray_embed.py), in a thread of the
   driver. Not started at all when there is nothing to embed, so a re-run of an up-to-date folder
   needs no cluster.
4. Meanwhile, `build_index` with the shards as its `VectorSource` (`LiveShards`: a file still
   being embedded is waited for until its shard lands): moves, touches, duplicates, deletions,
   failures, commits and the summary are those of the single-process build; a file no shard
   knows (changed after step 2) is read and embedded on this machine, as without --ray. The
   ingestion runs while the cluster embeds, rather than after it: on a cluster the driver's
   cores are otherwise idle during the stage.
5. Unless `--keep-shards`: the shards are replaced by one holding only the failed files' rows
   (what step 2 needs next time); the vectors are in the index now.

A run killed at any point resumes: shards are whole or absent, the index commits as usual, and
step 2 skips what either holds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embed.backends.base import Backend
from index.build_lock import exclusive_build
from index.builder import BuildConfig, build_index, open_index_for
from index.ray_config import RayConfig
from index.scan import FileStat, scan_folder

if TYPE_CHECKING:  # pyarrow is the `ray` extra's
    from embed.spec import ModelSpec
    from index.shards import ShardSet

logger = logging.getLogger(__name__)

SHARD_SUBDIR = "shards"


def default_shard_dir(index_dir: str | os.PathLike[str]) -> Path:
    return Path(index_dir) / SHARD_SUBDIR


def build_index_on_ray(cfg: BuildConfig, backend: Backend, model_source: dict[str, Any],
                       ray_cfg: RayConfig) -> dict[str, Any]:
    """Bring the index at `cfg.out` up to date with `cfg.folder`, embedding on Ray; returns the
    builder's summary with a "ray" section for the Ray stage. The build lock is held throughout
    (index/build_lock.py): no other build adds the same files while the stage embeds them."""
    missing = [m for m in ("ray", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"--ray needs {', '.join(missing)}: pip install 'simsearch[ray]' (the `ray` extra)")
    spec = backend.spec
    if not spec.fingerprint:
        raise ValueError(f"model {spec.name!r} v{spec.version} has no fingerprint (exported before fingerprints "
                         "existed): shards must name their model, so re-export it to use --ray")
    if cfg.reembed:
        raise ValueError("--ray does not re-embed an index of another model yet: run --reembed without --ray")
    with exclusive_build(cfg.out):
        return _build_on_ray(cfg, backend, model_source, ray_cfg)


def _build_on_ray(cfg: BuildConfig, backend: Backend, model_source: dict[str, Any], ray_cfg: RayConfig) -> dict[str, Any]:
    from index.ray_embed import embed_on_ray
    from index.shards import ShardSet, shard_meta

    start = time.monotonic()
    spec = backend.spec
    root = str(Path(cfg.folder).resolve())
    index, _ = open_index_for(cfg, spec)
    try:
        indexed = {f.path: (f.size, f.mtime) for f in index.files() if not os.path.isabs(f.path)}
    finally:
        index.close()
    shard_dir = Path(ray_cfg.shard_dir) if ray_cfg.shard_dir else default_shard_dir(cfg.out)
    meta = shard_meta(spec, root, cfg.max_pixels)
    on_disk = scan_folder(root, cfg.extensions, index_dir=cfg.out)
    shards = ShardSet.load(shard_dir, spec, root)
    todo: list[tuple[str, int, float]] = []
    in_index = in_shards = 0
    for p, s in on_disk.items():
        if cfg.rehash:
            todo.append((p, s.size, s.mtime))
        elif indexed.get(p) == (s.size, s.mtime):
            in_index += 1
        elif shards.settled(p, s.size, s.mtime, cfg.max_pixels):
            in_shards += 1
        else:
            todo.append((p, s.size, s.mtime))
    logger.info("%d files: %d to embed on Ray, %d unchanged in the index, %d done in shards", len(on_disk),
                len(todo), in_index, in_shards)
    if todo:
        stage = _embed_while_ingesting(todo, shards, cfg, backend, model_source, ray_cfg, root=root, spec=spec,
                                       meta=meta, shard_dir=shard_dir, on_disk=on_disk)
        summary = stage.pop("build")
    else:  # nothing to embed: no cluster needed
        stage = embed_on_ray(todo, root=root, shard_dir=shard_dir, spec=spec, model_source=model_source, meta=meta,
                             cfg=ray_cfg, batch_size=cfg.batch_size, max_pixels=cfg.max_pixels, progress=False)
        summary = build_index(cfg, backend, model_source, vectors=shards, on_disk=on_disk)
    stage.update(unchanged_in_index=in_index, done_in_shards=in_shards, shard_dir=str(shard_dir),
                 shards_ignored=shards.ignored)
    if not ray_cfg.keep_shards and shards.files:
        still_failing = {f["path"] for f in summary["failed"]}
        keep = [p for p in still_failing if p in shards.rows and shards.rows[p].known.failed]
        stage["compacted"] = shards.compact(keep, meta)
    summary["ray"] = stage
    elapsed = time.monotonic() - start
    summary.update(elapsed_s=round(elapsed, 3),
                   images_per_s=round(summary["embedded"] / elapsed, 2) if elapsed > 0 else 0.0)
    return summary


def _embed_while_ingesting(todo: list[tuple[str, int, float]], shards: ShardSet, cfg: BuildConfig, backend: Backend,
                           model_source: dict[str, Any], ray_cfg: RayConfig, *, root: str, spec: ModelSpec,
                           meta: dict[str, Any], shard_dir: Path, on_disk: dict[str, FileStat]) -> dict[str, Any]:
    """Steps 3 and 4 at once: the Ray stage in a thread of its own, the builder in this one taking each
    shard as it lands (`LiveShards`). Returns the stage's summary with the builder's under "build"."""
    from index.ray_embed import embed_on_ray, ray_connected
    from index.shards import LiveShards, StageFailed

    live = LiveShards(shards, (p for p, _, _ in todo))
    outcome: dict[str, Any] = {}

    def stage() -> None:
        try:
            outcome["stage"] = embed_on_ray(
                todo, root=root, shard_dir=shard_dir, spec=spec, model_source=model_source, meta=meta, cfg=ray_cfg,
                batch_size=cfg.batch_size, max_pixels=cfg.max_pixels,
                progress=False,  # the builder's bar counts the files as their shards land
                on_shard=live.landed)
        except BaseException as e:
            outcome["error"] = e
            live.finish(e)
        else:
            live.finish()

    with ray_connected(ray_cfg):  # ray.init in this thread; shut down after the stage's thread is done
        thread = threading.Thread(target=stage, name="simsearch-ray-stage", daemon=True)
        thread.start()
        try:
            build = build_index(cfg, backend, model_source, vectors=live, on_disk=on_disk)
        except BaseException as e:
            # the stage is abandoned (Ray shuts down on the way out); its shards so far serve the next run
            thread.join(timeout=1.0)
            if isinstance(e, StageFailed) and "error" in outcome:
                raise outcome["error"] from None  # the stage's own error, as without the overlap
            raise
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return {**outcome["stage"], "build": build}
