"""Load test of `simsearch serve`: concurrent single-image clients against raw ONNX Runtime.

    python bench/serve_load.py                       # fresh ResNet-18 (CIFAR stem, 32 px), 1/8/32 clients
    python bench/serve_load.py --model MODEL_DIR     # a given model directory
    python bench/serve_load.py --seconds 5 --clients 1,32 --endpoint search

In one run on this machine:
1. raw ONNX Runtime throughput (images/s) of the same model directory at batch sizes 1..64,
   already-decoded arrays, one calling thread: the best batch size is the ceiling;
2. a real server process (`python -m simsearch serve`, one uvicorn worker, one event loop) over a
   small index, and for 1, 8 and 32 concurrent clients, each sending one image per request
   (multipart, keep-alive) for `--seconds` (at most `--max-requests`): requests/s, p50 and p99.
goal: at 32 clients the server delivers >= 70% of raw ONNX Runtime's best throughput.

The clients are a minimal HTTP/1.1 keep-alive client on asyncio streams (like `wrk`, the request
bytes are built once), so the load generator takes as little of the shared CPU as it can.
Prints each figure, then one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
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

from embed.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from embed.embedder import Embedder  # noqa: E402
from embed.preprocess import load_image_array  # noqa: E402
from embed.spec import ModelSpec  # noqa: E402

log = logging.getLogger("serve_load")
CIFAR = Path("/tmp/cifar/cifar10/test")
SAMPLE = ROOT / "tests" / "data" / "cifar10-sample" / "test"


def export_resnet18(work: Path) -> Path:
    from export_checkpoints import make_checkpoint

    from export import export_model

    out = work / "resnet18-model"
    ckpt = make_checkpoint(work / "resnet18.pt", arch="resnet18", width=1.0, image_size=32, cifar_stem=True)
    export_model(ckpt, out, exporter="torchscript", verify_limit=8, triton=None, verify_images=[SAMPLE])
    return out


def image_files(limit: int) -> list[Path]:
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


def multipart_request(path: str, host: str, image: bytes, fields: dict[str, str]) -> bytes:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    file_field = "files" if path.endswith("/embed") else "file"
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="q.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def _client(port: int, requests: list[bytes], deadline: float, budget: list[int],
                  latencies: list[float], errors: list[str], offset: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            req = requests[i % len(requests)]
            i += 1
            t0 = time.perf_counter()
            writer.write(req)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            status = status_line.split(b" ")[1] if b" " in status_line else b"?"
            if status != b"200":
                errors.append(status.decode())
    finally:
        writer.close()


async def run_level(port: int, requests: list[bytes], clients: int, seconds: float, max_requests: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    budget = [max_requests]
    t0 = time.perf_counter()
    await asyncio.gather(*(
        _client(port, requests, t0 + seconds, budget, latencies, errors, offset=c * 7) for c in range(clients)
    ))
    elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": round(elapsed, 2),
        "rps": len(latencies) / elapsed, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_totals(port: int) -> tuple[float, float]:
    """(images, model calls) so far, from the server's /metrics."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
              if ln.startswith(("simsearch_batch_size_sum", "simsearch_batch_size_count"))}
    return values.get("simsearch_batch_size_sum", 0.0), values.get("simsearch_batch_size_count", 0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, help="model directory (default: export a fresh ResNet-18, CIFAR stem)")
    p.add_argument("--workdir", type=Path, help="where the model and index go (default: a temporary folder)")
    p.add_argument("--index-size", type=int, default=1000, help="images in the served index")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels")
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per level")
    p.add_argument("--max-requests", type=int, default=20000, help="requests per level at most")
    p.add_argument("--endpoint", choices=("embed", "search"), default="embed")
    p.add_argument("--batch-size", type=int, default=32, help="server's largest model batch")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="server's longest batch wait")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (both sides; 0: ORT decides)")
    p.add_argument("--nice", type=int, default=0, help="server's inference thread nice value")
    p.add_argument("--raw-batches", default="1,8,16,32,64", help="batch sizes for raw ONNX Runtime")
    p.add_argument("--raw-seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="serve-load-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or export_resnet18(work)
    spec = ModelSpec.load(model_dir)
    files = image_files(max(args.index_size, 256))
    index_dir = work / f"index-{uuid.uuid4().hex[:6]}"
    build_index(model_dir, index_dir, files[: args.index_size], args.threads)
    print(f"model {spec.name} ({spec.input_height}x{spec.input_width} -> {spec.embedding_dim}), "
          f"index of {args.index_size} images, {os.cpu_count()} CPUs", flush=True)

    raw = raw_ort(model_dir, files, args.threads, [int(b) for b in args.raw_batches.split(",")], args.raw_seconds)
    best_bs = max(raw, key=lambda b: raw[b])

    from serverkit import LiveServer

    server = LiveServer(model_dir, index_dir, work / "server.log", extra_args=[
        "--batch-size", str(args.batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
        "--ort-threads", str(args.threads), "--inference-nice", str(args.nice)])
    path = f"/v1/{args.endpoint}"
    fields = {"k": "10"} if args.endpoint == "search" else {}
    levels = []
    with server:
        port, proc = server.port, server.proc
        requests = [multipart_request(path, f"127.0.0.1:{port}", f.read_bytes(), fields) for f in files[:256]]
        asyncio.run(run_level(port, requests, 4, 1.0, 200))  # warm-up
        for c in [int(x) for x in args.clients.split(",")]:
            cpu0, (img0, calls0) = cpu_seconds(proc.pid), batch_totals(port)
            r = asyncio.run(run_level(port, requests, c, args.seconds, args.max_requests))
            cpu1, (img1, calls1) = cpu_seconds(proc.pid), batch_totals(port)
            r["server_cpu_ms_per_request"] = 1000 * (cpu1 - cpu0) / max(r["requests"], 1)
            r["mean_batch"] = (img1 - img0) / max(calls1 - calls0, 1)
            levels.append(r)
            print(f"server {path} {c:>3} clients: {r['rps']:8.1f} req/s  p50 {r['p50_ms']:7.2f} ms  "
                  f"p99 {r['p99_ms']:7.2f} ms  mean batch {r['mean_batch']:5.1f}  server CPU "
                  f"{r['server_cpu_ms_per_request']:.2f} ms/req  ({r['requests']} requests, {r['errors']} errors)",
                  flush=True)
    at32 = next((r for r in levels if r["clients"] == 32), levels[-1])
    ratio = at32["rps"] / raw[best_bs]
    print(f"raw onnxruntime best: {raw[best_bs]:.1f} images/s at batch {best_bs}")
    print(f"ratio at {at32['clients']} clients: {ratio:.1%} of raw onnxruntime (goal >= 70%)")
    print(json.dumps({
        "model": spec.name, "endpoint": path, "cpus": os.cpu_count(), "ort_threads": args.threads,
        "server_batch_size": args.batch_size, "server_batch_wait_ms": args.batch_wait_ms, "inference_nice": args.nice,
        "raw_images_per_s": {str(k): round(v, 1) for k, v in raw.items()}, "raw_best_batch": best_bs,
        "levels": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in levels],
        "ratio_at_32": round(ratio, 3), "goal_ratio": 0.7,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
