"""The linear probe (pretrain/probe.py): fits what a linear model can fit, agrees with scikit-learn,
and chooses its regularisation on held-out training data only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from pretrain.data import load_folder
from pretrain.probe import L2_GRID, Standardiser, fit_logistic, linear_probe

SAMPLE = Path(__file__).parent / "data" / "cifar10-sample"


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points labelled by the argmax of a fixed random linear map: exactly linearly separable, 4 classes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(20, 4, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, 20, generator=g) * torch.linspace(0.2, 3.0, 20)  # unequal scales: standardising matters
    return x + 5.0, (x @ w).argmax(1)


def test_probe_fits_a_linearly_separable_set():
    xtr, ytr = separable(800, 0)
    xte, yte = separable(400, 1)
    result = linear_probe(xtr, ytr, xte, yte, l2_grid=(1e-4, 1e-3, 1e-2), max_iter=500)
    assert result["train_acc"] >= 0.95 and result["test_acc"] >= 0.9
    assert result["l2"] in (1e-4, 1e-3, 1e-2) and set(result["val_acc"]) == {1e-4, 1e-3, 1e-2}
    # the choice is made on held-out training data: the test labels cannot change it
    shuffled = linear_probe(xtr, ytr, xte, yte[torch.randperm(400, generator=torch.Generator().manual_seed(0))],
                            l2_grid=(1e-4, 1e-3, 1e-2), max_iter=500)
    assert shuffled["l2"] == result["l2"] and shuffled["val_acc"] == result["val_acc"]
    assert shuffled["train_acc"] == result["train_acc"] and shuffled["test_acc"] < 0.5


@pytest.fixture(scope="module")
def pixels():
    """8x8 raw pixels (192 features) of the shipped CIFAR-10 sample: 1,500 train, 500 test images."""
    train = load_folder(SAMPLE / "train", 8, workers=1, progress=False)
    test = load_folder(SAMPLE / "test", 8, workers=1, progress=False)
    return train.images.flatten(1).float(), train.labels, test.images.flatten(1).float(), test.labels


def test_probe_matches_scikit_learn_logistic_regression(pixels):
    xtr, ytr, xte, yte = pixels
    l2 = 1e-2
    ours = linear_probe(xtr, ytr, xte, yte, l2=l2)
    assert ours["converged"] and ours["val_acc"] == {}
    mu, sd = xtr.mean(0), xtr.std(0)
    sk = LogisticRegression(C=1 / (l2 * len(xtr)), tol=1e-8, max_iter=10_000)
    sk.fit(((xtr - mu) / sd).numpy(), ytr.numpy())
    sk_train = sk.score(((xtr - mu) / sd).numpy(), ytr.numpy())
    sk_test = sk.score(((xte - mu) / sd).numpy(), yte.numpy())
    assert 0.2 < sk_test < 0.6  # a real, imperfect classifier: agreement is not automatic
    assert abs(ours["train_acc"] - sk_train) <= 0.01 and abs(ours["test_acc"] - sk_test) <= 0.01


def test_fit_reaches_the_optimum_and_stronger_l2_shrinks_the_weights(pixels):
    xtr, ytr, _, _ = pixels
    x = (xtr - xtr.mean(0)) / xtr.std(0)
    strong, weak = fit_logistic(x, ytr, 10, 1e-1), fit_logistic(x, ytr, 10, 1e-2)
    assert strong.converged and weak.converged and strong.iterations < weak.iterations
    assert strong.weight.norm() < weak.weight.norm()
    barely = fit_logistic(x, ytr, 10, 1e-2, max_iter=5)
    assert not barely.converged and barely.iterations == 5


def test_default_grid_runs_from_strong_to_almost_no_regularisation():
    assert L2_GRID[0] == pytest.approx(0.1) and L2_GRID[-1] == pytest.approx(1e-6) and len(L2_GRID) == 6


def test_a_carried_fit_gives_the_same_logits_on_another_standardisation(pixels):
    xtr, ytr, _, _ = pixels
    part, whole = Standardiser.of(xtr[:700]), Standardiser.of(xtr)
    assert not torch.allclose(part.mean, whole.mean)  # the two differ, so the carry has work to do
    fit = fit_logistic(part(xtr[:700]), ytr[:700], 10, 1e-2)
    carried = part.carry(fit, whole)
    before = part(xtr) @ fit.weight + fit.bias
    after = whole(xtr) @ carried.weight + carried.bias
    assert torch.allclose(before, after, atol=1e-9)


def test_a_warm_start_reaches_the_same_optimum_in_fewer_iterations(pixels):
    xtr, ytr, _, _ = pixels
    x = Standardiser.of(xtr)(xtr)
    cold = fit_logistic(x, ytr, 10, 1e-3)
    near = fit_logistic(x, ytr, 10, 1e-2)
    warm = fit_logistic(x, ytr, 10, 1e-3, init=near)
    assert cold.converged and warm.converged and warm.iterations < cold.iterations
    # a strictly convex objective: one optimum, wherever the solver starts (and in float64 at the end)
    assert warm.weight.dtype == torch.float64
    assert (warm.weight - cold.weight).abs().max() < 1e-3 * cold.weight.abs().max()
    assert torch.equal(warm.predict(x), cold.predict(x))


def test_the_closed_form_gradient_is_autograds():
    from pretrain.probe import _loss_and_grad

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randint(0, 4, (50,), generator=g)
    w = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * 0.3 * (w * w).sum()
    gw, gb = torch.autograd.grad(loss, (w, b))
    ours, ours_w, ours_b = _loss_and_grad(x, y, w.detach(), b.detach(), 0.3)
    assert torch.allclose(ours, loss) and torch.allclose(ours_w, gw) and torch.allclose(ours_b, gb)
