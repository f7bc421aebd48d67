"""NT-Xent, SimCLR's contrastive loss, with the negatives of every rank under DDP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.distributed import gather_with_grad, rank_and_world


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (Chen et al. 2020, eq. 1).

    For the 2N views of a (global) batch, z_k = g(f(x_k)) / ||g(f(x_k))||, positives (i, j) the two
    views of the same image:

        l(i, j) = -log( exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) )
        L = 1/(2N) * sum over all 2N ordered positive pairs of l(i, j)

    so each anchor has 1 positive and 2N - 2 negatives. Under DDP each rank holds n = N / world
    images; the projections of all ranks are gathered with gradients, each rank computes the mean
    over its own 2n anchors against all 2N candidates, and DDP's gradient averaging makes the
    update identical to one process on the global batch.

    Shapes: z1, z2: [n, D] (the two views, unnormalised is fine) -> scalar loss.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape or z1.dim() != 2:
            raise ValueError(f"z1 and z2 must both be [n, D]; got {tuple(z1.shape)} and {tuple(z2.shape)}")
        n = z1.shape[0]
        rank, world = rank_and_world()
        local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # [2n, D]
        candidates = gather_with_grad(local) if world > 1 else local  # [2N, D], rank-major
        logits = local @ candidates.T / self.temperature  # [2n, 2N]
        rows = torch.arange(2 * n, device=z1.device)
        offset = rank * 2 * n
        self_cols = offset + rows
        pos_cols = offset + (rows + n) % (2 * n)
        logits = logits.masked_fill(
            torch.zeros_like(logits, dtype=torch.bool).scatter_(1, self_cols[:, None], True), float("-inf")
        )
        return F.cross_entropy(logits, pos_cols)
