"""Bench: the resize rule's interpolation on its merits, and the decode throughput of pretraining's loader.

    .venv/bin/python bench/preprocess_rule.py

1. Clothing-small photos (shorter side 128 px) brought to S px (shorter side + centre crop, the
   training rule's geometry) with each Pillow filter: resize time, PSNR against a Lanczos reference
   (how much detail survives; Lanczos is the sharpest antialiased filter Pillow has) and raw-pixel
   cosine precision@10 (test images as queries, train as the gallery): a quality check that needs no
   trained model. `bicubic+gap3` is the `reducing_gap=3.0` shortcut (not used by the project).
2. A 4000x3000 photo saved as PNG (no JPEG draft mode to help) brought to 96 px: the case where
   `reducing_gap` would matter.
3. `pretrain.data.load_folder` (decode + `training_rule(S)`, 2 threads) on the CIFAR-10 train folder
   (50,000 JPEGs) and on clothing-small: images/s, and the folder listing alone.

Data: ../shared/data/*.tar.gz, extracted to --scratch. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embed.decode import decode_image  # noqa: E402
from embed.files import walk_images  # noqa: E402
from pretrain.data import load_folder  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FILTERS = {
    "bilinear": dict(resample=Image.Resampling.BILINEAR),
    "bicubic": dict(resample=Image.Resampling.BICUBIC),
    "bicubic+gap3": dict(resample=Image.Resampling.BICUBIC, reducing_gap=3.0),
    "lanczos": dict(resample=Image.Resampling.LANCZOS),
}


def extract(tarball: Path, scratch: Path, inside: str) -> Path:
    if not (scratch / inside).is_dir():
        scratch.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(scratch)], check=True)
    return scratch / inside


def crop(img: Image.Image, size: int, **kw: object) -> np.ndarray:
    w, h = img.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    img = img.resize((nw, nh), **kw)
    left, top = round((nw - size) / 2), round((nh - size) / 2)
    return np.asarray(img.crop((left, top, left + size, top + size)), np.float32)


def precision_at_10(gallery: np.ndarray, g_labels: np.ndarray, queries: np.ndarray, q_labels: np.ndarray) -> float:
    def norm(x: np.ndarray) -> np.ndarray:
        x = x - x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    top = np.argsort(-(norm(queries) @ norm(gallery).T), axis=1)[:, :10]
    return float((g_labels[top] == q_labels[:, None]).mean())


def filter_merits(clothing: Path, size: int) -> dict[str, dict[str, float]]:
    def split(name: str) -> tuple[list[Path], np.ndarray]:
        files = [f.path for f in walk_images(clothing / name).files]
        return files, np.array([p.parent.name for p in files])

    gallery, g_labels = split("train")
    queries, q_labels = split("test")
    full = {p: decode_image(p) for p in gallery + queries}
    ref = {p: crop(img, size, **FILTERS["lanczos"]) for p, img in full.items()}
    out = {}
    for name, kw in FILTERS.items():
        t0 = time.perf_counter()
        pix = {p: crop(img, size, **kw) for p, img in full.items()}
        us = (time.perf_counter() - t0) / len(full) * 1e6
        mse = float(np.mean([np.mean((pix[p] - ref[p]) ** 2) for p in full]))
        psnr = 10 * np.log10(255.0**2 / mse) if mse else float("inf")
        p10 = precision_at_10(np.stack([pix[p].ravel() for p in gallery]), g_labels,
                              np.stack([pix[p].ravel() for p in queries]), q_labels)
        out[name] = {"resize_us": round(us, 1), "psnr_vs_lanczos_db": round(psnr, 2), "raw_pixel_p10": round(p10, 4)}
        print(f"  {name:13s} {us:7.0f} us/image  PSNR vs Lanczos {psnr:6.2f} dB  raw-pixel precision@10 {p10:.3f}")
    return out


def big_png(clothing: Path) -> dict[str, float]:
    photo = decode_image(next(iter(walk_images(clothing / "train").files)).path).resize((4000, 3000), Image.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, "PNG", compress_level=1)
    img = decode_image(buf.getvalue())
    out = {}
    for name in ("bilinear", "bicubic", "bicubic+gap3"):
        t0 = time.perf_counter()
        for _ in range(3):
            arr = crop(img, 96, **FILTERS[name])
        out[name] = round((time.perf_counter() - t0) / 3 * 1e3, 1)
        diff = np.abs(arr - crop(img, 96, **FILTERS["bicubic"])).max()
        print(f"  {name:13s} {out[name]:7.1f} ms  max |diff| vs exact bicubic {diff:.0f}")
    return out


def loader(folder: Path, size: int, workers: int) -> dict[str, float]:
    t0 = time.perf_counter()
    n_listed = len(walk_images(folder).files)
    listing_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = load_folder(folder, size, workers=workers, progress=False)
    wall = time.perf_counter() - t0
    print(f"  {folder.parent.name}/{folder.name} S={size}: {len(data)} images in {wall:.1f} s = "
          f"{len(data) / wall:,.0f} images/s (listing {n_listed} files: {listing_s:.2f} s)")
    return {"images": len(data), "seconds": round(wall, 2), "images_per_s": round(len(data) / wall, 1),
            "listing_s": round(listing_s, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scratch", default="/tmp/bench-preprocess", help="where the tarballs are extracted")
    p.add_argument("--size", type=int, default=32, help="S for the filter comparison")
    p.add_argument("--workers", type=int, default=2, help="decode threads of load_folder")
    p.add_argument("--skip-cifar", action="store_true", help="leave out the 50,000-image loader run")
    args = p.parse_args(argv)
    scratch = Path(args.scratch)
    clothing = extract(SHARED / "clothing-small-128.tar.gz", scratch, "clothing-small")
    report: dict[str, object] = {}
    print(f"1. clothing-small 128 px -> {args.size} px, per filter")
    report["filters"] = filter_merits(clothing, args.size)
    print("2. a 4000x3000 PNG -> 96 px")
    report["big_png_ms"] = big_png(clothing)
    print("3. pretrain.data.load_folder")
    report["loader"] = {"clothing_32": loader(clothing / "train", 32, args.workers),
                        "clothing_96": loader(clothing / "train", 96, args.workers)}
    if not args.skip_cifar:
        cifar = extract(SHARED / "cifar10-jpeg.tar.gz", scratch, "cifar10")
        report["loader"]["cifar_train_32"] = loader(cifar / "train", 32, args.workers)  # type: ignore[index]
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
