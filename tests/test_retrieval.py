"""Chunked paired retrieval against a naive full-matrix reference and CLIP_benchmark's recall@k logic."""

from __future__ import annotations

import pytest
import torch

from regtok.errors import RegtokError
from regtok.retrieval import chance_metrics, l2_normalize, paired_ranks, rank_metrics, retrieval_metrics


def _pair(n: int, d: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    a = l2_normalize(z + noise * torch.randn(n, d, generator=g))
    b = l2_normalize(z + noise * torch.randn(n, d, generator=g))
    return a, b


def _naive_ranks(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Full score matrix, rank by sorting: position of the true item, ties placed before it (pessimistic)."""
    s = (q.double() @ g.double().T).float()  # (N, N) higher precision, then the same float32 rounding
    ranks = []
    for i in range(len(s)):
        order = sorted(range(len(s)), key=lambda j: (-float(s[i, j]), j == i))  # ties: others first
        ranks.append(order.index(i) + 1)
    return torch.tensor(ranks)


def _clip_benchmark_recall(scores: torch.Tensor, positive_pairs: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's recall_at_k (metrics/zeroshot_retrieval.py), re-implemented: top-k one-hot ∩ positives."""
    n_q, n_g = scores.shape
    topk = torch.topk(scores, k, dim=1).indices  # (Q, k)
    onehot = torch.nn.functional.one_hot(topk, num_classes=n_g)  # (Q, k, G)
    hits = (onehot * positive_pairs.view(n_q, 1, n_g)).sum(dim=(1, 2))  # (Q,)
    recall = hits / positive_pairs.sum(dim=1)
    return float((recall > 0).double().mean())  # CLIP-style: 1 if any positive is in the top k


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_equals_naive_reference(chunk: int) -> None:
    a, b = _pair(120, 16, noise=1.5, seed=1)
    expected = _naive_ranks(a, b)
    got = paired_ranks(a, b, chunk_size=chunk)
    assert got.dtype == torch.int64 and got.shape == (120,)
    assert torch.equal(got, expected)
    assert torch.equal(paired_ranks(b, a, chunk_size=chunk), _naive_ranks(b, a))


def test_max_chunk_bytes_shrinks_chunks_without_changing_ranks() -> None:
    a, b = _pair(200, 8, noise=2.0, seed=2)
    assert torch.equal(paired_ranks(a, b, chunk_size=4096, max_chunk_bytes=4 * 200 * 3), paired_ranks(a, b))


def test_matches_clip_benchmark_recall_at_k() -> None:
    a, b = _pair(300, 32, noise=1.2, seed=3)
    ours = retrieval_metrics(a, b, chunk_size=50)
    positives = torch.eye(300, dtype=torch.long)
    for k in (1, 5, 10):
        assert ours["a_to_b"][f"R@{k}"] == pytest.approx(_clip_benchmark_recall(a @ b.T, positives, k), abs=1e-12)
        assert ours["b_to_a"][f"R@{k}"] == pytest.approx(_clip_benchmark_recall(b @ a.T, positives, k), abs=1e-12)
    assert 0.0 < ours["a_to_b"]["R@1"] < 1.0  # a case where the comparison means something


def test_perfect_pairing_gives_recall_one() -> None:
    a, _ = _pair(500, 32, noise=0.0, seed=4)
    m = retrieval_metrics(a, a.clone(), chunk_size=128)
    for direction in ("a_to_b", "b_to_a"):
        assert m[direction]["R@1"] == 1.0 and m[direction]["median_rank"] == 1.0 and m[direction]["mean_rank"] == 1.0


def test_shuffled_pairing_is_near_chance() -> None:
    n = 2000
    a, b = _pair(n, 32, noise=0.1, seed=5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    m = retrieval_metrics(a, b[perm], chunk_size=512)["a_to_b"]
    chance = chance_metrics(n)
    assert m["R@10"] < 4 * chance["R@10"] + 0.005
    assert abs(m["mean_rank"] - chance["mean_rank"]) < 0.1 * n
    assert abs(m["median_rank"] - chance["median_rank"]) < 0.1 * n


def test_ties_count_against_the_query() -> None:
    # Gallery rows 0..3 identical: every query among them ties with 3 others → rank 4.
    g = torch.tensor([[1.0, 0.0]] * 4 + [[0.0, 1.0], [-1.0, 0.0]])
    q = g.clone()
    ranks = paired_ranks(q, g, chunk_size=2)
    assert ranks.tolist() == [4, 4, 4, 4, 1, 1]
    collapsed = torch.ones(50, 4)
    assert paired_ranks(collapsed, collapsed).tolist() == [50] * 50  # a collapsed model ranks last, not first


def test_rank_metrics_by_hand() -> None:
    m = rank_metrics(torch.tensor([1, 2, 6, 11]))
    assert m == {"R@1": 0.25, "R@5": 0.5, "R@10": 0.75, "median_rank": 4.0, "mean_rank": 5.0}


def test_chance_metrics() -> None:
    m = chance_metrics(100)
    assert m["R@1"] == 0.01 and m["R@10"] == 0.1 and m["mean_rank"] == 50.5
    assert chance_metrics(3)["R@5"] == 1.0


def test_bad_inputs_are_clear_errors() -> None:
    a, b = _pair(10, 4, noise=1.0)
    with pytest.raises(RegtokError, match="one shape"):
        paired_ranks(a, b[:5])
    b[3, 1] = float("nan")
    with pytest.raises(RegtokError, match="NaN"):
        paired_ranks(a, b)
