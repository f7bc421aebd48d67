"""Benchmark `index build`: whole-build images/s against decoding alone and inference alone, and the
recall@10 of the approximate (IVF) index against exact search on real embeddings.

    python bench/index_folder.py                          # CIFAR-10 test + generated photos + recall
    python bench/index_folder.py --model MODEL_DIR        # a given model directory
    python bench/index_folder.py --limit 500 --skip-recall   # quick look
    python bench/index_folder.py --ray --skip-recall --skip-photos   # + `index build --ray` on a local Ray

Folders: the CIFAR-10 test set (10,000 JPEGs of 32x32, extracted from ../shared/data at
/tmp/cifar/cifar10/test) and a folder of larger photos generated from the real photos in
tests/data/messy (random crops, flips and sizes of 1-2 megapixels, JPEG q88).
Without --model, a freshly initialised encoder (--arch, --width) is exported with `export`.

For each folder, in one run and with the same settings: decode-only images/s (load_image_array in
`--decode-workers` threads, default one per core), inference-only images/s (the backend on already decoded batches from
one thread, as the build does), and the whole build (scan, hash, decode, embed, commit).
goal: build >= 85% of the slower of the two. On a machine where decoding and inference share the
same few cores, the build cannot beat the shared-CPU bound 1 / (1/decode + 1/inference), which is
printed too. Prints each figure, then one JSON object.

With --ray [ADDRESS], the same folder is also indexed by `index build --ray` (docs/distributed.md)
into a fresh index, `--ray-runs` times on one Ray cluster (a new local one on every CPU without
ADDRESS, started before the clock runs, as a standing cluster would be): whole-command images/s,
its ratio to the plain build (goal >= 0.8 on 2 cores), images/s per embedding actor (what each
added machine's actors bring), the Ray stage alone, and `ingest_s`: the time after the stage
(the ingestion runs while the stage does; this is what is left of it when the last shard has
landed, plus listing and closing). The load average is printed: figures from a shared machine are
noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embed.backends import open_backend  # noqa: E402
from embed.embedder import Embedder, available_cores  # noqa: E402
from embed.preprocess import load_image_array  # noqa: E402
from index.builder import BuildConfig, build_index, decode_threads  # noqa: E402
from index.scan import scan_folder  # noqa: E402
from index.store import ImageIndex  # noqa: E402

PHOTO_SOURCES = ("flower.jpg", "photo_progressive.jpg", "icc_profile_big.jpg", "exif_imagemagick_orientation.png",
                 "hopper.bmp", "transparent.png")


def make_model(work: Path, arch: str, width: float) -> Path:
    out = work / f"model-{arch}-{width}"
    if (out / "model.json").exists():
        return out
    sys.path.insert(0, str(ROOT / "tests"))
    from export_checkpoints import make_checkpoint

    from export import export_model

    ckpt = make_checkpoint(work / f"{arch}-{width}.pt", arch=arch, width=width, image_size=32)
    export_model(ckpt, out, exporter="torchscript", verify_limit=8, triton=None,
                 verify_images=[ROOT / "tests" / "data" / "cifar10-sample" / "test"])
    return out


def make_photos(folder: Path, n: int, seed: int = 0) -> Path:
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) >= n:
        return folder
    from PIL import Image, ImageEnhance

    from embed.decode import decode_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = [decode_image(ROOT / "tests" / "data" / "messy" / name) for name in PHOTO_SOURCES]
    for i in range(n):
        img = rng.choice(sources)
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = rng.uniform(1.0e6, 2.0e6)
        scale = (pixels / (cw * ch)) ** 0.5
        crop = crop.resize((int(cw * scale), int(ch * scale)), Image.Resampling.BICUBIC)
        crop = ImageEnhance.Color(crop).enhance(rng.uniform(0.7, 1.3))
        crop.save(folder / f"photo_{i:04d}.jpg", quality=88)
    return folder


def bench_folder(folder: Path, model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    files = [folder / p for p in scan_folder(folder)][: args.limit or None]
    if args.limit:
        sub = work / f"subset-{folder.name}"
        shutil.rmtree(sub, ignore_errors=True)
        for p in files:
            dst = sub / p.relative_to(folder)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, dst)
        folder, files = sub, [sub / p.relative_to(folder) for p in files]
    backend = open_backend(model_dir=str(model), max_batch_size=args.batch_size)
    spec = backend.spec
    n = len(files)
    for p in files[:64]:  # warm the page cache and the session: every phase reads the same bytes
        p.read_bytes()
    backend.embed(np.zeros((args.batch_size, *spec.input_size, 3), np.uint8))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.decode_workers or available_cores()) as pool:
        arrays = list(pool.map(lambda p: load_image_array(p, spec)[0], files))
    decode_s = time.perf_counter() - t0

    batch = np.stack(arrays)
    t0 = time.perf_counter()
    for i in range(0, n, args.batch_size):
        backend.embed(batch[i : i + args.batch_size])
    infer_s = time.perf_counter() - t0
    del arrays, batch

    out = work / f"index-{folder.name}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(folder=str(folder), out=str(out), batch_size=args.batch_size,
                      **decode_threads(args.decode_workers), progress=False)
    t0 = time.perf_counter()
    summary = build_index(cfg, backend)
    build_s = time.perf_counter() - t0
    backend.close()
    decode, infer, build = n / decode_s, n / infer_s, summary["embedded"] / build_s
    slower = min(decode, infer)
    result = {
        "folder": str(folder), "files": n, "embedded": summary["embedded"], "failed": len(summary["failed"]),
        "decode_images_per_s": round(decode, 1), "inference_images_per_s": round(infer, 1),
        "build_images_per_s": round(build, 1), "build_decode_threads": summary["decode_threads"],
        "build_over_slower": round(build / slower, 3),
        "shared_cpu_bound_images_per_s": round(1 / (1 / decode + 1 / infer), 1),
        "build_over_shared_cpu_bound": round(build * (1 / decode + 1 / infer), 3),
        "build_seconds": round(build_s, 2),
    }
    if args.ray is not None:
        result["ray"] = [bench_ray(folder, model, args, work, build, i) for i in range(args.ray_runs)]
    for k, v in result.items():
        print(f"  {k:32s} {v}")
    return result


def bench_ray(folder: Path, model: Path, args: argparse.Namespace, work: Path, plain: float, run: int) -> dict[str, Any]:
    """One `index build --ray` of `folder` into a fresh index; figures against the plain build's images/s."""
    import ray

    from index.ray_build import build_index_on_ray
    from index.ray_config import RayConfig

    init_s = 0.0
    if not ray.is_initialized():
        t0 = time.perf_counter()
        ray.init(address=args.ray or None, logging_level=logging.WARNING)
        init_s = time.perf_counter() - t0
    out = work / f"index-ray-{folder.name}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(folder=str(folder), out=str(out), batch_size=args.batch_size,
                      **decode_threads(args.decode_workers), progress=False)
    ray_cfg = RayConfig(address=args.ray or None, actors=args.ray_actors, decode=args.ray_decode)
    backend = open_backend(model_dir=str(model), max_batch_size=args.batch_size)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = build_index_on_ray(cfg, backend, {"model_dir": str(model)}, ray_cfg)
    seconds = time.perf_counter() - t0
    backend.close()
    stage = summary["ray"]
    rate = summary["embedded"] / seconds
    result = {
        "run": run + 1, "ray_init_s": round(init_s, 2), "nodes": stage["nodes"], "cluster": stage["cluster"],
        "actors": stage["actors"], "decode": stage["decode"], "embedded": summary["embedded"],
        "ray_build_images_per_s": round(rate, 1), "ray_over_plain_build": round(rate / plain, 3),
        "images_per_s_per_actor": round(rate / stage["actors"], 1),
        "ray_stage_images_per_s": stage["images_per_s"], "ray_stage_s": stage["elapsed_s"],
        "ray_first_shard_s": stage.get("first_shard_s"), "ray_steady_images_per_s": stage.get("steady_images_per_s"),
        "ray_steady_over_plain_build": round(stage["steady_images_per_s"] / plain, 3)
        if stage.get("steady_images_per_s") else None,
        "ingest_s": round(seconds - stage["elapsed_s"], 2), "seconds": round(seconds, 2),
        "load_avg_1m_before": round(load, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    print(f"  ray run {run + 1}: {json.dumps(result)}")
    return result


def embed_folder(files: list[Path], model: Path, args: argparse.Namespace) -> np.ndarray:
    backend = open_backend(model_dir=str(model), max_batch_size=args.batch_size)
    embedder = Embedder(backend, batch_size=args.batch_size, decode_workers=args.decode_workers or available_cores())
    vectors = [v for _, v, _ in embedder.iter_embed(files)]
    backend.close()
    return np.stack(vectors).astype(np.float32)


def bench_recall(model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cache = work / f"recall-{model.name}-{args.recall_train}.npz"
    if cache.exists():
        data = np.load(cache)
        base, queries = data["base"], data["queries"]
    else:
        train = [args.cifar_train / p for p in scan_folder(args.cifar_train)]
        test = [args.cifar / p for p in scan_folder(args.cifar)]
        rng = np.random.default_rng(0)
        train = [train[i] for i in sorted(rng.choice(len(train), min(args.recall_train, len(train)), replace=False))]
        test = [test[i] for i in sorted(rng.choice(len(test), min(args.queries, len(test)), replace=False))]
        t0 = time.perf_counter()
        base, queries = embed_folder(train, model, args), embed_folder(test, model, args)
        print(f"  embedded {len(base)} + {len(queries)} images in {time.perf_counter() - t0:.1f} s")
        np.savez(cache, base=base, queries=queries)
    spread = float((queries @ base.T).std())
    print(f"  cosine spread (std over query x base pairs): {spread:.2e}")
    result: dict[str, Any] = {"base": len(base), "queries": len(queries), "dim": int(base.shape[1]),
                              "cosine_std": spread, "raw": ivf_recall(base, queries, work, "raw")}
    if spread < 1e-2:
        # A freshly initialised encoder maps every image to almost the same direction (all-positive
        # ReLU features): neighbours differ in the 7th digit and even exact float32 searches disagree.
        # Centring on the collection mean (and re-normalising) restores the spread a trained encoder has.
        mean = base.mean(axis=0, keepdims=True)
        cb, cq = base - mean, queries - mean
        cb /= np.linalg.norm(cb, axis=1, keepdims=True)
        cq /= np.linalg.norm(cq, axis=1, keepdims=True)
        print("  embeddings are degenerate (untrained encoder): also measured after centring")
        result["centred"] = ivf_recall(cb.astype(np.float32), cq.astype(np.float32), work, "centred")
    return result


def ivf_recall(base: np.ndarray, queries: np.ndarray, work: Path, label: str) -> dict[str, Any]:
    exact = np.argsort(-(queries @ base.T), axis=1)[:, :10]
    out = work / f"index-recall-{label}"
    shutil.rmtree(out, ignore_errors=True)
    ix = ImageIndex.create(out, base.shape[1], index_mode="ivf")
    ids = np.asarray(ix.add(base, [{"path": str(i)} for i in range(len(base))]))
    t0 = time.perf_counter()
    ix.compact()  # train, tune and write the IVF base now (a commit would do it in the background)
    train_s = time.perf_counter() - t0
    st = ix.stats()
    exact_ids = ids[exact]
    rows = []
    for nprobe in sorted({1, 4, 8, 16, st["nprobe"], 32, 64, 128, st["nlist"]}):
        if nprobe > st["nlist"]:
            continue
        t0 = time.perf_counter()
        hits = ix.search(queries, 10, params={"nprobe": nprobe})
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        recall = float(np.mean([len({h.id for h in r} & set(e.tolist())) / 10 for r, e in zip(hits, exact_ids, strict=True)]))
        rows.append({"nprobe": nprobe, "recall_at_10": round(recall, 4), "ms_per_query": round(ms, 3),
                     "default": nprobe == st["nprobe"]})
        print(f"  [{label}] nprobe {nprobe:4d}{' (default)' if nprobe == st['nprobe'] else '          '}"
              f"  recall@10 {recall:.4f}  {ms:.3f} ms/query")
    ix.close()
    return {"nlist": st["nlist"], "default_nprobe": st["nprobe"], "train_and_write_s": round(train_s, 2),
            "by_nprobe": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="model directory (default: export a fresh encoder)")
    p.add_argument("--arch", default="resnet18", help="encoder to export when --model is not given")
    p.add_argument("--width", type=float, default=1.0, help="its width multiplier")
    p.add_argument("--cifar", type=Path, default=Path("/tmp/cifar/cifar10/test"), help="CIFAR-10 test folder")
    p.add_argument("--cifar-train", type=Path, default=Path("/tmp/cifar/cifar10/train"), help="CIFAR-10 train folder")
    p.add_argument("--photos", type=Path, default=None, help="folder of large photos (default: generated)")
    p.add_argument("--n-photos", type=int, default=300, help="photos to generate")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "simsearch-bench", help="scratch folder")
    p.add_argument("--batch-size", type=int, default=64, help="inference batch")
    p.add_argument("--decode-workers", type=int, default=None,
                   help="decoding threads (default: the build's own, which adapt; decode alone on every core)")
    p.add_argument("--limit", type=int, default=0, help="only the first N files of each folder (0: all)")
    p.add_argument("--recall-train", type=int, default=50_000, help="indexed CIFAR train images for recall")
    p.add_argument("--queries", type=int, default=1000, help="CIFAR test images used as queries")
    p.add_argument("--skip-recall", action="store_true", help="throughput only")
    p.add_argument("--skip-photos", action="store_true", help="CIFAR only")
    p.add_argument("--skip-cifar", action="store_true", help="photos only")
    p.add_argument("--skip-throughput", action="store_true", help="recall only")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="also `index build --ray` each folder (no ADDRESS: a new local Ray on every CPU)")
    p.add_argument("--ray-runs", type=int, default=2, help="Ray builds per folder (the first starts the workers)")
    p.add_argument("--ray-actors", type=int, default=0, help="embedding actors (0: the --ray default)")
    p.add_argument("--ray-decode", choices=("auto", "tasks", "actors"), default="auto", help="where Ray decodes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or make_model(args.work, args.arch, args.width)
    print(f"model {model}; decode workers {args.decode_workers or 'adaptive'}; batch {args.batch_size}")
    report: dict[str, Any] = {"model": str(model), "decode_workers": args.decode_workers, "batch_size": args.batch_size,
                              "cpus": os.cpu_count(), "load_avg_1m_start": round(os.getloadavg()[0], 2)}
    if not args.skip_throughput and not args.skip_cifar:
        print(f"CIFAR-10 test folder {args.cifar}")
        report["cifar"] = bench_folder(args.cifar, model, args, args.work)
    if not args.skip_photos and not args.skip_throughput:
        photos = args.photos or make_photos(args.work / "photos", args.n_photos)
        print(f"photos folder {photos}")
        report["photos"] = bench_folder(photos, model, args, args.work)
    if not args.skip_recall:
        print("IVF recall@10 vs exact search")
        report["recall"] = bench_recall(model, args, args.work)
    if args.ray is not None:
        import ray

        ray.shutdown()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
