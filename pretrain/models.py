"""Encoders and the projection head, kept apart so that discarding the head is a call.

Encoders map images [N, 3, H, W] (already normalised floats) to features [N, feature_dim]:
- `resnet18` / `resnet34` / `resnet50`: torchvision ResNets, randomly initialised, with an optional
  CIFAR stem (3x3 conv, stride 1, no max-pool) for small images and a width multiplier;
- `smallcnn`: a ~1M-parameter plain CNN, sized for CPU runs;
- `smallcnn2`: a ~0.6M-parameter plain CNN with a stride-2 stem, so that full 32 px views cost
  about what 16 px views cost `smallcnn` at half width, with most channels at 8x8 and 4x4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import resnet

ARCHS = ("resnet18", "resnet34", "resnet50", "smallcnn", "smallcnn2")


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    cifar_stem: bool = True
    width: float = 1.0
    head_hidden_dim: int = 0  # 0: same as the encoder's feature dimension (the paper)
    head_out_dim: int = 128
    head_layers: int = 2  # linear layers in the projection head; 1 = linear head

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; choose one of {ARCHS}")
        if self.width <= 0:
            raise ValueError("width must be positive")
        if self.head_layers < 1:
            raise ValueError("head_layers must be >= 1")


class ResNetEncoder(resnet.ResNet):
    """torchvision ResNet with a width multiplier, an optional CIFAR stem and no classifier."""

    def __init__(self, arch: str, width: float = 1.0, cifar_stem: bool = False) -> None:
        block, layers = {
            "resnet18": (resnet.BasicBlock, [2, 2, 2, 2]),
            "resnet34": (resnet.BasicBlock, [3, 4, 6, 3]),
            "resnet50": (resnet.Bottleneck, [3, 4, 6, 3]),
        }[arch]
        super().__init__(block, layers)
        planes = [max(8, round(64 * width * 2**i)) for i in range(4)]
        self.inplanes = planes[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(planes[0])
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.fc = nn.Identity()
        self.feature_dim = planes[3] * block.expansion
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


class SmallCNN(nn.Module):
    """A plain conv-BN-ReLU network for training on a CPU.

    `stride2_stem=False` (`smallcnn`, ~1.1M parameters at width 1): stages at 32, 16, 8 and 4 px.
    `stride2_stem=True` (`smallcnn2`, ~0.57M parameters): 32 px in, stages at 16, 8 and 4 px,
    several times cheaper per image.
    """

    def __init__(self, width: float = 1.0, stride2_stem: bool = False) -> None:
        super().__init__()
        c = [max(8, round(32 * width * m)) for m in (1, 2, 4, 8)]
        # (out_channels, stride) per conv layer
        if stride2_stem:
            plan = [(c[0], 2), (c[1], 2), (c[1], 1), (c[2], 2), (c[2], 1), (c[3], 1)]
        else:  # downsample at the start of each stage but the first
            plan = [(c[0], 1), (c[1], 1), (c[1], 2), (c[2], 1), (c[2], 2), (c[3], 1), (c[3], 2)]
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch, stride in plan:
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = c[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def build_encoder(cfg: ModelConfig) -> nn.Module:
    """The encoder named by `cfg`; it has a `feature_dim` attribute and returns [N, feature_dim]."""
    if cfg.arch == "smallcnn":
        return SmallCNN(cfg.width)
    if cfg.arch == "smallcnn2":
        return SmallCNN(cfg.width, stride2_stem=True)
    return ResNetEncoder(cfg.arch, width=cfg.width, cifar_stem=cfg.cifar_stem)


class ProjectionHead(nn.Module):
    """SimCLR's projection head g(.): `layers` linear layers, BN + ReLU between them.

    [N, in_dim] -> [N, out_dim]. With layers=1 it is a linear head (the paper's ablation).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        dim = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            dim = hidden_dim
        mods.append(nn.Linear(dim, out_dim))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_head(cfg: ModelConfig, feature_dim: int) -> ProjectionHead:
    return ProjectionHead(feature_dim, cfg.head_hidden_dim or feature_dim, cfg.head_out_dim, cfg.head_layers)


class SimCLRModel(nn.Module):
    """encoder f(.) followed by head g(.); `forward` returns the (un-normalised) projections."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_model(cfg: ModelConfig) -> SimCLRModel:
    encoder = build_encoder(cfg)
    return SimCLRModel(encoder, build_head(cfg, encoder.feature_dim))
