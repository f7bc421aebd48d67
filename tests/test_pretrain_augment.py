"""The vectorised SimCLR augmentations: shapes, ranges, per-sample independence, determinism."""

import pytest
import torch

from pretrain.augment import SimCLRAugment, _hue_rotation, jitter_matrix

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


def test_jitter_matrix_equals_torchvision_ops_in_sequence():
    # inside [0, 1] (no clamping) brightness, contrast and saturation compose exactly, in any order
    from torchvision.transforms.v2 import functional as TF

    g = torch.Generator().manual_seed(4)
    x = 0.3 + 0.3 * torch.rand(6, 3, 8, 8, generator=g)
    factors = torch.cat([0.75 + 0.5 * torch.rand(6, 3, generator=g), torch.zeros(6, 1)], 1)
    order = torch.cat([torch.stack([torch.randperm(3, generator=g) for _ in range(6)]), torch.full((6, 1), 3)], 1)
    matrix, offset = jitter_matrix(x.mean((2, 3)), factors, order)
    out = (matrix @ x.flatten(2) + offset[:, :, None]).view_as(x)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for xi, fi, oi, yi in zip(x, factors, order, out, strict=True):
        ref = xi
        for op in oi[:3].tolist():
            ref = ops[op](ref, float(fi[op]))
        assert ref.min() > 0 and ref.max() < 1  # the premise: torchvision's clamps did nothing
        assert torch.allclose(yi, ref, atol=1e-4)  # torchvision's luma weight for red is 0.2989


def test_hue_rotation_agrees_with_torchvision_at_a_third_of_a_turn_and_keeps_grey():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(5))
    for turns in (1 / 3, -1 / 3):
        rotated = (_hue_rotation(torch.tensor([turns]))[0] @ x.flatten(1)).view_as(x)
        assert torch.allclose(rotated, TF.adjust_hue(x, turns), atol=1e-5)  # a channel permutation
    grey = torch.full((3, 1), 0.4)
    rot = _hue_rotation(torch.tensor([0.1, -0.07]))
    assert torch.allclose(rot @ grey, grey.expand(2, 3, 1), atol=1e-6)
    assert torch.allclose(rot @ rot.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6)  # a rotation


def test_colour_jitter_changes_colours_and_respects_its_probability(images):
    plain = aug(crop_scale=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, flip_p=0.0)(images, torch.Generator().manual_seed(2))
    jittered = aug(crop_scale=(1.0, 1.0), jitter_p=1.0, grayscale_p=0.0, flip_p=0.0)(images, torch.Generator().manual_seed(2))
    # same crops (the draws for the crop come first), different colours for every image
    assert ((plain - jittered).flatten(1).abs().amax(1) > 0.05).all()


def test_rejects_float_input(images):
    with pytest.raises(ValueError):
        aug()(images.float(), torch.Generator())
