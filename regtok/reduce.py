"""One vector per sample from cached features of any size: standardise, then PCA, fitted and applied in chunks.

Token features wider than ``TOKEN_DIM`` are first reduced token by token, by one PCA over every token of the fit
rows (the same map at every position), then flattened: a ViT-L-14 row of 257 × 1024 becomes 257 × 64 before its
PCA, so no matrix of (rows × 263,168) is ever built. The PCA is fitted on a seeded subset of at most ``FIT_ROWS``
rows (in the Gram form when there are fewer rows than dimensions); the standardisation's statistics come from
every row. Inputs are anything that slices into (b, D) or (b, T, D) rows (a tensor, a numpy or HDF5 array, a lazy
view of a store); memory grows with ``CHUNK`` and ``FIT_ROWS``, never with the number of rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

TOKEN_DIM = 64  # tokens wider than this are reduced to it before flattening
FIT_ROWS = 4096  # rows (a seeded subset) the PCAs are fitted on
CHUNK = 256  # rows per chunk


class Mapped:
    """A lazy view of ``rows`` (anything that slices) through ``fn``: ``Mapped(x, fn)[a:b] == fn(x[a:b])``."""

    def __init__(self, rows: Any, fn: Callable[[Tensor], Tensor]) -> None:
        self.rows, self.fn = rows, fn
        self.shape = tuple(rows.shape)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: Any) -> Tensor:
        return self.fn(as_tensor(self.rows[idx]))


def as_tensor(x: Any) -> Tensor:
    """A float32 tensor of a chunk (numpy, float16 or any tensor)."""
    return torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x).float()


def chunks(x: Any, rows: np.ndarray | None = None, size: int = CHUNK) -> Any:
    """``x``'s rows (all, or the sorted ``rows``) as float32 tensor chunks of at most ``size``."""
    n = len(x) if rows is None else len(rows)
    for start in range(0, n, size):
        yield as_tensor(x[start:start + size] if rows is None else x[rows[start:start + size]])


def fit_rows(n: int, cap: int, seed: int) -> np.ndarray | None:
    """A seeded sorted subset of at most ``cap`` of ``n`` rows, or None for all of them."""
    if n <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


@dataclass
class Reducer:
    """Standardise, then project on the top principal components of the fit rows: (N, …) → (N, K)."""

    mean: Tensor  # (F,) of the flattened (token-reduced) features
    std: Tensor  # (F,)
    components: Tensor | None  # (F, K) or None when F <= max_dim (standardisation only)
    token_basis: Tensor | None = None  # (D, r): each token's PCA, for tokens wider than TOKEN_DIM

    @classmethod
    def fit(cls, x: Any, max_dim: int, token_dim: int = TOKEN_DIM, max_rows: int = FIT_ROWS,
            seed: int = 0) -> Reducer:
        """Fit on ``x`` (N, D) or (N, T, D): statistics over every row, PCAs over at most ``max_rows`` of them."""
        sample = fit_rows(len(x), max_rows, seed)
        basis = _token_pca(x, sample, token_dim) if len(x.shape) == 3 and x.shape[2] > token_dim else None
        red = cls(torch.zeros(0), torch.zeros(0), None, basis)
        s1 = s2 = 0.0
        for c in chunks(x):
            f = red.flatten(c).double()  # (b, F)
            s1, s2 = s1 + f.sum(0), s2 + (f * f).sum(0)
        n = len(x)
        mean = s1 / n
        red.mean = mean
        red.std = ((s2 - n * mean * mean) / max(n - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-6)  # unbiased, as .std()
        z = torch.cat([(red.flatten(c).double() - red.mean) / red.std for c in chunks(x, sample)])  # (n_s, F)
        if z.shape[1] > max_dim:
            k = min(max_dim, z.shape[0] - 1)
            if z.shape[0] < z.shape[1]:  # top-k right singular vectors; the Gram form is exact and cheap when N < F
                evals, evecs = torch.linalg.eigh(z @ z.T)  # (n_s,), (n_s, n_s), ascending
                top = evecs[:, -k:].flip(1) / evals[-k:].flip(0).clamp_min(1e-12).sqrt()  # (n_s, k)
                red.components = z.T @ top  # (F, k), orthonormal columns
            else:
                red.components = torch.linalg.eigh(z.T @ z)[1][:, -k:].flip(1)  # (F, k)
        return red

    def flatten(self, x: Tensor) -> Tensor:
        """A chunk (b, D) or (b, T, D) → (b, F): tokens through the token PCA first, if any."""
        if self.token_basis is not None:
            x = x.to(self.token_basis.dtype) @ self.token_basis  # (b, T, r)
        return x.reshape(len(x), -1)

    def __call__(self, x: Any) -> Tensor:
        """(N, …) → (N, K) float32, chunk by chunk."""
        out = []
        for c in chunks(x):
            z = (self.flatten(c).double() - self.mean) / self.std  # (b, F)
            out.append((z if self.components is None else z @ self.components).float())
        return torch.cat(out) if out else torch.zeros(0, self.width)

    @property
    def width(self) -> int:
        return len(self.mean) if self.components is None else self.components.shape[1]


def _token_pca(x: Any, sample: np.ndarray | None, width: int) -> Tensor:
    """The top ``width`` principal directions (D, width) of the tokens of the fit rows, float64."""
    s1 = cov = 0.0
    n = 0
    for c in chunks(x, sample):
        t = c.reshape(-1, c.shape[-1]).double()  # (b·T, D)
        s1, cov, n = s1 + t.sum(0), cov + t.T @ t, n + len(t)
    mean = s1 / n
    evecs = torch.linalg.eigh(cov / n - torch.outer(mean, mean))[1]  # ascending
    return evecs[:, -width:].flip(1)  # (D, width)
