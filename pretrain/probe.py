"""Linear probe: multinomial logistic regression on frozen features, the standard SimCLR protocol.

The protocol (the same as scikit-learn's `LogisticRegression(solver="lbfgs")` on standardised
features, which `tests/test_pretrain_probe.py` checks it against):

- features are standardised with the training set's per-dimension mean and std;
- the objective is the mean cross-entropy + l2/2 * ||W||^2 (the bias is not penalised), i.e.
  scikit-learn's C = 1 / (l2 * N_train);
- it is minimised full-batch with L-BFGS (strong Wolfe line search, float64) until the largest
  gradient entry is below `tol` or `max_iter` iterations have run (`converged` says which);
- l2 is chosen from `L2_GRID` by accuracy on a held-out 10% of the training set (seeded split),
  never on the test set; the classifier is then refit on the whole training set with that l2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# l2 from 1e-1 to 1e-6 (almost none) in decades, each fit warm-started from the previous one. Half-decades
# cost twice as much and moved nothing: on CIFAR-10 SimCLR features the held-out accuracy varied by 0.3
# points from 1e-3 to 1e-6 (/work/notes/h6-results.md)
L2_GRID: tuple[float, ...] = tuple(10.0**-e for e in range(1, 7))


@dataclass
class LogisticFit:
    weight: torch.Tensor  # [D, C] float64
    bias: torch.Tensor  # [C] float64
    iterations: int
    converged: bool

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() @ self.weight + self.bias).argmax(1)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-5,
    init: LogisticFit | None = None,
) -> LogisticFit:
    """Minimise mean cross-entropy + l2/2 ||W||^2 over W [D, C], b [C] with full-batch L-BFGS.

    x [N, D] float (already standardised), y [N] int64 in 0..num_classes-1.
    """
    x = x.double()
    d = x.shape[1]
    if init is not None:
        w, b = init.weight.clone(), init.bias.clone()
    else:
        w, b = torch.zeros(d, num_classes, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.float64)
    w.requires_grad_()
    b.requires_grad_()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2, tolerance_grad=tol,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    iterations = int(opt.state[w].get("n_iter", 0))
    with torch.enable_grad():
        closure()
    grad_max = max(w.grad.abs().max().item(), b.grad.abs().max().item())
    return LogisticFit(w.detach(), b.detach(), iterations, grad_max <= tol)


def _standardise(fit_on: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mu = fit_on.double().mean(0, keepdim=True)
    sd = fit_on.double().std(0, keepdim=True).clamp(min=1e-6)
    return [(t.double() - mu) / sd for t in (fit_on, *others)]


def _accuracy(fit: LogisticFit, x: torch.Tensor, y: torch.Tensor) -> float:
    return (fit.predict(x) == y).double().mean().item()


def choose_l2(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2_grid: Sequence[float] = L2_GRID,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    seed: int = 0,
) -> tuple[float, dict[float, float]]:
    """The l2 of `l2_grid` with the best accuracy on a held-out `val_fraction` of the training set.

    Returns (best l2, {l2: held-out accuracy}); a tie goes to the stronger regularisation.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = features.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(n * val_fraction))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    xf, xv = _standardise(features[fit_idx], features[val_idx])
    scores: dict[float, float] = {}
    fit = None
    for l2 in sorted(l2_grid, reverse=True):  # strong to weak: each fit starts from a nearby solution
        fit = fit_logistic(xf, labels[fit_idx], num_classes, l2, max_iter=max_iter, init=fit)
        scores[l2] = _accuracy(fit, xv, labels[val_idx])
    best = max(scores, key=lambda l2: (scores[l2], l2))
    return best, scores


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    l2: float | None = None,
    l2_grid: Sequence[float] = L2_GRID,
    val_fraction: float = 0.1,
    max_iter: int = 1000,
    seed: int = 0,
) -> dict[str, object]:
    """Fit on train (l2 chosen on held-out train unless given), report accuracies (0..1) and the protocol's choices.

    Features [N, D] float, labels [N] int64. Returns train_acc, test_acc, l2, val_acc (per l2 tried),
    iterations and converged of the final fit.
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train and test features differ in dimension: {train_features.shape[1]} vs {test_features.shape[1]}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    val_acc: dict[float, float] = {}
    if l2 is None:
        l2, val_acc = choose_l2(train_features, train_labels, num_classes, l2_grid=l2_grid,
                                val_fraction=val_fraction, max_iter=max_iter, seed=seed)
    xtr, xte = _standardise(train_features, test_features)
    fit = fit_logistic(xtr, train_labels, num_classes, l2, max_iter=max_iter)
    return {
        "train_acc": _accuracy(fit, xtr, train_labels), "test_acc": _accuracy(fit, xte, test_labels),
        "l2": l2, "val_acc": val_acc, "iterations": fit.iterations, "converged": fit.converged,
    }
