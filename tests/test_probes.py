"""Ridge probes recover a planted linear factor and not an absent one; splits are deterministic."""

from __future__ import annotations

import pytest
import torch

from regtok.errors import RegtokError
from regtok.probes import fit_probe, split_indices


def _features(n: int = 600, d: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Generator]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.1, 3.0, d), g


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, test = split_indices(101, 0.3, seed=7)
    assert len(test) == 30 and len(train) == 71
    assert sorted(torch.cat([train, test]).tolist()) == list(range(101))
    again = split_indices(101, 0.3, seed=7)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    assert not torch.equal(split_indices(101, 0.3, seed=8)[1], test)
    with pytest.raises(RegtokError):
        split_indices(10, 1.0, seed=0)


def test_continuous_planted_factor_is_recovered() -> None:
    x, g = _features()
    w = torch.randn(x.shape[1], generator=g)
    y = x @ w + 0.1 * torch.randn(len(x), generator=g)
    train, test = split_indices(len(x), 0.3, seed=0)
    r = fit_probe(x, y, "continuous", train, test, seed=0)
    assert r is not None and r.metric == "r2"
    assert r.value > 0.95 and r.chance <= 0.0
    assert (r.n_train, r.n_test) == (len(train), len(test))


def test_continuous_absent_factor_is_not_recovered() -> None:
    x, g = _features()
    y = torch.randn(len(x), generator=g)  # independent of x
    train, test = split_indices(len(x), 0.3, seed=0)
    r = fit_probe(x, y, "continuous", train, test, seed=0)
    assert r is not None and r.value < 0.1


def test_categorical_planted_factor_is_recovered_and_absent_one_is_chance() -> None:
    x, g = _features(n=900)
    w = torch.randn(x.shape[1], 4, generator=g)
    y = (x @ w).argmax(1)  # 4 classes, linearly separable
    train, test = split_indices(len(x), 0.3, seed=1)
    r = fit_probe(x, y, "categorical", train, test, n_classes=4, seed=1)
    assert r is not None and r.metric == "accuracy"
    assert r.value > 0.8 and r.value > r.chance + 0.3
    noise = torch.randint(0, 4, (len(x),), generator=g)
    r0 = fit_probe(x, noise, "categorical", train, test, n_classes=4, seed=1)
    assert r0 is not None and r0.value < 0.4


def test_missing_labels_are_dropped_and_penalty_is_deterministic() -> None:
    x, g = _features(n=300)
    y = x[:, -1].clone()
    y[::3] = float("nan")
    train, test = split_indices(len(x), 0.3, seed=0)
    r1 = fit_probe(x, y, "continuous", train, test, seed=3)
    r2 = fit_probe(x, y, "continuous", train, test, seed=3)
    assert r1 == r2 and r1 is not None
    assert r1.n_train + r1.n_test == 200 and r1.value > 0.95
    cls = torch.full((300,), -1)
    assert fit_probe(x, cls, "categorical", train, test) is None  # no labelled rows


def test_unknown_label_type_is_an_error() -> None:
    x, _ = _features(n=20)
    with pytest.raises(RegtokError, match="label type"):
        fit_probe(x, torch.zeros(20), "ordinal", *split_indices(20, 0.5, 0))
