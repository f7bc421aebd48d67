"""The settings of `index build --ray` and their command-line flags (no Ray import here: the flags
must cost nothing to a build without --ray)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

DECODE_PLACES = ("auto", "actors", "tasks")


@dataclass
class RayConfig:
    """How the Ray stage of `index build --ray` runs (index/ray_embed.py, index/ray_build.py)."""

    address: str | None = None  # None: ray.init()'s default (RAY_ADDRESS, a local `ray start`, else a new local Ray)
    shard_dir: str | None = None  # None: INDEX/shards
    actors: int = 0  # embedding actors; 0: one per GPU (gpus_per_actor) with GPUs, else one per cpus_per_actor CPUs
    cpus_per_actor: float = 1.0  # also ONNX Runtime's intra-op threads in a CPU actor (rounded, at least 1)
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    actor_resources: dict[str, float] = field(default_factory=dict)  # custom resources each actor needs
    decode: str = "auto"  # where files are read and decoded: "tasks" apart from the actors, or in "actors"
    decode_cpus: float = 1.0  # CPUs one read-and-decode task reserves (decode="tasks")
    files_per_task: int = 256  # files per input block: one decoding task, one actor call, one shard
    keep_shards: bool = False  # keep every shard after ingestion (else only the failures' rows are kept)

    def __post_init__(self) -> None:
        if self.actors < 0 or self.cpus_per_actor < 0 or self.decode_cpus <= 0:
            raise ValueError("--ray-actors and --ray-cpus-per-actor must be >= 0, --ray-decode-cpus > 0")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError("--ray-gpus-per-actor must be >= 0")
        if self.files_per_task < 1:
            raise ValueError("--ray-files-per-task must be >= 1")
        if self.decode not in DECODE_PLACES:
            raise ValueError(f"--ray-decode {self.decode!r} is not one of {DECODE_PLACES}")


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed embedding on Ray (needs the `ray` extra; docs/distributed.md)")
    g.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="embed on a Ray cluster into Parquet shards, then ingest them: ADDRESS is HOST:PORT of "
                   "the head, `auto`, or ray://HOST:10001; without it, RAY_ADDRESS, else a cluster `ray start` "
                   "started on this machine, else a new local Ray")
    g.add_argument("--shard-dir", default=None, help="where the shards go (shared storage on a cluster); "
                   "default: INDEX/shards")
    g.add_argument("--keep-shards", action="store_true",
                   help="keep every shard after the index ingested it (default: keep only the failed files' rows)")
    g.add_argument("--ray-actors", type=int, default=0,
                   help="embedding actors; 0: one per --ray-gpus-per-actor GPUs when the cluster has GPUs, else one "
                   "per --ray-cpus-per-actor CPUs (minus the decoding tasks' with --ray-decode tasks)")
    g.add_argument("--ray-cpus-per-actor", type=float, default=1.0,
                   help="CPUs per embedding actor (ONNX Runtime threads on a CPU actor)")
    g.add_argument("--ray-gpus-per-actor", type=float, default=None,
                   help="GPUs per embedding actor; default 1 when the cluster has GPUs, else 0")
    g.add_argument("--ray-actor-resources", type=json.loads, default={}, metavar="JSON",
                   help='custom Ray resources each actor needs, e.g. \'{"worker2": 1}\' to pin actors to nodes')
    g.add_argument("--ray-decode", choices=DECODE_PLACES, default="auto",
                   help="read and decode files in separate Ray tasks that feed the actors (`tasks`: GPU actors stay "
                   "busy) or inside each actor (`actors`: no pixels cross processes, best on CPUs); auto: tasks "
                   "when the actors have GPUs")
    g.add_argument("--ray-decode-cpus", type=float, default=1.0, help="CPUs per read-and-decode task")
    g.add_argument("--ray-files-per-task", type=int, default=256,
                   help="files per input block (one decoding task, one actor call, one shard); smaller when "
                   "that leaves fewer than four blocks per actor")


# the flags above other than --ray, with their defaults: given without --ray they would do nothing
_RAY_ONLY = {"shard_dir": None, "keep_shards": False, "ray_actors": 0, "ray_cpus_per_actor": 1.0,
             "ray_gpus_per_actor": None, "ray_actor_resources": {}, "ray_decode": "auto", "ray_decode_cpus": 1.0,
             "ray_files_per_task": 256}


def ray_config_from_args(args: argparse.Namespace) -> RayConfig | None:
    """The RayConfig the flags ask for, or None without --ray."""
    if args.ray is None:
        given = ["--" + k.replace("_", "-") for k, default in _RAY_ONLY.items() if getattr(args, k) != default]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --ray")
        return None
    resources: Any = args.ray_actor_resources
    if not isinstance(resources, dict) or not all(isinstance(v, int | float) for v in resources.values()):
        raise ValueError(f"--ray-actor-resources must be a JSON object of numbers, got {resources!r}")
    return RayConfig(
        address=args.ray or None, shard_dir=args.shard_dir, actors=args.ray_actors,
        cpus_per_actor=args.ray_cpus_per_actor, gpus_per_actor=args.ray_gpus_per_actor,
        actor_resources={str(k): float(v) for k, v in resources.items()}, decode=args.ray_decode,
        decode_cpus=args.ray_decode_cpus,
        files_per_task=args.ray_files_per_task, keep_shards=args.keep_shards,
    )
