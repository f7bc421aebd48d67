"""NT-Xent against the paper's Algorithm 1 written as a slow loop, and against a closed form."""

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.loss import NTXentLoss


def algorithm1_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """SimCLR Algorithm 1, literally: z_{2k-1}, z_{2k} are the two views of image k."""
    n = z1.shape[0]
    z = [None] * (2 * n)
    for k in range(n):
        z[2 * k], z[2 * k + 1] = z1[k] / z1[k].norm(), z2[k] / z2[k].norm()

    def sim(u, v):
        return float(u @ v)

    def ell(i, j):
        denom = sum(math.exp(sim(z[i], z[m]) / tau) for m in range(2 * n) if m != i)
        return -math.log(math.exp(sim(z[i], z[j]) / tau) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n)) / (2 * n)


@pytest.mark.parametrize("n,d,tau", [(2, 3, 0.5), (5, 8, 0.1), (7, 4, 1.0)])
def test_matches_algorithm1(n, d, tau):
    g = torch.Generator().manual_seed(n * 100 + d)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    got = NTXentLoss(tau)(z1, z2).item()
    assert got == pytest.approx(algorithm1_loss(z1, z2, tau), rel=1e-5)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_all_equal_projections_give_log_2n_minus_1(n):
    z = torch.ones(n, 5) * 3.0
    # every similarity is 1: the positive is one of 2N-1 equal terms
    assert NTXentLoss(0.3)(z, z.clone()).item() == pytest.approx(math.log(2 * n - 1), abs=1e-5)


def test_symmetric_in_the_two_views():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    loss = NTXentLoss(0.2)
    assert loss(z1, z2).item() == pytest.approx(loss(z2, z1).item(), rel=1e-6)


def test_temperature_changes_the_value_and_perfect_pairs_score_low():
    g = torch.Generator().manual_seed(2)
    z1 = F.normalize(torch.randn(8, 16, generator=g), dim=1)
    z2 = z1 + 0.01 * torch.randn(8, 16, generator=g)
    low, high = NTXentLoss(0.1)(z1, z2).item(), NTXentLoss(1.0)(z1, z2).item()
    assert low != pytest.approx(high, rel=1e-3)
    assert low < math.log(2 * 8 - 1)  # aligned positives beat the uniform value


def test_gradients_flow_to_both_views_and_bad_shapes_raise():
    z1 = torch.randn(4, 3, requires_grad=True)
    z2 = torch.randn(4, 3, requires_grad=True)
    NTXentLoss(0.5)(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        NTXentLoss(0.5)(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError):
        NTXentLoss(0.0)
