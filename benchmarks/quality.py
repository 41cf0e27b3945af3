"""Learning quality: regtok against its linear baselines, on the same distribution and on unseen surfaces.

    python benchmarks/quality.py [--train-samples 2000] [--test-samples 400] [--work DIR] [--only pooled]

The matrix (issue 11): {pooled, tokens} × {contrastive, flow_matching, combined} at the ``tiny`` preset's
defaults, plus the ``default`` preset on pooled features, each scored on
- ``same``: a fresh draw of the training split's material families (seed 42), 1,000 pairs;
- ``unseen``: families the training split never holds (``weave``, ``gravel``; seed 43), 1,000 pairs.
Training uses the training store alone (its own 10 % validation part picks the kept epoch); the baselines are
fitted on the same training rows. Features come from the tiny random-init encoders (``tiny:0``, ``tiny:1``).

For each cell it prints regtok's R@1 per shared prefix k (mean of both directions; transported retrieval for
flow_matching), the best baseline's R@1 and their ratio, whether R@1 is non-decreasing in k, and the time.
The table is also written to WORK/quality.md and WORK/quality.json.
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

TRAIN_FAMILIES = ("grating", "knurl", "dots", "fractal", "scratched", "perforated")
UNSEEN_FAMILIES = ("weave", "gravel")
LOSSES = ("contrastive", "flow_matching", "combined")
TESTS = ("same", "unseen")


def make_stores(work: Path, train_n: int, test_n: int, log) -> dict[str, Path]:
    """Synthesise and extract the three splits (skipped when WORK already holds them)."""
    from regtok.pipeline.extract import ExtractConfig, run_extract
    from regtok.pipeline.synth import synthesize

    splits = {"train": (train_n, 41, TRAIN_FAMILIES), "same": (test_n, 42, TRAIN_FAMILIES),
              "unseen": (test_n, 43, UNSEEN_FAMILIES)}
    stores = {}
    for name, (n, seed, families) in splits.items():
        shards, store = work / f"shards-{name}", work / f"features-{name}"
        if not (store / "manifest.json").is_file():
            log(f"synth + extract {name}: {n} pairs, seed {seed}, families {', '.join(families)}")
            synthesize(shards, n, max(1, n // 500), seed, 64, families=families)
            cfg = ExtractConfig.from_dict({"shards": str(shards / "dataset.json"), "out": str(store),
                                           "encoders": {"vision": "tiny:0", "tactile": "tiny:1"}, "tokens": True})
            run_extract(cfg, command=["benchmarks/quality.py"], show_progress=False)
        stores[name] = store
    return stores


def r1(row: dict) -> float:
    return (row["a_to_b"]["R@1"] + row["b_to_a"]["R@1"]) / 2


def cell(report: dict, loss: str) -> dict:
    """regtok's R@1 per k, the best baseline's, their ratio and whether R@1 is monotone in k."""
    if loss == "flow_matching":  # transported retrieval, the most Euler steps, per k of the shared prefix
        steps = max(f["steps"] for f in report["flow"])
        per_k = {f["k"]: r1(f) for f in report["flow"] if f["steps"] == steps}
        direct = {r["k"]: r1(r) for r in report["retrieval"]}
        per_k = {k: per_k.get(k, direct[k]) for k in direct}  # flow rows exist at the largest k only
    else:
        per_k = {r["k"]: r1(r) for r in report["retrieval"]}
    h = report["headline"]
    ks = sorted(per_k)
    return {"per_k": per_k, "regtok": h["regtok"], "baseline": h["baseline"], "best_baseline": h["best_baseline"],
            "ratio": h["ratio"], "monotone": all(per_k[a] <= per_k[b] for a, b in zip(ks, ks[1:], strict=False))}


def run_cell(stores: dict[str, Path], work: Path, kind: str, loss: str, preset: str, log) -> dict[str, dict]:
    from rich.console import Console

    from regtok.config import TrainConfig, resolve
    from regtok.evaluate import EvalConfig
    from regtok.pipeline.eval import run_eval
    from regtok.pipeline.train import train_run

    name = f"{preset}-{kind}-{loss}"
    run_dir = work / "runs" / name
    cfg = resolve(TrainConfig, preset, {"feature_kind": kind, "model": {"loss_type": loss}})
    t0 = time.perf_counter()
    train_run(stores["train"], run_dir, cfg, command=["benchmarks/quality.py", name])
    seconds = time.perf_counter() - t0
    quiet = Console(file=io.StringIO())
    out = {}
    for test in TESTS:
        report = run_eval(run_dir, stores[test], work / "reports" / name / test,
                          EvalConfig(prefixes=(1, 2, 4, 8), flow_steps=(1, 16), probe_max_samples=2000),
                          console=quiet, command=["benchmarks/quality.py", name, test])
        out[test] = {**cell(report, loss), "train_seconds": seconds}
        c = out[test]
        log(f"{name:34s} {test:6s} regtok {c['regtok']:.3f}  baseline {c['baseline']:.3f} ({c['best_baseline']})  "
            f"ratio {c['ratio']:.2f}  monotone {c['monotone']}  ({seconds:.0f} s train)")
    return out


def table(results: dict[str, dict[str, dict]]) -> str:
    lines = ["| preset | features | loss | test | regtok R@1 per k | regtok | best baseline | ratio | R@1 ↑ in k |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, tests in results.items():
        preset, kind, loss = name.split("-", 2)
        for test, c in tests.items():
            per_k = ", ".join(f"k{k} {v:.3f}" for k, v in sorted(c["per_k"].items(), key=lambda kv: int(kv[0])))
            lines.append(f"| {preset} | {kind} | {loss} | {test} | {per_k} | {c['regtok']:.3f} | "
                         f"{c['baseline']:.3f} ({c['best_baseline']}) | {c['ratio']:.2f} | "
                         f"{'yes' if c['monotone'] else 'NO'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--work", type=Path, default=None, help="Working directory [default: a new temporary one]")
    p.add_argument("--only", choices=("pooled", "tokens"), default=None, help="One feature kind only.")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="regtok-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)  # noqa: E731
    stores = make_stores(work, args.train_samples, args.test_samples, log)
    results: dict[str, dict[str, dict]] = {}
    kinds = (args.only,) if args.only else ("pooled", "tokens")
    for kind in kinds:
        for loss in LOSSES:
            results[f"tiny-{kind}-{loss}"] = run_cell(stores, work, kind, loss, "tiny", log)
    if "pooled" in kinds:
        results["default-pooled-contrastive"] = run_cell(stores, work, "pooled", "contrastive", "default", log)
    md = table(results)
    cells = [c for tests in results.values() for c in tests.values()]
    below = [f"{n}/{t}" for n, tests in results.items() for t, c in tests.items() if c["ratio"] < 1]
    summary = (f"{len(cells)} cells; regtok below its best linear baseline in {len(below)}"
               f"{': ' + ', '.join(below) if below else ''}; R@1 non-decreasing in k in "
               f"{sum(c['monotone'] for c in cells)}/{len(cells)}; {time.perf_counter() - t0:.0f} s in all")
    (work / "quality.md").write_text(md + "\n\n" + summary + "\n")
    (work / "quality.json").write_text(json.dumps(results, indent=1))
    print(md)
    print(summary)
    print(f"written: {work / 'quality.md'}, {work / 'quality.json'}")


if __name__ == "__main__":
    main()
