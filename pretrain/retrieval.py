"""Retrieval quality by label: precision@k of cosine nearest neighbours, the figure search shows a user.

The gallery is what is indexed, the queries are what users search with (a separate split, e.g. the
test photos against train + validation). A query's precision@k is the fraction of its k nearest
gallery items (cosine similarity) that share its label; the result is the mean over queries.
When the queries are the gallery itself, pass `exclude_self=True` so that no item finds itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def nearest_labels(
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    k: int = 10,
    exclude_self: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Labels [Q, k] of each query's k nearest gallery items by cosine similarity, nearest first.

    gallery [N, D], gallery_labels [N], queries [Q, D]: any float features (normalised here).
    exclude_self: the queries are the gallery (Q == N, same order); item i never retrieves itself.
    """
    if gallery.shape[0] != gallery_labels.shape[0]:
        raise ValueError(f"gallery has {gallery.shape[0]} items but {gallery_labels.shape[0]} labels")
    if gallery.shape[1] != queries.shape[1]:
        raise ValueError(f"gallery and queries differ in dimension: {gallery.shape[1]} vs {queries.shape[1]}")
    if exclude_self and queries.shape[0] != gallery.shape[0]:
        raise ValueError("exclude_self needs the queries to be the gallery (same number of items)")
    available = gallery.shape[0] - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(f"k={k} needs 1 <= k <= {available} (gallery items a query can retrieve)")
    g = F.normalize(gallery.float(), dim=1)
    q = F.normalize(queries.float(), dim=1)
    out = []
    for i in range(0, q.shape[0], chunk_size):
        sims = q[i : i + chunk_size] @ g.T  # [c, N]
        if exclude_self:
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + i] = -torch.inf
        out.append(gallery_labels[sims.topk(k, dim=1).indices])
    return torch.cat(out)


def precision_at_k(
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    k: int = 10,
    exclude_self: bool = False,
) -> float:
    """Mean over queries of the fraction of the k nearest gallery items with the query's label (0..1)."""
    if queries.shape[0] != query_labels.shape[0]:
        raise ValueError(f"{queries.shape[0]} queries but {query_labels.shape[0]} query labels")
    if queries.shape[0] == 0:
        raise ValueError("no queries")
    hits = nearest_labels(gallery, gallery_labels, queries, k=k, exclude_self=exclude_self) == query_labels[:, None]
    return hits.double().mean().item()
