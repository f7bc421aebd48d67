"""Checkpoints for export tests: a freshly initialised encoder + head in the pretrain/ format.

BatchNorm running statistics and affine parameters are randomised, so the exported graph has
non-trivial normalisation to get right (a fresh BN is the identity and would hide mistakes).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from pretrain.checkpoint import save_checkpoint
from pretrain.models import ModelConfig, build_encoder, build_head

MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


def make_checkpoint(path: str | Path, arch: str = "smallcnn", width: float = 0.25, image_size: int = 32,
                    seed: int = 0, cifar_stem: bool = True) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig(arch=arch, width=width, cifar_stem=cifar_stem)
    encoder = build_encoder(cfg)
    head = build_head(cfg, encoder.feature_dim)
    with torch.no_grad():
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    config = {"model": asdict(cfg), "data": {"image_size": image_size, "mean": MEAN, "std": STD}}
    state = {"config": config, "encoder": encoder.state_dict(), "head": head.state_dict(), "step": 0, "epoch": 0}
    return save_checkpoint(state, path)
