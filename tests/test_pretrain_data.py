"""Image folders: labels from class folders, bad files reported and skipped, the DDP sampler."""

from pathlib import Path

import torch

from pretrain.data import EpochSampler, load_folder

DATA = Path(__file__).parent / "data"
BAD = {"broken.png", "decompression_bomb.gif", "empty_file.jpg", "not_an_image.png", "truncated_image.png",
       "truncated_jpeg.jpg"}


def test_messy_folder_skips_and_reports_the_undecodable_files():
    data = load_folder(DATA / "messy", 16, progress=False)
    failed = {Path(p).name for p, _ in data.failures}
    assert failed >= BAD
    assert all(reason for _, reason in data.failures)
    kept = {p.name for p in data.paths}
    assert "flower.jpg" in kept and "pil_sample_cmyk.jpg" in kept and not (kept & failed)
    assert data.images.shape == (len(kept), 3, 16, 16) and data.images.dtype == torch.uint8
    assert len(kept) + len(failed) == len([p for p in (DATA / "messy").iterdir() if p.suffix != ".md"])


def test_class_folders_become_labels():
    data = load_folder(DATA / "cifar10-sample" / "test", 32, max_images=100, progress=False)
    assert data.classes[0] == "airplane" and len(data.classes) == 10
    for path, label in zip(data.paths, data.labels.tolist(), strict=True):
        assert path.parent.name == data.classes[label]


def test_sampler_ranks_split_each_global_batch_like_one_process():
    n, world, local = 50, 2, 4
    single = EpochSampler(n, 0, 1, seed=3)
    ranks = [EpochSampler(n, r, world, seed=3) for r in range(world)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    glob = single.indices()
    for i in range(n // (local * world)):
        union = torch.cat([r.indices()[i * local : (i + 1) * local] for r in ranks])
        assert sorted(union.tolist()) == sorted(glob[i * local * world : (i + 1) * local * world].tolist())
    other = EpochSampler(n, 0, 1, seed=3)
    other.set_epoch(3)
    assert not torch.equal(other.indices(), glob)
