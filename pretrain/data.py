"""Image folders for pretraining and evaluation.

Any folder, searched recursively. When the root has class sub-folders, the first-level folder
name is an image's label (used by the kNN monitor and `eval` only; pretraining ignores it).
Every image is decoded by `embed.decode.decode_image` and stored at S x S uint8 (shorter side
resized to S, then centre-cropped): the augmentations crop and resize on the training device.
Files that fail to decode are logged, counted in `failures` and skipped, never fatal.

Two paths:
- `load_folder`: decode once (in threads) into one uint8 tensor [N, 3, S, S] (small images,
  e.g. CIFAR: 50,000 x 32 x 32 x 3 = 150 MB);
- `StreamingImageFolder`: decode per item in DataLoader workers (large folders).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from embed.decode import DecodeError, decode_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".png", ".apng", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".avif", ".heif", ".heic",
    ".ppm", ".pgm", ".pbm", ".pnm",
})


@dataclass
class ImageList:
    paths: list[Path]
    labels: list[int]  # -1 for images directly under the root
    classes: list[str]


@dataclass
class ImageFolderData:
    images: torch.Tensor  # uint8 [N, 3, S, S]
    labels: torch.Tensor  # int64 [N]
    classes: list[str]
    paths: list[Path]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason: message)

    def __len__(self) -> int:
        return self.images.shape[0]


def list_images(root: str | os.PathLike[str], max_images: int = 0) -> ImageList:
    """All image files under `root` (by extension, sorted), labelled by their first-level folder."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if max_images:
        files = files[:: max(1, len(files) // max_images)][:max_images]
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(classes)}
    labels = [index[p.relative_to(root).parts[0]] if len(p.relative_to(root).parts) > 1 else -1 for p in files]
    return ImageList(files, labels, classes)


def load_resized(source: str | os.PathLike[str] | bytes, size: int) -> np.ndarray:
    """Decode and return uint8 [size, size, 3]: shorter side resized to `size`, centre crop."""
    img = decode_image(source, draft_size=(size, size))
    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0 if min(w, h) > 4 * size else None)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def _try_load(path: Path, size: int) -> np.ndarray | str:
    try:
        return load_resized(path, size)
    except DecodeError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a bad user file is a per-file error, whatever it raised
        return f"unreadable: {type(e).__name__}: {e}"


def load_folder(
    root: str | os.PathLike[str], image_size: int, *, workers: int = 2, max_images: int = 0, progress: bool = True
) -> ImageFolderData:
    """Decode every image under `root` once into memory; report and skip the bad ones."""
    listing = list_images(root, max_images)
    if not listing.paths:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    out = np.empty((len(listing.paths), image_size, image_size, 3), dtype=np.uint8)
    keep, failures = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda p: _try_load(p, image_size), listing.paths, chunksize=64)
        bar = tqdm(results, total=len(listing.paths), desc=f"decode {Path(root).name}", disable=not progress, leave=False)
        for i, (path, result) in enumerate(zip(listing.paths, bar, strict=True)):
            if isinstance(result, str):
                failures.append((str(path), result))
                logger.warning("skipping %s: %s", path, result)
            else:
                out[i] = result
                keep.append(i)
    if failures:
        logger.warning("%d of %d files under %s could not be decoded and were skipped", len(failures), len(listing.paths), root)
    if not keep:
        raise ValueError(f"none of the {len(listing.paths)} image files under {root} could be decoded")
    idx = np.asarray(keep)
    images = torch.from_numpy(out[idx]).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([listing.labels[i] for i in keep], dtype=torch.long)
    return ImageFolderData(images, labels, listing.classes, [listing.paths[i] for i in keep], failures)


class StreamingImageFolder(Dataset):
    """Decode per item (for folders too large to hold); items are (uint8 [3, S, S], label).

    A file that fails to decode is logged and replaced by the next decodable one, so batches keep
    their size (every rank must contribute the same number of views to the gathered negatives).
    """

    def __init__(self, root: str | os.PathLike[str], image_size: int, max_images: int = 0) -> None:
        self.listing = list_images(root, max_images)
        if not self.listing.paths:
            raise FileNotFoundError(f"no image files under {root}")
        self.image_size = image_size
        self.failures: dict[str, str] = {}  # per worker process; the log has them all

    def __len__(self) -> int:
        return len(self.listing.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self)):
            j = (i + k) % len(self)
            result = _try_load(self.listing.paths[j], self.image_size)
            if isinstance(result, str):
                if str(self.listing.paths[j]) not in self.failures:
                    self.failures[str(self.listing.paths[j])] = result
                    logger.warning("skipping %s: %s", self.listing.paths[j], result)
                continue
            return torch.from_numpy(result).permute(2, 0, 1).contiguous(), self.listing.labels[j]
        raise ValueError("no image in the folder could be decoded")


class EpochSampler(Sampler[int]):
    """This rank's share of a per-epoch permutation (DistributedSampler semantics, drop_last).

    The permutation depends on (seed, epoch) only. Rank r takes every world-th index starting at r,
    so with per-rank batch b the union over ranks of batch i is the global batch
    perm[i*b*world : (i+1)*b*world] — the same images one process with batch b*world would see.
    `start` skips the first `start` indices of this rank (exact resumption mid-epoch).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.n, self.rank, self.world_size, self.seed = n, rank, world_size, seed
        self.epoch, self.start = 0, 0
        self.per_rank = n // world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def indices(self) -> torch.Tensor:
        perm = self.global_permutation(self.epoch)[: self.per_rank * self.world_size]
        return perm[self.rank :: self.world_size][self.start :]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.per_rank - self.start
