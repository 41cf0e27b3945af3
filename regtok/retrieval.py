"""Exact paired cross-modal retrieval metrics, chunked over queries so that N = 100k fits in memory.

Query ``i`` and gallery item ``i`` are the true pair; every gallery item is a candidate. Scores are inner
products in float32 (pass L2-normalised embeddings for cosine).

Tie rule (pessimistic): the rank of the true match is the number of gallery items whose score is ``>=`` the
true pair's score, the true item included, i.e. ``rank = 1 + #{j != i : s_ij >= s_ii}``. A tie counts
against the query, so a collapsed model (all embeddings equal) gets rank N, never rank 1. The true score
is read from the same score matrix as the others, so the comparison is exact on the float32 values computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from regtok.errors import RegtokError

RECALL_KS = (1, 5, 10)
DEFAULT_MAX_CHUNK_BYTES = 1 << 30  # one chunk of scores at most this large (float32)


def paired_ranks(queries: Tensor, gallery: Tensor, chunk_size: int = 4096, device: str | torch.device | None = None,
                 max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> Tensor:
    """Rank (1-based, pessimistic ties) of ``gallery[i]`` among all gallery items for ``queries[i]``.

    queries, gallery: (N, E), paired by row. Returns (N,) int64 on the CPU. One GEMM per chunk of queries;
    the chunk shrinks so that a chunk of scores stays under ``max_chunk_bytes``.
    """
    if queries.ndim != 2 or queries.shape != gallery.shape:
        raise RegtokError(f"paired retrieval needs two (N, E) arrays of one shape, got {tuple(queries.shape)} "
                          f"and {tuple(gallery.shape)}")
    n = queries.shape[0]
    device = torch.device(device) if device is not None else gallery.device
    q = queries.to(device=device, dtype=torch.float32)  # (N, E)
    g = gallery.to(device=device, dtype=torch.float32)  # (N, E)
    if n >= 1 << 24:
        raise RegtokError(f"paired retrieval counts in float32 and supports N < 2**24, got N = {n}")
    if not (torch.isfinite(q).all() and torch.isfinite(g).all()):
        raise RegtokError("retrieval embeddings contain NaN or inf")
    step = max(1, min(chunk_size, max_chunk_bytes // max(1, 4 * n)))
    ranks = torch.empty(n, dtype=torch.int64, device=device)
    for start in range(0, n, step):
        end = min(start + step, n)
        scores = q[start:end] @ g.T  # (C, N)
        rows = torch.arange(end - start, device=device)
        true = scores[rows, rows + start].unsqueeze(1)  # (C, 1), taken from the same matrix
        # In place 0/1 then a float32 sum: far cheaper than a bool tensor, and exact while N < 2**24.
        ranks[start:end] = scores.ge_(true).sum(dim=1).to(torch.int64)  # the true item counts itself: >= 1
    return ranks.cpu()


def rank_metrics(ranks: Tensor, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """``{"R@k": fraction with rank <= k, …, "median_rank", "mean_rank"}`` of 1-based ranks (N,)."""
    r = ranks.to(torch.float64)
    out = {f"R@{k}": float((r <= k).to(torch.float64).mean()) for k in ks}
    out["median_rank"] = float(torch.quantile(r, 0.5)) if r.numel() else float("nan")
    out["mean_rank"] = float(r.mean())
    return out


def chance_metrics(n: int, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """The same metrics for a random ranking of N items: R@k = min(k, N)/N, median and mean rank (N+1)/2."""
    out = {f"R@{k}": min(k, n) / n for k in ks}
    out["median_rank"] = (n + 1) / 2
    out["mean_rank"] = (n + 1) / 2
    return out


def retrieval_metrics(a: Tensor, b: Tensor, chunk_size: int = 4096, device: str | torch.device | None = None,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, dict[str, float]]:
    """Both directions for paired embeddings a, b (N, E): ``{"a_to_b": metrics, "b_to_a": metrics}``."""
    return {
        "a_to_b": rank_metrics(paired_ranks(a, b, chunk_size, device), ks),
        "b_to_a": rank_metrics(paired_ranks(b, a, chunk_size, device), ks),
    }


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit norm in float32 (zero rows stay zero)."""
    x = x.to(torch.float32)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)
