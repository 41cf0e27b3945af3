"""Closed-form linear probes: ridge regression for continuous labels, one-hot ridge for categorical ones.

A probe is fit on a train part and scored on a held-out test part of the evaluated split. The ridge
penalty is chosen on a validation split of the train part (never the test part), then the probe is refit
on the whole train part. Features are standardised with train-part statistics. Everything is float64 and
deterministic given the seed.

Scores: class accuracy (categorical) and R² = 1 - SSE/SST around the test-part mean (continuous). Each
result also carries ``chance``: the score of the constant predictor fit on the train part (majority class,
or the train mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from regtok.errors import RegtokError

LABEL_TYPES = ("categorical", "continuous")
ALPHA_GRID = tuple(10.0 ** e for e in (-3, -2, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4))  # × n_fit (features standardised)


@dataclass(frozen=True)
class ProbeResult:
    """One probe's held-out score."""

    metric: str  # "accuracy" or "r2"
    value: float
    chance: float  # the constant predictor's score on the same test part
    alpha: float  # the chosen ridge penalty (absolute, on standardised features)
    n_train: int
    n_test: int


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A deterministic (train, test) split of range(n); both sorted, the test part at least 1 row when n >= 2."""
    if not 0.0 < test_fraction < 1.0:
        raise RegtokError(f"probe test fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = min(n - 1, max(1, round(n * test_fraction))) if n >= 2 else 0
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def fit_probe(x: Tensor, y: Tensor, kind: str, train: Tensor, test: Tensor, n_classes: int | None = None,
              seed: int = 0, val_fraction: float = 0.25) -> ProbeResult | None:
    """Fit a ridge probe of ``y`` from ``x`` on rows ``train`` and score it on rows ``test``.

    x: (N, F) features; y: (N,) labels (class indices for categorical, reals for continuous). Rows whose
    label is missing (negative class, non-finite value) are dropped. Returns None when too few rows remain.
    """
    if kind not in LABEL_TYPES:
        raise RegtokError(f"label type must be one of {LABEL_TYPES}, got {kind!r}")
    x = x.to(torch.float64)
    y = torch.as_tensor(y).to(torch.float64)
    valid = torch.isfinite(y) & ((y >= 0) if kind == "categorical" else torch.ones_like(y, dtype=torch.bool))
    train, test = train[valid[train]], test[valid[test]]
    if len(train) < 4 or len(test) < 1:
        return None
    n_classes = int(n_classes or int(y[valid].max()) + 1) if kind == "categorical" else None
    fit, val = _split_train(len(train), val_fraction, seed)
    alpha = _choose_alpha(x[train[fit]], y[train[fit]], x[train[val]], y[train[val]], kind, n_classes)
    model = _Ridge.fit(x[train], _targets(y[train], kind, n_classes), alpha)
    value = _score(model.predict(x[test]), y[test], kind)
    chance = _score(model.intercept.expand(len(test), -1), y[test], kind)
    return ProbeResult("accuracy" if kind == "categorical" else "r2", value, chance, alpha, len(train), len(test))


@dataclass(frozen=True)
class _Ridge:
    mean: Tensor  # (F,) feature mean of the fit rows
    scale: Tensor  # (F,) feature std of the fit rows
    weight: Tensor  # (F, C)
    intercept: Tensor  # (1, C) target mean of the fit rows

    @staticmethod
    def fit(x: Tensor, t: Tensor, alpha: float) -> _Ridge:
        return _Ridge.fit_path(x, t, (alpha,))[0]

    @staticmethod
    def fit_path(x: Tensor, t: Tensor, alphas: tuple[float, ...]) -> list[_Ridge]:
        """One eigendecomposition of the Gram matrix, every penalty: w = V diag(1/(λ+α)) Vᵀ Xᵀ T."""
        mean, scale = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-12)  # (F,)
        xs = (x - mean) / scale  # (n, F)
        t_mean = t.mean(0, keepdim=True)  # (1, C)
        evals, evecs = torch.linalg.eigh(xs.T @ xs)  # (F,), (F, F)
        proj = evecs.T @ (xs.T @ (t - t_mean))  # (F, C)
        out = []
        for alpha in alphas:
            w = evecs @ (proj / (evals.clamp_min(0) + alpha).unsqueeze(1))  # (F, C)
            out.append(_Ridge(mean, scale, w, t_mean))
        return out

    def predict(self, x: Tensor) -> Tensor:
        return ((x - self.mean) / self.scale) @ self.weight + self.intercept  # (n, C)


def _split_train(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_val = min(n - 2, max(1, round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _targets(y: Tensor, kind: str, n_classes: int | None) -> Tensor:
    if kind == "categorical":
        return torch.nn.functional.one_hot(y.long(), n_classes).to(torch.float64)  # (n, C)
    return y.unsqueeze(1)  # (n, 1)


def _choose_alpha(x_fit: Tensor, y_fit: Tensor, x_val: Tensor, y_val: Tensor, kind: str,
                  n_classes: int | None) -> float:
    """The penalty with the best validation score; ties go to the larger penalty (the simpler probe)."""
    alphas = tuple(a * len(x_fit) for a in ALPHA_GRID)
    models = _Ridge.fit_path(x_fit, _targets(y_fit, kind, n_classes), alphas)
    best_alpha, best = alphas[-1], -float("inf")
    for alpha, model in reversed(list(zip(alphas, models, strict=True))):
        pred = model.predict(x_val)  # (n_val, C)
        score = _score(pred, y_val, kind) if kind == "categorical" else -float(((pred[:, 0] - y_val) ** 2).mean())
        if score > best:
            best_alpha, best = alpha, score
    return best_alpha


def _score(pred: Tensor, y: Tensor, kind: str) -> float:
    """Accuracy of argmax predictions, or R² of (n, 1) predictions around the mean of ``y``."""
    if kind == "categorical":
        return float((pred.argmax(1) == y.long()).to(torch.float64).mean())
    sse = float(((pred[:, 0] - y) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)
