"""The vectorised SimCLR augmentations: shapes, ranges, per-sample independence, determinism."""

import pytest
import torch

from pretrain.augment import SimCLRAugment, _shift_hue

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    # smooth random images (so crops differ visibly), uint8 [16, 3, 40, 40]
    low = torch.rand(16, 3, 5, 5, generator=g)
    return (torch.nn.functional.interpolate(low, size=40, mode="bilinear") * 255).to(torch.uint8)


def aug(size=32, **kw):
    return SimCLRAugment(size, MEAN, STD, **kw)


def test_shape_dtype_and_value_range(images):
    out = aug(24, blur=True)(images, torch.Generator().manual_seed(1))
    assert out.shape == (16, 3, 24, 24) and out.dtype == torch.float32
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5


def test_same_seed_same_views_other_seed_other_views(images):
    a = aug()(images, torch.Generator().manual_seed(7))
    b = aug()(images, torch.Generator().manual_seed(7))
    c = aug()(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_parameters_are_drawn_per_sample(images):
    # the same image repeated: every copy must get its own crop/colour, so the outputs differ
    same = images[:1].repeat(8, 1, 1, 1)
    out = aug(strength=1.0, blur=True)(same, torch.Generator().manual_seed(3))
    flat = out.flatten(1)
    dists = torch.cdist(flat, flat)
    off_diag = dists[~torch.eye(8, dtype=torch.bool)]
    assert (off_diag > 1e-3).all()


def test_identity_settings_reproduce_the_normalised_image(images):
    ident = SimCLRAugment(40, MEAN, STD, crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, flip_p=0.0)
    out = ident(images, torch.Generator().manual_seed(0))
    # scale 1 may still pick a non-square aspect ratio; with ratio 1 it is the identity
    expected = (images.float() / 255 - 0.5) / 0.25
    close = [(o - e).abs().max().item() < 1e-4 for o, e in zip(out, expected, strict=True)]
    assert any(close)


def test_grayscale_always_gives_equal_channels(images):
    out = aug(jitter_p=0.0, grayscale_p=1.0)(images, torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-5) and torch.allclose(out[:, 1], out[:, 2], atol=1e-5)


def test_hue_shift_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(4))
    shift = torch.tensor([0.1, -0.25, 0.0])
    ref = torch.stack([TF.adjust_hue(xi, float(s)) for xi, s in zip(x, shift, strict=True)])
    assert torch.allclose(_shift_hue(x, shift), ref, atol=1e-5)


def test_rejects_float_input(images):
    with pytest.raises(ValueError):
        aug()(images.float(), torch.Generator())


def test_whole_batch_hue_path_equals_subset_path(images):
    subset = aug(strength=1.0, hue_subset=True)(images, torch.Generator().manual_seed(11))
    whole = aug(strength=1.0, hue_subset=False)(images, torch.Generator().manual_seed(11))
    assert torch.allclose(subset, whole, atol=1e-5)
