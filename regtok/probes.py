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
    x, y = x.to(torch.float64), torch.as_tensor(y)
    return fit_probes(x[train], x[test], {"y": (y[train], y[test], kind, n_classes)}, seed, val_fraction)["y"]


Target = tuple[Tensor, Tensor, str, "int | None"]  # (y_train (n,), y_test (m,), kind, n_classes)


def fit_probes(x_train: Tensor, x_test: Tensor, targets: dict[str, Target], seed: int = 0,
               val_fraction: float = 0.25) -> dict[str, ProbeResult | None]:
    """Ridge probes of every label in ``targets`` from the features x_train (n, F), scored on x_test (m, F).

    The ridge penalty of each label is chosen on a seeded validation part of the train rows, then the probe is
    refitted on all of them. Labels with every row present share two eigendecompositions (the fit part's and
    the train part's), in the primal (F ≤ n) or the dual (F > n) form, so a wide feature (concatenated
    registers) costs what its row count allows. None for a label with too few labelled rows.
    """
    x_train, x_test = x_train.to(torch.float64), x_test.to(torch.float64)
    out: dict[str, ProbeResult | None] = {}
    complete: dict[str, Target] = {}
    for name, (y_tr, y_te, kind, n_classes) in targets.items():
        if kind not in LABEL_TYPES:
            raise RegtokError(f"label type must be one of {LABEL_TYPES}, got {kind!r}")
        y_tr, y_te = torch.as_tensor(y_tr).to(torch.float64), torch.as_tensor(y_te).to(torch.float64)
        ok_tr, ok_te = _labelled(y_tr, kind), _labelled(y_te, kind)
        if int(ok_tr.sum()) < 4 or int(ok_te.sum()) < 1:
            out[name] = None
            continue
        if kind == "categorical":
            n_classes = int(n_classes or int(torch.cat([y_tr[ok_tr], y_te[ok_te]]).max()) + 1)
        if bool(ok_tr.all()) and bool(ok_te.all()):
            complete[name] = (y_tr, y_te, kind, n_classes)
        else:  # its own labelled rows: its own decompositions
            one = {name: (y_tr[ok_tr], y_te[ok_te], kind, n_classes)}
            out.update(_probe_group(x_train[ok_tr], x_test[ok_te], one, seed, val_fraction))
    if complete:
        out.update(_probe_group(x_train, x_test, complete, seed, val_fraction))
    return {name: out[name] for name in targets}


def _labelled(y: Tensor, kind: str) -> Tensor:
    return torch.isfinite(y) & ((y >= 0) if kind == "categorical" else torch.ones_like(y, dtype=torch.bool))


def _probe_group(x_train: Tensor, x_test: Tensor, targets: dict[str, Target], seed: int,
                 val_fraction: float) -> dict[str, ProbeResult]:
    """Probes of labels that share their rows: one ridge path chooses each penalty, one scores the refit."""
    n = len(x_train)
    fit, val = _split_train(n, val_fraction, seed)
    alphas = tuple(a * len(fit) for a in ALPHA_GRID)
    t_train = torch.cat([_targets(y_tr, kind, c) for y_tr, _, kind, c in targets.values()], dim=1)  # (n, C)
    cols = _columns(targets)
    val_path = _RidgePath.fit(x_train[fit], t_train[fit], x_train[val])
    out = {}
    test_path = _RidgePath.fit(x_train, t_train, x_test)
    for name, (y_tr, y_te, kind, _) in targets.items():
        best_alpha, best = alphas[-1], -float("inf")
        for alpha in reversed(alphas):  # ties go to the larger penalty (the simpler probe)
            pred = val_path.predict(alpha)[:, cols[name]]  # (n_val, C_label)
            y_val = y_tr[val]
            score = _score(pred, y_val, kind) if kind == "categorical" else -float(((pred[:, 0] - y_val) ** 2).mean())
            if score > best:
                best_alpha, best = alpha, score
        alpha = best_alpha * n / len(fit)  # the same penalty per row on the whole train part
        pred = test_path.predict(alpha)[:, cols[name]]
        chance = test_path.intercept[:, cols[name]].expand(len(x_test), -1)
        out[name] = ProbeResult("accuracy" if kind == "categorical" else "r2", _score(pred, y_te, kind),
                                _score(chance, y_te, kind), alpha, n, len(x_test))
    return out


def _columns(targets: dict[str, Target]) -> dict[str, slice]:
    """Each label's columns in the stacked target matrix (one for continuous, n_classes for categorical)."""
    cols, start = {}, 0
    for name, (_, _, kind, n_classes) in targets.items():
        width = n_classes if kind == "categorical" else 1
        cols[name] = slice(start, start + width)
        start += width
    return cols


