"""One vector per sample from cached features of any size: standardise, then PCA, fitted and applied in chunks.

Token features wider than ``TOKEN_DIM`` are first reduced token by token, by one PCA over every token of the fit
rows (the same map at every position), then flattened: a ViT-L-14 row of 257 × 1024 becomes 257 × 64 before its
PCA, so no matrix of (rows × 263,168) is ever built. The PCA is fitted on a seeded subset of at most ``FIT_ROWS``
rows (in the Gram form when there are fewer rows than dimensions), the token PCA on at most ``TOKEN_FIT_ROWS``
rows (in float32 chunks: 1,024 rows of ViT-L-14 hold 263,168 tokens for a 1,024 × 1,024 covariance); the
standardisation's statistics come from every row. Inputs are anything that slices into (b, D) or (b, T, D) rows (a
tensor, a numpy or HDF5 array, a lazy view of a store). While fitting, the flattened (token-reduced) rows are kept
in memory up to ``CACHE_BYTES`` (1.3 GB for 20,000 ViT-L-14 rows, a sixteenth of their tokens), so the input is read
once after the token PCA's sample; beyond that every pass reads it again, and memory grows with ``CHUNK`` and
``FIT_ROWS`` only.
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
TOKEN_FIT_ROWS = 1024  # rows (a seeded subset) the token PCA is fitted on
CHUNK = 256  # rows per chunk
CACHE_BYTES = 2 << 30  # flattened (token-reduced) float32 rows kept in memory while fitting: 20,000 ViT-L-14 rows


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
        return cls._fit(x, max_dim, token_dim, max_rows, seed)[0]

    @classmethod
    def fit_transform(cls, x: Any, max_dim: int, token_dim: int = TOKEN_DIM, max_rows: int = FIT_ROWS,
                      seed: int = 0) -> tuple[Reducer, Tensor]:
        """:meth:`fit`, and ``x`` through it (N, K) float32, as ``red(x)`` gives it but without reading ``x`` again
        when its flattened rows fit in CACHE_BYTES."""
        red, flat = cls._fit(x, max_dim, token_dim, max_rows, seed)
        return red, red._project(flat)

    @classmethod
    def _fit(cls, x: Any, max_dim: int, token_dim: int, max_rows: int, seed: int) -> tuple[Reducer, Any]:
        """The fitted reducer and ``x``'s flattened (token-reduced) rows: float32 in memory, or a lazy view."""
        sample = fit_rows(len(x), max_rows, seed)
        basis = _token_pca(x, token_dim, seed) if len(x.shape) == 3 and x.shape[2] > token_dim else None
        red = cls(torch.zeros(0), torch.zeros(0), None, basis)
        flat = red._flattened(x)  # (N, F)
        s1 = s2 = 0.0
        for f in chunks(flat):
            f = f.double()  # (b, F)
            s1, s2 = s1 + f.sum(0), s2 + (f * f).sum(0)
        n = len(x)
        mean = s1 / n
        red.mean = mean
        red.std = ((s2 - n * mean * mean) / max(n - 1, 1)).clamp_min(0).sqrt().clamp_min(1e-6)  # unbiased, as .std()
        z = torch.cat([(f.double() - red.mean) / red.std for f in chunks(flat, sample)])  # (n_s, F)
        if z.shape[1] > max_dim:
            k = min(max_dim, z.shape[0] - 1)
            if z.shape[0] < z.shape[1]:  # top-k right singular vectors; the Gram form is exact and cheap when N < F
                evals, evecs = torch.linalg.eigh(z @ z.T)  # (n_s,), (n_s, n_s), ascending
                top = evecs[:, -k:].flip(1) / evals[-k:].flip(0).clamp_min(1e-12).sqrt()  # (n_s, k)
                red.components = z.T @ top  # (F, k), orthonormal columns
            else:
                red.components = torch.linalg.eigh(z.T @ z)[1][:, -k:].flip(1)  # (F, k)
        return red, flat

    def flatten(self, x: Tensor) -> Tensor:
        """A chunk (b, D) or (b, T, D) → (b, F): tokens through the token PCA first, if any."""
        if self.token_basis is not None:
            x = x.to(self.token_basis.dtype) @ self.token_basis  # (b, T, r)
        return x.reshape(len(x), -1)

    def _flattened(self, x: Any) -> Any:
        """``x``'s rows through :meth:`flatten`: a float32 tensor (N, F) when it takes at most CACHE_BYTES (one
        read of ``x`` then serves every later pass), else a lazy view (each pass reads ``x`` again)."""
        lazy = Mapped(x, self.flatten)
        width = int(np.prod(x.shape[1:])) if self.token_basis is None else x.shape[1] * self.token_basis.shape[1]
        if len(x) * width * 4 > CACHE_BYTES:
            return lazy
        return torch.cat(list(chunks(lazy))) if len(x) else torch.zeros(0, width)

    def __call__(self, x: Any) -> Tensor:
        """(N, …) → (N, K) float32, chunk by chunk."""
        return self._project(Mapped(x, self.flatten))

    def _project(self, flat: Any) -> Tensor:
        """Flattened rows (N, F) → (N, K) float32, chunk by chunk."""
        out = []
        for f in chunks(flat):
            z = (f.double() - self.mean) / self.std  # (b, F)
            out.append((z if self.components is None else z @ self.components).float())
        return torch.cat(out) if out else torch.zeros(0, self.width)

    @property
    def width(self) -> int:
        return len(self.mean) if self.components is None else self.components.shape[1]


def _token_pca(x: Any, width: int, seed: int) -> Tensor:
    """The top ``width`` principal directions (D, width) float32 of the tokens of at most TOKEN_FIT_ROWS rows.

    Each chunk's products are taken in float32 around the first chunk's mean and summed in float64, so a large
    common offset (frozen encoders' tokens share one) costs no precision."""
    pilot = s1 = cov = None
    n = 0
    for c in chunks(x, fit_rows(len(x), TOKEN_FIT_ROWS, seed)):
        t = c.reshape(-1, c.shape[-1])  # (b·T, D)
        pilot = t.mean(0) if pilot is None else pilot
        t = t - pilot
        s1 = t.double().sum(0) + (0 if s1 is None else s1)
        cov = (t.T @ t).double() + (0 if cov is None else cov)
        n += len(t)
    mean = s1 / n
    evecs = torch.linalg.eigh(cov / n - torch.outer(mean, mean))[1]  # ascending
    return evecs[:, -width:].flip(1).float()  # (D, width)
