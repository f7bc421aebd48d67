"""Weighted kNN classification on l2-normalised features (InstDisc / DINO protocol).

Each test feature votes with its k nearest training features by cosine similarity; a neighbour
with similarity s adds exp(s / T) to its class (T = 0.07, k = 20 by default).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Predicted labels [Q] for test features [Q, D] given the memory bank [N, D] with labels [N].

    Features must be l2-normalised (so the dot product is the cosine similarity).
    """
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train_features and train_labels disagree on N")
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train_features.shape[0])
    preds = []
    for i in range(0, test_features.shape[0], chunk_size):
        sims = test_features[i : i + chunk_size] @ train_features.T  # [q, N]
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (0..1) of `knn_predict` on labelled test features."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    preds = knn_predict(train_features, train_labels, test_features, k=k, temperature=temperature, num_classes=num_classes)
    return (preds == test_labels).float().mean().item()
