"""Image folders for pretraining and evaluation.

Any folder, searched recursively by the project's one folder walk (`embed.files.walk_images`:
extensions any case, hidden files and folders skipped, symlinks followed once). When the root has
class sub-folders, the first-level folder name is an image's label (used by the kNN monitor and
`eval` only; pretraining ignores it).

Every image goes through `embed.preprocess.load_image_array` with `training_rule(S)`: decoded with
JPEG draft mode, shorter side resized to S (bicubic, antialiased), centre crop S x S. The export
records that same rule in `model.json`, so the server and the indexer feed the exported model the
pixels training and `eval` saw. The augmentations then crop and resize on the training device.
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
from torch.utils.data import Dataset, Sampler
from tqdm import tqdm

from embed.decode import DecodeError
from embed.files import IMAGE_EXTENSIONS, walk_images
from embed.preprocess import ResizeRule, load_image_array

logger = logging.getLogger(__name__)

# Bicubic over bilinear: on clothing-small (128 px photos -> 32 px) it is 8 dB closer to a Lanczos
# reference (42.4 vs 34.4 dB PSNR), i.e. keeps detail bilinear blurs away; bench/preprocess_rule.py.
TRAINING_INTERPOLATION = "bicubic"


def training_rule(image_size: int | ResizeRule) -> ResizeRule:
    """Pretraining's resize rule at resolution S: shorter side to S, bicubic, centre crop S x S.

    `simsearch export` records this rule in `model.json` for the checkpoint's `data.image_size`.
    """
    if isinstance(image_size, ResizeRule):
        return image_size
    return ResizeRule(int(image_size), int(image_size), "shorter_side_center_crop", int(image_size),
                      TRAINING_INTERPOLATION)


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
    """All image files under `root` (`embed.files` rules, sorted), labelled by their first-level folder."""
    files = walk_images(root).files
    if max_images:
        files = files[:: max(1, len(files) // max_images)][:max_images]
    top = [f.rel.split("/", 1)[0] if "/" in f.rel else None for f in files]
    classes = sorted({t for t in top if t is not None})
    index = {c: i for i, c in enumerate(classes)}
    return ImageList([f.path for f in files], [-1 if t is None else index[t] for t in top], classes)


def load_resized(source: str | os.PathLike[str] | bytes, size: int | ResizeRule) -> np.ndarray:
    """Decode and return a writable uint8 [S, S, 3] array by `training_rule(size)`."""
    return np.array(load_image_array(source, training_rule(size))[0])


def _try_load(path: Path, rule: ResizeRule) -> np.ndarray | str:
    try:
        return load_image_array(path, rule)[0]
    except DecodeError as e:
        return str(e)
    except Exception as e:  # noqa: BLE001 - a bad user file is a per-file error, whatever it raised
        return f"unreadable: {type(e).__name__}: {e}"


def load_folder(
    root: str | os.PathLike[str], image_size: int | ResizeRule, *, workers: int = 2, max_images: int = 0,
    progress: bool = True,
) -> ImageFolderData:
    """Decode every image under `root` once into memory; report and skip the bad ones."""
    rule = training_rule(image_size)
    listing = list_images(root, max_images)
    if not listing.paths:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    out = np.empty((len(listing.paths), rule.height, rule.width, 3), dtype=np.uint8)
    keep, failures = [], []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(lambda p: _try_load(p, rule), listing.paths, chunksize=64)
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
        raise DataError(f"none of the {len(listing.paths)} image files under {root} could be decoded")
    idx = np.asarray(keep)
    images = torch.from_numpy(out[idx] if len(keep) < len(out) else out).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([listing.labels[i] for i in keep], dtype=torch.long)
    return ImageFolderData(images, labels, listing.classes, [listing.paths[i] for i in keep], failures)


class DataError(ValueError):
    """A folder SimCLR cannot learn from as asked: nothing decodable, or fewer images than a batch."""


class StreamingImageFolder(Dataset):
    """Decode per item (for folders too large to hold); items are (uint8 [3, S, S], label).

    A file that fails to decode is logged and replaced by the next decodable one, so batches keep
    their size (every rank must contribute the same number of views to the gathered negatives).
    """

    def __init__(self, root: str | os.PathLike[str], image_size: int | ResizeRule, max_images: int = 0) -> None:
        self.listing = list_images(root, max_images)
        if not self.listing.paths:
            raise FileNotFoundError(f"no image files under {root}")
        self.rule = training_rule(image_size)
        self.image_size = self.rule.height
        self.failures: dict[str, str] = {}  # per worker process; the log has them all

    def __len__(self) -> int:
        return len(self.listing.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        for k in range(len(self)):
            j = (i + k) % len(self)
            result = _try_load(self.listing.paths[j], self.rule)
            if isinstance(result, str):
                if str(self.listing.paths[j]) not in self.failures:
                    self.failures[str(self.listing.paths[j])] = result
                    logger.warning("skipping %s: %s", self.listing.paths[j], result)
                continue
            # a writable copy: torch.from_numpy warns on Pillow's read-only buffer
            return torch.from_numpy(np.array(result)).permute(2, 0, 1).contiguous(), self.listing.labels[j]
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
