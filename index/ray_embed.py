"""The Ray stage of `index build --ray`: image files -> embedding shards, on a Ray cluster.

A Ray Data pipeline over blocks of `files_per_task` files:

1. **read and decode**: read the file, stat it, sha256 the bytes, and turn them into the model's
   uint8 pixels with `embed.preprocess.load_image_array`, the same function and resize rule as
   every other caller (so the same pixels as the single-process build). A file that cannot be read
   or decoded becomes a row with its reason. With GPU actors these are tasks of their own
   (`decode_cpus` each, spread over the nodes) that keep the GPUs fed; on CPUs only, each actor
   decodes its own batches (`plan_actors`).
2. **embed and write** (an actor pool): each actor opens the model once — ONNX Runtime on a copy
   of the model directory's files, shipped through Ray's object store so that only the driver
   needs the directory (CUDA/TensorRT when the actor has a GPU and onnxruntime-gpu is installed),
   or a Triton server — and checks its fingerprint. Per block it embeds in batches of
   `batch_size` and writes the block's rows as one Parquet shard (index/shards.py), atomically.
   (A separate writing operator would cost a worker process of its own, whose start on a busy
   node delays the end of a run by seconds, and a copy of every vector through the object store.)

The driver only lists the files to do (the caller decides which: index/ray_build.py) and counts
what the actors report. Every node must see the folder and the shard directory at the same path:
shared storage. Ray restarts a dead actor and retries its blocks, and retries a task whose worker
died, so a killed worker costs time, not the run; a retried block rewrites the same shard.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embed.decode import DecodeError
from embed.preprocess import ResizeRule, load_image_array
from embed.spec import ModelSpec
from index.ray_config import RayConfig
from index.shards import write_shard

logger = logging.getLogger(__name__)


def read_and_decode(batch: dict[str, np.ndarray], *, root: str, rule: ResizeRule, max_pixels: int) -> dict[str, Any]:
    """Ray Data batch {path, size, mtime} -> the rows of a shard without vectors, plus `pixels`."""
    n = len(batch["path"])
    out: dict[str, Any] = {
        "path": np.asarray(batch["path"], dtype=object), "size": np.asarray(batch["size"], dtype=np.int64).copy(),
        "mtime": np.asarray(batch["mtime"], dtype=np.float64).copy(), "sha256": np.full(n, "", dtype=object),
        "width": np.zeros(n, np.int32), "height": np.zeros(n, np.int32),
        "reason": np.full(n, "", dtype=object), "message": np.full(n, "", dtype=object),
        "pixels": np.zeros((n, rule.height, rule.width, 3), np.uint8),
    }
    for i, rel in enumerate(out["path"]):
        path = os.path.join(root, rel)
        try:
            with open(path, "rb") as f:
                data = f.read()
            st = os.stat(path)  # after reading, as the builder does: the bytes are at least this new
        except OSError as e:
            out["reason"][i], out["message"][i] = "unreadable", f"{rel}: {e.strerror or e}"
            continue
        out["size"][i], out["mtime"][i] = st.st_size, st.st_mtime
        out["sha256"][i] = hashlib.sha256(data).hexdigest()
        try:
            pixels, (width, height) = load_image_array(data, rule, max_pixels=max_pixels)
        except DecodeError as e:
            out["reason"][i], out["message"][i] = e.reason, e.message
            continue
        out["pixels"][i] = pixels
        out["width"][i], out["height"][i] = width, height
    return out


def model_payload(model_source: dict[str, Any]) -> dict[str, Any]:
    """What an actor needs to open the model: a model directory's top-level files (their bytes), or
    the Triton address. Symlinked model directories (export's publish) are resolved once here."""
    if model_source.get("model_dir"):
        resolved = Path(model_source["model_dir"]).resolve()
        return {"files": {p.name: p.read_bytes() for p in sorted(resolved.iterdir()) if p.is_file()}}
    return {"triton_url": model_source["triton_url"], "protocol": model_source.get("protocol", "grpc"),
            "model_name": model_source.get("model_name")}


class EmbedActor:
    """One model instance in the actor pool: a block of rows with pixels in (or, with `decode`, the
    files' rows, read and decoded here first), one shard written, its name and counts out."""

    def __init__(self, model: Any, fingerprint: str, batch_size: int, intra_op_threads: int,
                 shard_dir: str, meta: dict[str, Any], decode: dict[str, Any] | None = None) -> None:
        import ray

        from embed.backends import BackendError, open_backend

        if isinstance(model, ray.ObjectRef):  # put once by the driver, fetched by each actor
            model = ray.get(model)
        if "files" in model:
            self._dir = tempfile.TemporaryDirectory(prefix="simsearch-model-")
            for name, data in model["files"].items():
                Path(self._dir.name, name).write_bytes(data)
            self.backend = open_backend(model_dir=self._dir.name, intra_op_threads=intra_op_threads,
                                        max_batch_size=batch_size)
        else:
            self.backend = open_backend(triton_url=model["triton_url"], protocol=model["protocol"],
                                        model_name=model["model_name"], max_batch_size=batch_size)
        if self.backend.spec.fingerprint != fingerprint:
            raise BackendError(f"the model this actor opened has fingerprint {self.backend.spec.fingerprint[:12]}…, "
                               f"the driver's has {fingerprint[:12]}…: not the same model")
        self.shard_dir, self.meta, self.decode = shard_dir, meta, decode
        logger.info("embedding actor pid %d on %s", os.getpid(), self.backend)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.decode is not None:
            batch = read_and_decode(batch, **self.decode)
        ok = np.asarray(batch["reason"], dtype=object) == ""
        vectors = np.zeros((len(ok), self.backend.spec.embedding_dim), np.float32)
        if ok.any():
            vectors[ok] = self.backend.embed(np.asarray(batch["pixels"])[ok])
        rows = {k: v for k, v in batch.items() if k != "pixels"}
        rows["vector"] = vectors
        name = write_shard(self.shard_dir, self.meta, rows)
        return {"shard": np.array([name], dtype=object), "rows": np.array([len(ok)]),
                "failed": np.array([int(np.count_nonzero(~ok))])}


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    decode_in_actors: bool


def plan_actors(resources: dict[str, float], cfg: RayConfig) -> ActorPlan:
    """How many embedding actors, with what, and where decoding runs, for a cluster with these totals.

    GPUs in the cluster: one actor per `gpus_per_actor` (default 1) GPUs, fed by decoding tasks on
    the CPUs. CPUs only: each actor decodes its own files (no pixels cross processes, and decoding
    and inference share the actor's CPUs in whatever ratio the images need), one actor per
    `cpus_per_actor` CPUs; with decode="tasks", the CPUs left after one decoding task are split
    half and half between actors and decoding.
    """
    gpus, cpus = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
    in_actors = cfg.decode == "actors" or (cfg.decode == "auto" and gpa == 0)
    cpa = max(cfg.cpus_per_actor, 1e-9)
    if cfg.actors:
        actors = cfg.actors
    elif gpa > 0:
        actors = max(1, int(gpus // gpa))
    elif in_actors:
        actors = max(1, int(cpus // cpa))
    else:
        actors = max(1, int((cpus - cfg.decode_cpus) / 2 // cpa))
    need_cpus = actors * cfg.cpus_per_actor + (0 if in_actors else cfg.decode_cpus)
    if need_cpus > cpus or actors * gpa > gpus:
        # An autoscaling cluster may grow into it; a fixed one waits forever (e.g. actors holding every
        # CPU so that no decoding task can start), hence the warning rather than a refusal.
        logger.warning("%d actors x (%g CPU, %g GPU)%s exceed the cluster's %g CPU, %g GPU: the run waits until "
                       "the cluster has them", actors, cfg.cpus_per_actor, gpa,
                       "" if in_actors else f" + {cfg.decode_cpus:g} CPU per decoding task", cpus, gpus)
    return ActorPlan(actors, cfg.cpus_per_actor, gpa, in_actors)


@contextlib.contextmanager
def ray_connected(cfg: RayConfig) -> Iterator[None]:
    """Connected to the cluster `cfg.address` inside (unless already): `ray.init` from the thread that
    enters, so that `embed_on_ray` may run in another."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def embed_on_ray(files: list[tuple[str, int, float]], *, root: str, shard_dir: str | os.PathLike[str],
                 spec: ModelSpec, model_source: dict[str, Any], meta: dict[str, Any], cfg: RayConfig,
                 batch_size: int, max_pixels: int, progress: bool,
                 on_shard: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Embed `files` ((relative path, size, mtime) under `root`) on the Ray cluster `cfg.address`
    into shards under `shard_dir`; returns the stage's summary. `on_shard(name)` is called with each
    shard as it lands (in the calling thread)."""
    import ray

    start = time.monotonic()
    summary: dict[str, Any] = {"address": cfg.address or "default", "submitted": len(files), "embedded": 0,
                               "failed": 0, "shards_written": 0, "elapsed_s": 0.0, "images_per_s": 0.0}
    if not files:  # nothing to do: no cluster needed
        return summary
    with ray_connected(cfg):
        resources = {k: float(v) for k, v in ray.cluster_resources().items()}
        plan = plan_actors(resources, cfg)
        summary.update(nodes=sum(1 for n in ray.nodes() if n.get("Alive")),
                       cluster={k: resources[k] for k in ("CPU", "GPU") if k in resources}, actors=plan.actors,
                       cpus_per_actor=plan.cpus_per_actor, gpus_per_actor=plan.gpus_per_actor,
                       decode="actors" if plan.decode_in_actors else "tasks")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        if not progress:  # the builder's own bar counts the files: Ray's notice that its bars are off is not news
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        ctx.print_on_execution_start = False
        # A block goes to one task or actor whole: at least four per actor, so that a small run
        # still spreads over every actor. from_items builds the blocks here (from_arrow would run
        # a remote task per block for its metadata).
        blocks = max(-(-len(files) // cfg.files_per_task), min(len(files), 4 * plan.actors))
        ds = ray.data.from_items([{"path": p, "size": s, "mtime": m} for p, s, m in files],
                                 override_num_blocks=blocks)
        decode = {"root": root, "rule": ResizeRule.of(spec), "max_pixels": max_pixels}
        with warnings.catch_warnings():
            # Ray Data fuses a task operator into the next actor operator when their resources and
            # scheduling strategies agree: a strategy of their own keeps the decoding tasks apart
            # (and spreads them over the nodes). Ray 2.64 drops scheduling_strategy as a keyword
            # (deprecated since 2.60, hence the filter); the `ray` extra pins 2.60.
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            if not plan.decode_in_actors:
                ds = ds.map_batches(read_and_decode, batch_size=None, batch_format="numpy", num_cpus=cfg.decode_cpus,
                                    fn_kwargs=decode, scheduling_strategy="SPREAD")
            ds = ds.map_batches(
                EmbedActor, batch_size=None, batch_format="numpy",  # a block per call: one shard each
                compute=ray.data.ActorPoolStrategy(size=plan.actors),
                fn_constructor_kwargs={
                    "model": ray.put(model_payload(model_source)), "fingerprint": spec.fingerprint,
                    "batch_size": batch_size, "intra_op_threads": max(1, round(plan.cpus_per_actor)),
                    "shard_dir": str(shard_dir), "meta": meta, "decode": decode if plan.decode_in_actors else None},
                num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
                resources=dict(cfg.actor_resources) or None, scheduling_strategy="DEFAULT")
        first: tuple[float, int] | None = None  # when the first shard came back, and its rows
        for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if on_shard is not None:
                for name in out["shard"]:
                    on_shard(str(name))
            summary["shards_written"] += len(out["shard"])
            summary["failed"] += int(out["failed"].sum())
            summary["embedded"] += int(out["rows"].sum() - out["failed"].sum())
            if first is None:
                first = (time.monotonic(), int(out["rows"].sum()))
        end = time.monotonic()
        elapsed = end - start
        summary.update(elapsed_s=round(elapsed, 3), images_per_s=round(len(files) / elapsed, 2))
        if first is not None:
            # start-up (connecting, actors loading the model, the first shard) apart from the steady
            # rate, which is what each added machine multiplies
            summary["first_shard_s"] = round(first[0] - start, 3)
            if end > first[0] and len(files) > first[1]:
                summary["steady_images_per_s"] = round((len(files) - first[1]) / (end - first[0]), 2)
        return summary

