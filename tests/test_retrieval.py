"""precision@k by label (pretrain/retrieval.py) against a brute-force numpy computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pretrain.retrieval import nearest_labels, precision_at_k


def brute_force_precision(gallery, gallery_labels, queries, query_labels, k, exclude_self=False):
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    precisions = []
    for i, q in enumerate(queries):
        sims = g @ (q / np.linalg.norm(q))
        order = [j for j in np.argsort(-sims, kind="stable") if not (exclude_self and j == i)]
        precisions.append(np.mean([gallery_labels[j] == query_labels[i] for j in order[:k]]))
    return float(np.mean(precisions))


@pytest.mark.parametrize("k", [1, 10, 37])
def test_precision_at_k_matches_brute_force(k):
    rng = np.random.default_rng(k)
    centres = rng.normal(size=(5, 16))
    gallery_labels, query_labels = rng.integers(0, 5, 300), rng.integers(0, 5, 70)
    gallery = centres[gallery_labels] + rng.normal(scale=1.5, size=(300, 16)) + 3.0  # offset: cosine != dot
    queries = centres[query_labels] + rng.normal(scale=1.5, size=(70, 16)) + 3.0
    expected = brute_force_precision(gallery, gallery_labels, queries, query_labels, k)
    got = precision_at_k(torch.from_numpy(gallery), torch.from_numpy(gallery_labels), torch.from_numpy(queries),
                         torch.from_numpy(query_labels), k=k)
    assert 0.25 < expected < 0.95  # neither trivial nor chance
    assert got == pytest.approx(expected, abs=1e-9)


def test_precision_is_scale_invariant_and_chunking_changes_nothing():
    rng = np.random.default_rng(0)
    x, labels = torch.from_numpy(rng.normal(size=(200, 8))), torch.from_numpy(rng.integers(0, 4, 200))
    scaled = x * torch.from_numpy(rng.uniform(0.1, 10, size=(200, 1)))  # cosine ignores each vector's length
    whole = nearest_labels(x, labels, x[:50], k=10)
    assert torch.equal(whole, nearest_labels(scaled, labels, scaled[:50], k=10, chunk_size=7))


def test_queries_from_the_gallery_can_exclude_themselves():
    rng = np.random.default_rng(1)
    x, labels = rng.normal(size=(120, 6)), rng.integers(0, 3, 120)
    got = precision_at_k(torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(x), torch.from_numpy(labels),
                         k=5, exclude_self=True)
    assert got == pytest.approx(brute_force_precision(x, labels, x, labels, 5, exclude_self=True), abs=1e-9)
    with_self = precision_at_k(torch.from_numpy(x), torch.from_numpy(labels), torch.from_numpy(x),
                               torch.from_numpy(labels), k=5)
    assert with_self > got  # each item finds itself first, a guaranteed hit


def test_bad_arguments_are_errors():
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match="1 <= k <= 10"):
        precision_at_k(x, y, x, y, k=11)
    with pytest.raises(ValueError, match="dimension"):
        precision_at_k(x, y, torch.randn(3, 5), y[:3])
    with pytest.raises(ValueError, match="labels"):
        precision_at_k(x, y[:9], x, y)