@dataclass(frozen=True)
class _RidgePath:
    """Ridge predictions on query rows for any penalty from one eigendecomposition: pred(α) = A diag(1/(λ+α)) B.

    Primal (F ≤ n): XᵀX = V Λ Vᵀ, A = Q V, B = Vᵀ Xᵀ T. Dual (F > n): XXᵀ = U Λ Uᵀ, A = Q Xᵀ U, B = Uᵀ T.
    Features are standardised with the fit rows' statistics, targets centred on their mean (the intercept).
    """

    a: Tensor  # (m, r)
    evals: Tensor  # (r,)
    b: Tensor  # (r, C)
    intercept: Tensor  # (1, C)

    @staticmethod
    def fit(x: Tensor, t: Tensor, query: Tensor) -> _RidgePath:
        mean, scale = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-12)  # (F,)
        xs, qs = (x - mean) / scale, (query - mean) / scale  # (n, F), (m, F)
        t_mean = t.mean(0, keepdim=True)  # (1, C)
        tc = t - t_mean  # (n, C)
        if xs.shape[1] <= xs.shape[0]:
            evals, v = torch.linalg.eigh(xs.T @ xs)  # (F,), (F, F)
            return _RidgePath(qs @ v, evals.clamp_min(0), v.T @ (xs.T @ tc), t_mean)
        evals, u = torch.linalg.eigh(xs @ xs.T)  # (n,), (n, n)
        return _RidgePath((qs @ xs.T) @ u, evals.clamp_min(0), u.T @ tc, t_mean)

    def predict(self, alpha: float) -> Tensor:
        return self.a @ (self.b / (self.evals + alpha).unsqueeze(1)) + self.intercept  # (m, C)


def _split_train(n: int, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    n_val = min(n - 2, max(1, round(n * val_fraction)))
    return perm[n_val:], perm[:n_val]


def _targets(y: Tensor, kind: str, n_classes: int | None) -> Tensor:
    if kind == "categorical":
        return torch.nn.functional.one_hot(y.long(), n_classes).to(torch.float64)  # (n, C)
    return y.unsqueeze(1)  # (n, 1)


def _score(pred: Tensor, y: Tensor, kind: str) -> float:
    """Accuracy of argmax predictions, or R² of (n, 1) predictions around the mean of ``y``."""
    if kind == "categorical":
        return float((pred.argmax(1) == y.long()).to(torch.float64).mean())
    sse = float(((pred[:, 0] - y) ** 2).sum())
    sst = float(((y - y.mean()) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else 0.0)


@dataclass(frozen=True)
class RidgeMap:
    """A fitted multi-output ridge regression, applicable to any rows: ``RidgeMap.fit(x, t)(x_new)``."""

    mean: Tensor  # (F,)
    scale: Tensor  # (F,)
    weight: Tensor  # (F, C)
    intercept: Tensor  # (1, C)
    alpha: float

    @classmethod
    def fit(cls, x: Tensor, t: Tensor, seed: int = 0, val_fraction: float = 0.25) -> RidgeMap:
        """Regress t (n, C) on x (n, F) with one penalty for every output, chosen by the squared error on a seeded
        validation part of the rows, then refitted on all of them."""
        x, t = x.to(torch.float64), t.to(torch.float64)
        fit, val = _split_train(len(x), val_fraction, seed)
        alphas = tuple(a * len(fit) for a in ALPHA_GRID)
        path = _RidgePath.fit(x[fit], t[fit], x[val])
        errors = {alpha: float((path.predict(alpha) - t[val]).pow(2).mean()) for alpha in reversed(alphas)}
        alpha = min(errors, key=errors.get) * len(x) / len(fit)
        mean, scale = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-12)  # (F,)
        xs = (x - mean) / scale
        t_mean = t.mean(0, keepdim=True)
        if xs.shape[1] <= xs.shape[0]:  # w = (XᵀX + αI)⁻¹ XᵀT, or in the dual Xᵀ (XXᵀ + αI)⁻¹ T
            weight = torch.linalg.solve(xs.T @ xs + alpha * torch.eye(xs.shape[1], dtype=xs.dtype), xs.T @ (t - t_mean))
        else:
            weight = xs.T @ torch.linalg.solve(xs @ xs.T + alpha * torch.eye(len(xs), dtype=xs.dtype), t - t_mean)
        return cls(mean, scale, weight, t_mean, alpha)

    def __call__(self, x: Tensor) -> Tensor:
        return ((x.to(torch.float64) - self.mean) / self.scale) @ self.weight + self.intercept  # (m, C)
