"""Linear probe: multinomial logistic regression on frozen, standardised features (full-batch L-BFGS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 300,
    seed: int = 0,
) -> dict[str, float]:
    """Fit on train, report {"train_acc", "test_acc"} (0..1). Features [N, D] float, labels [N] int64."""
    mu = train_features.mean(0, keepdim=True)
    sd = train_features.std(0, keepdim=True).clamp(min=1e-6)
    xtr, xte = (train_features - mu) / sd, (test_features - mu) / sd
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(xtr.shape[1], num_classes, generator=g) * 0.01).requires_grad_()
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, train_labels) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = ((xtr @ w + b).argmax(1) == train_labels).float().mean().item()
        test_acc = ((xte @ w + b).argmax(1) == test_labels).float().mean().item()
    return {"train_acc": train_acc, "test_acc": test_acc}
