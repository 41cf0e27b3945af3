"""Exact paired retrieval (regtok.retrieval) against faiss-cpu IndexFlatIP top-10 search, both directions.

    python benchmarks/eval.py --n 50000 --dim 512 [--threads 0] [--chunk 4096] [--repeats 1]

regtok computes, for both directions, the rank of every true match over the whole gallery (so R@1/5/10,
median and mean rank); faiss computes a top-10 list per query in both directions on the same data. Prints
both times and their ratio (target: regtok / faiss <= 1.5). faiss is needed only here (extra "bench").
"""

from __future__ import annotations

import argparse
import os
import time


def _paired_data(n: int, dim: int, seed: int):
    """Two noisy views of the same random points, L2-normalised, float32 (N, D) each."""
    import torch

    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g)
    a = torch.nn.functional.normalize(z + 3.0 * torch.randn(n, dim, generator=g), dim=1)
    b = torch.nn.functional.normalize(z + 3.0 * torch.randn(n, dim, generator=g), dim=1)
    return a.contiguous(), b.contiguous()


def _time_regtok(a, b, chunk: int) -> tuple[float, dict]:
    from regtok.retrieval import retrieval_metrics

    t0 = time.perf_counter()
    metrics = retrieval_metrics(a, b, chunk_size=chunk)
    return time.perf_counter() - t0, metrics


def _time_faiss(a, b) -> float:
    import faiss

    xa, xb = a.numpy(), b.numpy()
    t0 = time.perf_counter()
    for queries, base in ((xa, xb), (xb, xa)):
        index = faiss.IndexFlatIP(base.shape[1])
        index.add(base)
        index.search(queries, 10)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs each")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import faiss
    import torch

    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    a, b = _paired_data(args.n, args.dim, args.seed)
    t_faiss = min(_time_faiss(a, b) for _ in range(args.repeats))
    runs = [_time_regtok(a, b, args.chunk) for _ in range(args.repeats)]
    t_regtok, metrics = min(runs, key=lambda r: r[0])
    print(f"N={args.n} d={args.dim} threads={threads} chunk={args.chunk}")
    for direction, m in metrics.items():
        print(f"  {direction}: " + "  ".join(f"{k}={v:.4f}" for k, v in m.items()))
    print(f"faiss IndexFlatIP top-10, both directions: {t_faiss:.2f} s")
    print(f"regtok exact ranks + R@1/5/10, both directions: {t_regtok:.2f} s")
    print(f"ratio regtok/faiss: {t_regtok / t_faiss:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
