"""Load test of `simsearch serve`: concurrent single-image clients against two references.

    python bench/serve_load.py                          # fresh ResNet-18 (CIFAR stem, 32 px), 1/8/32 clients
    python bench/serve_load.py --arch smallcnn2         # the model `make demo` trains on a CPU
    python bench/serve_load.py --arch smallcnn2 --image-size 64 --images PHOTOS   # its photo preset
    python bench/serve_load.py --workers 2              # `simsearch serve --workers 2`
    python bench/serve_load.py --model MODEL_DIR        # a given model directory
    python bench/serve_load.py --seconds 5 --clients 1,32 --endpoint search

In one run on this machine:
1. raw ONNX Runtime throughput (images/s) of the same model directory at batch sizes 1..64,
   already-decoded arrays, one calling thread: the best batch size is the model's ceiling;
2. the in-process limit: decode + preprocess + ONNX Runtime in one process with the server's
   threads (`--decode-workers` decoding threads, the same ORT threads, batches of `--batch-size`;
   `embed.Embedder`, what `index build` runs), from the same JPEG bytes the clients send, no HTTP:
   what the server could deliver if HTTP cost nothing;
3. a real server (`python -m simsearch serve`, `--workers` processes) over a small index, and for
   1, 8 and 32 concurrent clients, each sending one image per request (multipart, keep-alive)
   for `--seconds` (at most `--max-requests`): requests/s, p50, p99, server CPU per request (all
   its processes), the mean model batch, and how the requests spread over the workers.
goal: at 32 clients the server delivers >= 80% of the in-process limit (issue 12).

Every figure is printed with the machine's load average: on a shared machine the figures are
only comparable within one run. The clients are a minimal HTTP/1.1 keep-alive client on asyncio
streams (like `wrk`, the request bytes are built once) in this process, on the same cores as
the server (`--load-generator wrk` runs wrk instead, a C load generator that needs about half the
CPU per request). The 32-client level runs `--rounds` times, interleaved with measurements of the
in-process limit: the ratios are to the mean of all of them. Prints each figure, then one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from load_clients import multipart_request, run_level, run_level_wrk, wrk_script  # noqa: E402

from embed.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from embed.embedder import Embedder  # noqa: E402
from embed.preprocess import load_image_array  # noqa: E402
from embed.spec import ModelSpec  # noqa: E402

log = logging.getLogger("serve_load")
CIFAR = Path("/tmp/cifar/cifar10/test")
SAMPLE = ROOT / "tests" / "data" / "cifar10-sample" / "test"


def export_fresh(work: Path, arch: str, image_size: int = 32) -> Path:
    """A freshly initialised encoder (CIFAR stem), width 1: resnet18, or smallcnn2 (the model `make
    demo` trains on a CPU: simsearch/demo.py's preset, 32 px for tiny images, 64 px for photos).
    Speed does not depend on training."""
    from export_checkpoints import make_checkpoint

    from export import export_model

    out = work / f"{arch}-{image_size}px-model"
    if (out / "model.json").is_file():
        return out
    ckpt = make_checkpoint(work / f"{arch}-{image_size}.pt", arch=arch, width=1.0, image_size=image_size,
                           cifar_stem=True)
    export_model(ckpt, out, exporter="torchscript", verify_limit=8, triton=None, verify_images=[SAMPLE])
    return out


def image_files(limit: int, folder: Path | None = None) -> list[Path]:
    """The JPEGs the clients send and the index holds: `folder` (recursive), else CIFAR-10's test
    set when extracted, else the shipped sample."""
    if folder is not None:
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:limit]
    folder = CIFAR if CIFAR.is_dir() else SAMPLE
    return sorted(folder.glob("*/*.jpg"))[:limit]


def build_index(model_dir: Path, index_dir: Path, files: list[Path], threads: int) -> None:
    from index.store import ImageIndex

    backend = OnnxRuntimeBackend(model_dir, intra_op_threads=threads)
    spec = backend.spec
    vecs, records = [], []
    for path, vec, size in Embedder(backend, batch_size=64).iter_embed(files):
        if isinstance(vec, np.ndarray) and size is not None:
            vecs.append(vec)
            records.append({"path": str(path), "width": size[0], "height": size[1], "metadata": {}})
    backend.close()
    with ImageIndex.create(index_dir, spec.embedding_dim, model_name=spec.name, model_version=spec.version) as idx:
        idx.add(np.stack(vecs), records)
        idx.commit()


def raw_ort(model_dir: Path, files: list[Path], threads: int, batch_sizes: list[int], seconds: float) -> dict[int, float]:
    """Images/s of backend.embed on decoded arrays, per batch size."""
    backend = OnnxRuntimeBackend(model_dir, intra_op_threads=threads, max_batch_size=max(batch_sizes))
    spec = backend.spec
    arrays = np.stack([load_image_array(p, spec)[0] for p in files[:max(batch_sizes)]])
    out = {}
    for bs in batch_sizes:
        batch = arrays[:bs]
        backend.embed(batch)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            backend.embed(batch)
            n += bs
        out[bs] = n / (time.perf_counter() - t0)
        print(f"raw onnxruntime  batch {bs:>3}: {out[bs]:8.1f} images/s", flush=True)
    backend.close()
    return out


def inprocess_limit(model_dir: Path, datas: list[bytes], threads: int, batch_size: int, decode_workers: int,
                    seconds: float) -> tuple[float, float]:
    """(images/s, CPU ms per image) of decode + preprocess + ONNX Runtime on `datas`, no HTTP."""
    backend = OnnxRuntimeBackend(model_dir, intra_op_threads=threads, max_batch_size=batch_size)
    embedder = Embedder(backend, batch_size=batch_size, decode_workers=decode_workers)
    list(embedder.iter_embed(datas[: 2 * batch_size]))  # warm-up
    n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _, vec, _ in embedder.iter_embed(datas):
            assert isinstance(vec, np.ndarray)
            n += 1
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    backend.close()
    return n / elapsed, 1000 * cpu / n


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc): the server's supervisor and its workers."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            todo.extend(int(c) for c in task.read_text().split())
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and its descendants (Linux /proc)."""
    total = 0.0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # exited meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def batch_totals(port: int, workers: int) -> tuple[float, float]:
    """(images, model calls) so far, summed over the workers' /metrics (a new connection lands on any
    worker: ask until `workers` different ones have answered)."""
    import httpx

    seen: dict[str, tuple[float, float]] = {}
    for _ in range(50 * workers):
        with httpx.Client(timeout=10) as c:
            r = c.get(f"http://127.0.0.1:{port}/metrics")
        values = {ln.split()[0]: float(ln.split()[1]) for ln in r.text.splitlines()
                  if ln.startswith(("simsearch_batch_size_sum", "simsearch_batch_size_count"))}
        seen[r.headers.get("x-simsearch-worker", "?")] = (
            values.get("simsearch_batch_size_sum", 0.0), values.get("simsearch_batch_size_count", 0.0))
        if len(seen) >= workers:
            break
    return sum(v[0] for v in seen.values()), sum(v[1] for v in seen.values())


def combine_rounds(rounds: list[dict[str, Any]], limits: list[float]) -> dict[str, Any]:
    """One level's figures from its rounds: requests over seconds, CPU per request over all of them,
    the worst p99; `round_of_limit`: each round against the mean of the limits measured around it."""
    n = sum(r["requests"] for r in rounds)
    seconds = sum(r["seconds"] for r in rounds)

    def per_request(key: str) -> float:
        return sum(r[key] * r["requests"] for r in rounds) / max(n, 1)

    workers: dict[int, int] = {}
    for r in rounds:
        for i, k in enumerate(r["by_worker"]):
            workers[i] = workers.get(i, 0) + k
    return {
        "clients": rounds[0]["clients"], "requests": n, "errors": sum(r["errors"] for r in rounds),
        "seconds": round(seconds, 2), "rps": n / seconds, "p50_ms": float(np.median([r["p50_ms"] for r in rounds])),
        "p99_ms": max(r["p99_ms"] for r in rounds), "by_worker": [workers[i] for i in sorted(workers)],
        "server_cpu_ms_per_request": per_request("server_cpu_ms_per_request"),
        "client_cpu_ms_per_request": per_request("client_cpu_ms_per_request"),
        "mean_batch": float(np.mean([r["mean_batch"] for r in rounds])), "load": rounds[-1]["load"],
        "round_rps": [round(r["rps"], 1) for r in rounds],
        "round_of_limit": [r["rps"] / ((a + b) / 2) for r, a, b in zip(rounds, limits, limits[1:], strict=False)],
    }


def load_average() -> float:
    return round(os.getloadavg()[0], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: export a fresh --arch encoder)")
    p.add_argument("--arch", choices=("resnet18", "smallcnn2"), default="resnet18",
                   help="the fresh encoder to export when --model is not given (smallcnn2: the demo's CPU model)")
    p.add_argument("--image-size", type=int, default=32,
                   help="input size of the fresh encoder (the demo's CPU preset: 32 for tiny images, 64 for photos)")
    p.add_argument("--images", type=Path, default=None,
                   help="folder of JPEGs the clients send (default: CIFAR-10 test when extracted, else the shipped sample)")
    p.add_argument("--workdir", type=Path, help="where the model and index go (default: a temporary folder)")
    p.add_argument("--index-size", type=int, default=1000, help="images in the served index")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--rounds", type=int, default=3,
                   help="the 32-client level is measured this many times, each after an in-process limit measurement "
                   "(and one more limit at the end): the machine's speed drifts, so the two are interleaved")
    p.add_argument("--load-generator", choices=("python", "wrk"), default="python",
                   help="python: the asyncio keep-alive clients in this process; wrk: the C load generator (must be on "
                   "PATH; ~0.04 ms of CPU per request against the Python clients' ~0.1 on the server's cores)")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per level")
    p.add_argument("--max-requests", type=int, default=20000, help="requests per level at most")
    p.add_argument("--endpoint", choices=("embed", "search"), default="embed")
    p.add_argument("--workers", type=int, default=1, help="server processes (simsearch serve --workers)")
    p.add_argument("--batch-size", type=int, default=32, help="server's largest model batch (and the limit's batch)")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="server's longest batch wait")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads of the references and of a 1-worker server (0: ORT "
                   "decides); with --workers N the server's default is cores/N per worker")
    p.add_argument("--decode-workers", type=int, default=2, help="decoding threads (server and in-process limit)")
    p.add_argument("--nice", type=int, default=0, help="server's inference thread nice value")
    p.add_argument("--raw-batches", default="1,8,16,32,64", help="batch sizes for raw ONNX Runtime")
    p.add_argument("--raw-seconds", type=float, default=3.0)
    p.add_argument("--limit-seconds", type=float, default=5.0, help="seconds of the in-process limit")
    args = p.parse_args(argv)
    if args.load_generator == "wrk" and shutil.which("wrk") is None:
        p.error("--load-generator wrk: wrk is not on PATH (Debian/Ubuntu: apt install wrk)")
    logging.basicConfig(level=logging.WARNING)

    work = (args.workdir or Path(tempfile.mkdtemp(prefix="serve-load-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model.resolve() if args.model else export_fresh(work, args.arch, args.image_size)  # the server runs in work/
    spec = ModelSpec.load(model_dir)
    files = image_files(max(args.index_size, 256), args.images)
    index_dir = work / f"index-{uuid.uuid4().hex[:6]}"
    build_index(model_dir, index_dir, files[: args.index_size], args.threads)
    print(f"model {spec.name} ({spec.input_height}x{spec.input_width} -> {spec.embedding_dim}), "
          f"index of {args.index_size} images, {os.cpu_count()} CPUs, load average {load_average()}", flush=True)

    raw = raw_ort(model_dir, files, args.threads, [int(b) for b in args.raw_batches.split(",")], args.raw_seconds)
    best_bs = max(raw, key=lambda b: raw[b])
    datas = [f.read_bytes() for f in files[:256]]
    limits: list[float] = []
    limit_cpus: list[float] = []

    def measure_limit(label: str = "in-process limit") -> None:
        lim, lim_cpu = inprocess_limit(model_dir, datas, args.threads, args.batch_size, args.decode_workers,
                                       args.limit_seconds)
        limits.append(lim)
        limit_cpus.append(lim_cpu)
        print(f"{label}: {lim:8.1f} images/s ({lim_cpu:.2f} CPU ms/image)  load {load_average()}", flush=True)

    measure_limit(f"in-process decode + inference limit (batch {args.batch_size}, {args.decode_workers} decoding "
                  "threads, no HTTP)")

    from serverkit import LiveServer

    extra = ["--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
             "--inference-nice", str(args.nice), "--workers", str(args.workers)]
    if args.threads or args.workers == 1:
        extra += ["--ort-threads", str(args.threads)]
    server = LiveServer(model_dir, index_dir, work / "server.log", extra_args=extra,
                        env={"SIMSEARCH_DECODE_WORKERS": str(args.decode_workers)})
    path = f"/v1/{args.endpoint}"
    fields = {"k": "10"} if args.endpoint == "search" else {}
    levels: list[dict[str, Any]] = []
    with server:
        port, proc = server.port, server.proc
        requests = [multipart_request(path, f"127.0.0.1:{port}", d, fields) for d in datas]
        script = wrk_script(work, path, requests) if args.load_generator == "wrk" else None
        for _ in range(100):  # warm-up, until every worker has answered
            if len(asyncio.run(run_level(port, requests, 4 * args.workers, 0.5, 400))["by_worker"]) >= args.workers:
                break

        def level(c: int) -> dict[str, Any]:
            cpu0, (img0, calls0) = cpu_seconds(proc.pid), batch_totals(port, args.workers)
            if script is not None:
                r = run_level_wrk(port, script, c, args.seconds)
            else:
                client0 = time.process_time()
                r = asyncio.run(run_level(port, requests, c, args.seconds, args.max_requests))
                r["client_cpu_ms_per_request"] = 1000 * (time.process_time() - client0) / max(r["requests"], 1)
            cpu1, (img1, calls1) = cpu_seconds(proc.pid), batch_totals(port, args.workers)
            r["server_cpu_ms_per_request"] = 1000 * (cpu1 - cpu0) / max(r["requests"], 1)
            r["mean_batch"] = (img1 - img0) / max(calls1 - calls0, 1)
            r["load"] = load_average()
            print(f"server {path} {c:>3} clients: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  p99 "
                  f"{r['p99_ms']:7.2f} ms  load {r['load']}", flush=True)
            return r

        goal_clients = 32
        for c in [int(x) for x in args.clients.split(",")]:
            if c != goal_clients:
                levels.append(level(c))
                continue
            # the goal's level: rounds interleaved with the limit, which is measured around each of them
            rounds = []
            for i in range(args.rounds):
                if i:
                    measure_limit()
                rounds.append(level(c))
            measure_limit()
            levels.append(combine_rounds(rounds, limits[-len(rounds) - 1:]))
    # this machine's speed drifts by 10-15% within minutes, as much as the goal's margin: the ratios
    # are to the mean of every limit measurement, and the goal's level adds up rounds taken between them
    limit, limit_cpu = float(np.mean(limits)), float(np.mean(limit_cpus))
    for r in levels:
        r["of_limit"] = r["rps"] / limit
        r["of_raw"] = r["rps"] / raw[best_bs]
        # what the ratio comes to when server and limit are both bound by the same cores' CPU:
        # the least load-dependent figure on a shared machine (the load generator not counted)
        r["cpu_ratio"] = limit_cpu / max(r["server_cpu_ms_per_request"], 1e-9)
        rounds_note = (f"  rounds: {', '.join(f'{x:.0%}' for x in r['round_of_limit'])} of the limit around each"
                       if "round_of_limit" in r else "")
        print(f"server {path} {r['clients']:>3} clients: {r['rps']:8.1f} req/s ({r['of_limit']:.0%} of the limit, "
              f"{r['of_raw']:.0%} of raw)  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  mean batch "
              f"{r['mean_batch']:5.1f}  server CPU {r['server_cpu_ms_per_request']:.2f} ms/req (limit's CPU/image "
              f"/ this: {r['cpu_ratio']:.0%}), {args.load_generator} load generator CPU "
              f"{r['client_cpu_ms_per_request']:.2f} ms/req  requests by worker {r['by_worker']}  ({r['requests']} "
              f"requests, {r['errors']} errors)  load {r['load']}{rounds_note}", flush=True)
    at32 = next((r for r in levels if r["clients"] == 32), levels[-1])
    print(f"raw onnxruntime best: {raw[best_bs]:.1f} images/s at batch {best_bs}; in-process limit {limit:.1f} "
          f"images/s (mean of {len(limits)} measurements: {', '.join(f'{x:.0f}' for x in limits)})")
    print(f"at {at32['clients']} clients, {args.workers} worker(s): {at32['of_limit']:.1%} of the in-process limit "
          f"(goal >= 80%), {at32['of_raw']:.1%} of raw onnxruntime; p50 {at32['p50_ms']:.1f} ms, "
          f"p99 {at32['p99_ms']:.1f} ms; CPU-bound estimate {at32['cpu_ratio']:.1%} ({limit_cpu:.2f} CPU ms/image in "
          f"process, {at32['server_cpu_ms_per_request']:.2f} per request in the server)")
    print(json.dumps({
        "model": spec.name, "endpoint": path, "cpus": os.cpu_count(), "workers": args.workers,
        "ort_threads": args.threads, "decode_workers": args.decode_workers,
        "server_batch_size": args.batch_size, "server_batch_wait_ms": args.batch_wait_ms, "inference_nice": args.nice,
        "raw_images_per_s": {str(k): round(v, 1) for k, v in raw.items()}, "raw_best_batch": best_bs,
        "inprocess_limit_images_per_s": round(limit, 1), "inprocess_limits": [round(x, 1) for x in limits],
        "load_generator": args.load_generator, "rounds": args.rounds, "inprocess_cpu_ms_per_image": round(limit_cpu, 3),
        "levels": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()} for r in levels],
        "of_limit_at_32": round(at32["of_limit"], 3), "cpu_ratio_at_32": round(at32["cpu_ratio"], 3),
        "goal_of_limit": 0.8,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
