"""Encoders: output shapes, feature_dim and sizes of the CPU-sized ones."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import ARCHS, ModelConfig, build_encoder, build_model


@pytest.mark.parametrize("arch", ["smallcnn", "smallcnn2"])
@pytest.mark.parametrize("size", [16, 32])
def test_small_encoders_give_feature_dim_vectors_at_any_size(arch, size):
    enc = build_encoder(ModelConfig(arch=arch, width=0.5)).eval()
    with torch.no_grad():
        out = enc(torch.randn(3, 3, size, size))
    assert out.shape == (3, enc.feature_dim)
    assert torch.isfinite(out).all()


def test_smallcnn2_size_and_width():
    full = build_encoder(ModelConfig(arch="smallcnn2"))
    half = build_encoder(ModelConfig(arch="smallcnn2", width=0.5))
    n_full = sum(p.numel() for p in full.parameters())
    n_half = sum(p.numel() for p in half.parameters())
    assert 0.4e6 < n_full < 1.0e6
    assert full.feature_dim == 256 and half.feature_dim == 128
    assert 3 * n_half < n_full < 5 * n_half  # conv parameters scale with width squared


def test_smallcnn2_downsamples_in_the_stem():
    enc = build_encoder(ModelConfig(arch="smallcnn2"))
    stem = enc.features[0]
    assert isinstance(stem, torch.nn.Conv2d) and stem.stride == (2, 2)


def test_model_projects_to_head_out_dim_and_unknown_arch_lists_choices():
    model = build_model(ModelConfig(arch="smallcnn2", width=0.25, head_out_dim=64)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    with pytest.raises(ValueError, match="smallcnn2"):
        ModelConfig(arch="nope")
    assert "smallcnn2" in ARCHS
