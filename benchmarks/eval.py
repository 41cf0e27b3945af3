"""Exact paired retrieval (regtok.retrieval) against faiss-cpu IndexFlatIP top-10 search, both directions;
with --stage, what the linear baselines add to a whole `regtok eval`.

    python benchmarks/eval.py --n 50000 --dim 512 [--threads 0] [--chunk 4096] [--repeats 1]
    python benchmarks/eval.py --stage [--samples 2000] [--repeats 3] [--kind pooled|tokens]

--stage synthesises a training and a held-out split (tiny encoders), trains a tiny run, then times
`run_eval` with and without baselines, alternating, and prints the median of each and their ratio
(target: with / without <= 1.3).

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


def _stage(samples: int, repeats: int, kind: str) -> None:
    """Time run_eval with and without the linear baselines on a tiny run (see the module docstring)."""
    import dataclasses
    import io
    import statistics
    import tempfile
    from pathlib import Path

    from rich.console import Console

    from regtok.config import TrainConfig, resolve
    from regtok.evaluate import EvalConfig
    from regtok.pipeline.data.synth import synthesize
    from regtok.pipeline.eval.stage import run_eval
    from regtok.pipeline.extract.stage import ExtractConfig, run_extract
    from regtok.pipeline.train.stage import train_run

    work = Path(tempfile.mkdtemp(prefix="regtok-bench-eval-"))
    for name, n, seed in (("train", samples, 0), ("test", max(100, samples // 4), 1)):
        synthesize(work / f"shards-{name}", n, 2, seed)
        run_extract(ExtractConfig.from_dict({"shards": str(work / f"shards-{name}" / "dataset.json"),
                                             "out": str(work / f"features-{name}"),
                                             "encoders": {"vision": "tiny:0", "tactile": "tiny:1"}, "tokens": True}),
                    command=["bench"], show_progress=False)
    train_run(work / "features-train", work / "run", resolve(TrainConfig, "tiny", {"feature_kind": kind}),
              command=["bench"])
    quiet = Console(file=io.StringIO())
    cfg = EvalConfig(prefixes=(1, 2, 4, 8))
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats):
        for baselines in (False, True):
            t0 = time.perf_counter()
            run_eval(work / "run", work / "features-test", work / f"report-{i}-{baselines}",
                     dataclasses.replace(cfg, baselines=baselines), console=quiet, command=["bench"])
            times[baselines].append(time.perf_counter() - t0)
    with_b, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"regtok eval, {kind} features, {max(100, samples // 4)} held-out pairs, baselines fitted on "
          f"{samples - round(samples * 0.1)} training rows (median of {repeats}):")
    print(f"  without baselines: {without:.2f} s   with: {with_b:.2f} s   ratio {with_b / without:.2f} (target <= 1.3)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", action="store_true", help="time the baselines' share of a whole regtok eval")
    p.add_argument("--samples", type=int, default=2000, help="--stage: training pairs")
    p.add_argument("--kind", choices=("pooled", "tokens"), default="tokens", help="--stage: feature kind")
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.add_argument("--repeats", type=int, default=1, help="best of this many runs each")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.stage:
        _stage(args.samples, max(1, args.repeats if args.repeats > 1 else 3), args.kind)
        return

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
