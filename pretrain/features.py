"""Frozen-encoder features of a uint8 image tensor, for the kNN monitor, `eval` and the bench."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    precision: str = "fp32",
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> l2-normalised float32 features [N, D] on the CPU (encoder in eval mode)."""
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    out = []
    try:
        for i in range(0, images.shape[0], batch_size):
            x = images[i : i + batch_size].to(device, non_blocking=True).float().div_(255).sub_(m).div_(s)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                f = encoder(x)
            out.append(F.normalize(f.float(), dim=1).cpu())
    finally:
        encoder.train(was_training)
    return torch.cat(out)
