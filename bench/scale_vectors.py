"""A million real embeddings for bench/index_scale.py: CIFAR-10 through a trained encoder, under
random augmentations, cached on disk.

    python bench/scale_vectors.py --scratch /tmp/simsearch-scale [--model MODEL_DIR] [-n 1000000]

The 60,000 CIFAR-10 images (train + test, from ../shared/data/cifar10-jpeg.tar.gz) are decoded
once with the project's own pixel rule (embed/preprocess.py) and kept as uint8. Round 0 embeds
them as they are; round r >= 1 embeds one SimCLR view of each (pretrain/augment.py: random
resized crop, flip, colour jitter, grayscale; seed r, normalisation left to the model), so every
vector is a distinct, realistic image vector. 17 rounds give 1,020,000; the first `n` are used.
The queries are views from other seeds of a random 10,000 images: near, never equal, to indexed
vectors, as a user's photo of something already in the collection would be.

Everything is cached under SCRATCH/vectors/<model fingerprint>/ (one .npy per round), so a
killed run resumes at the round it was in and a second bench run reads the cache. Without
--model, demo-run/*/model in the repository (the demo's model) is used when it exists, else one is
trained for --train-minutes with the demo's CPU preset and exported.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embed.backends import open_backend  # noqa: E402
from embed.preprocess import load_image_array  # noqa: E402
from embed.spec import ModelSpec  # noqa: E402

CIFAR_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
ROUND_SIZE = 60_000
QUERY_SEED = 10_000
log = logging.getLogger("scale_vectors")


def extracted_cifar(scratch: Path) -> Path:
    folder = scratch / "cifar10"
    if not (folder / "test").is_dir():
        with tarfile.open(CIFAR_TAR) as tar:
            tar.extractall(scratch, filter="data")
    return folder


def train_model(scratch: Path, minutes: float) -> Path:
    """The demo's CPU preset (simsearch/demo.py) on the CIFAR-10 training folder, then export."""
    model = scratch / "model"
    if (model / "model.json").is_file():
        return model
    train, run = extracted_cifar(scratch) / "train", scratch / "run"
    simsearch = [sys.executable, "-m", "simsearch"]
    subprocess.run([*simsearch, "pretrain", str(train), "--out", str(run), "--arch", "smallcnn2", "--width", "1.0",
                    "--image-size", "32", "--cifar-stem", "--view-size", "24", "--precision", "fp32",
                    "--batch-size", "256", "--device", "cpu", "--temperature", "0.1", "--base-lr", "2.0",
                    "--head-hidden-dim", "1024", "--warmup-epochs", "1", "--time-budget-min", str(minutes),
                    "--epochs", "0", "--no-progress"], check=True, cwd=ROOT)
    subprocess.run([*simsearch, "export", str(run / "last.pt"), "--out", str(model), "--verify-images",
                    str(extracted_cifar(scratch) / "test"), "-q"], check=True, cwd=ROOT)
    return model


def default_model(scratch: Path, minutes: float) -> Path:
    demo = sorted(ROOT.glob("demo-run/*/model/model.json"))
    return demo[0].parent if demo else train_model(scratch, minutes)


def decoded_images(scratch: Path, spec: ModelSpec) -> np.ndarray:
    """[60000, H, W, 3] uint8, train then test, sorted paths: decoded once, then read from the cache."""
    cache = scratch / f"cifar-{spec.input_height}x{spec.input_width}-u8.npy"
    if cache.is_file():
        return np.load(cache)
    folder = extracted_cifar(scratch)
    paths = sorted((folder / "train").rglob("*.jpg")) + sorted((folder / "test").rglob("*.jpg"))
    images = np.stack([load_image_array(p, spec)[0] for p in paths])
    np.save(cache, images)
    return images


def augmented(images: np.ndarray, seed: int) -> np.ndarray:
    """One SimCLR view of each image, back to uint8 HWC (the model normalises inside its graph)."""
    import torch

    from pretrain.augment import SimCLRAugment

    size = images.shape[1]
    aug = SimCLRAugment(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    gen = torch.Generator().manual_seed(seed)
    out = np.empty_like(images)
    for start in range(0, len(images), 4096):
        x = torch.from_numpy(images[start : start + 4096]).permute(0, 3, 1, 2).contiguous()
        y = aug(x, gen).mul_(255).round_().clamp_(0, 255).to(torch.uint8)
        out[start : start + len(y)] = y.permute(0, 2, 3, 1).numpy()
    return out


def embed_all(backend, images: np.ndarray, batch: int = 1024) -> np.ndarray:
    return np.concatenate([backend.embed(images[s : s + batch]) for s in range(0, len(images), batch)])


def vectors_dir(scratch: Path, model: Path) -> Path:
    from embed.spec import model_dir_fingerprint

    spec = ModelSpec.load(model)
    return scratch / "vectors" / (spec.fingerprint or model_dir_fingerprint(model, spec))[:16]


def ensure_vectors(scratch: Path, model: Path, n: int, n_queries: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """(base [n, D], queries [n_queries, D]) float32, memory-mapped from the cache; embeds what is missing."""
    out = vectors_dir(scratch, model)
    out.mkdir(parents=True, exist_ok=True)
    rounds = -(-n // ROUND_SIZE)
    missing = [r for r in range(rounds) if not (out / f"round-{r:02d}.npy").is_file()]
    if missing or not (out / "queries.npy").is_file():
        spec = ModelSpec.load(model)
        images = decoded_images(scratch, spec)
        backend = open_backend(model_dir=str(model), max_batch_size=1024)
        try:
            for r in missing:
                started = time.perf_counter()
                vecs = embed_all(backend, images if r == 0 else augmented(images, r))
                np.save(out / f".round-{r:02d}.tmp.npy", vecs)
                (out / f".round-{r:02d}.tmp.npy").rename(out / f"round-{r:02d}.npy")
                log.info("round %d: %d vectors in %.0f s", r, len(vecs), time.perf_counter() - started)
            if not (out / "queries.npy").is_file():
                pick = np.random.default_rng(QUERY_SEED).choice(len(images), n_queries, replace=False)
                np.save(out / ".queries.tmp.npy", embed_all(backend, augmented(images[pick], QUERY_SEED)))
                (out / ".queries.tmp.npy").rename(out / "queries.npy")
        finally:
            backend.close()
    base = np.concatenate([np.load(out / f"round-{r:02d}.npy", mmap_mode="r") for r in range(rounds)])[:n]
    return np.ascontiguousarray(base, dtype=np.float32), np.load(out / "queries.npy")[:n_queries]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scratch", type=Path, required=True, help="cache directory (outside the repository)")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the demo's, else train one)")
    p.add_argument("-n", type=int, default=1_000_000, help="vectors")
    p.add_argument("--train-minutes", type=float, default=5.0, help="pretraining budget when a model is trained")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.scratch.mkdir(parents=True, exist_ok=True)
    model = args.model or default_model(args.scratch, args.train_minutes)
    base, queries = ensure_vectors(args.scratch, model, args.n)
    print(f"{len(base)} vectors and {len(queries)} queries of dim {base.shape[1]} in {vectors_dir(args.scratch, model)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
