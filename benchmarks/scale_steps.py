"""Training samples/s at ViT-L-14 token size against N, with the machine's drift taken out (issue 22, item 4).

    python benchmarks/scale_steps.py [--work /tmp/scale] [--sizes 1000,4000,16000] [--rounds 4]

On the training stores ``benchmarks/scale.py`` wrote in WORK, it times steps of the ``tiny`` preset as
``regtok train`` runs them (the store in memory when it fits the memory budget, else streamed), round-robin over
the sizes: 6 steps of each N in turn, ``--rounds`` times, so a shared machine that slows down or speeds up does so
for every N alike (run one after the other, the same N measured 20 and 29 samples/s an hour apart). The model is
the random init: a step's arithmetic does not depend on the start's values, and the start is scale.py's business.
Prints per N the median step of all its rounds and samples/s, and each N's samples/s over the smallest N's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scale_pooled import step_seconds


def main() -> None:
    from regtok.config import TrainConfig, resolve
    from regtok.data import make_batches, split_rows
    from regtok.model import RegTok
    from regtok.pipeline.extract import open_store
    from regtok.pipeline.runtime.distributed import memory_budget

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1000, 4000, 16000])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = resolve(TrainConfig, "tiny", {"feature_kind": "tokens", "device": "cpu", "epochs": 1})
    cpu, setups = torch.device("cpu"), {}
    for n in args.sizes:
        path = args.work / f"train-{n}"
        if not (path / "manifest.json").is_file():
            ap.error(f"{path}: no store; run python benchmarks/scale.py --work {args.work} first")
        store = open_store(path)
        rows = split_rows(store.n, cfg.val_fraction, cfg.split_seed)[0]
        budget = memory_budget(cpu, cfg.max_memory_fraction)  # as regtok train decides: in memory, or streamed
        data = make_batches(store, "tokens", rows, cfg.batch_size, cfg.seed, cpu, budget)
        torch.manual_seed(cfg.seed)
        setups[n] = data, RegTok(cfg.model, {m: tuple(store.shape("tokens", m)) for m in store.modalities})
        print(f"N = {n}: {'streamed' if data.streaming else 'in memory'}", flush=True)
    steps: dict[int, list[float]] = {n: [] for n in setups}
    for round_ in range(args.rounds):
        for n, (data, model) in setups.items():
            times = step_seconds(model, data, cfg, 6)
            steps[n] += times
            print(f"round {round_ + 1}, N = {n}: steps {', '.join(f'{s:.2f}' for s in times)} s", flush=True)
    rows = {n: {"streamed": setups[n][0].streaming, "median_step_s": float(np.median(s)),
                "samples_per_s": cfg.batch_size / float(np.median(s)), "steps": len(s)} for n, s in steps.items()}
    first = rows[min(rows)]["samples_per_s"]
    for n, r in rows.items():
        print(f"N = {n:,} ({'streamed' if r['streamed'] else 'in memory'}): {r['samples_per_s']:.1f} samples/s, "
              f"{r['samples_per_s'] / first:.2f}× N = {min(rows):,}'s (median of {r['steps']} steps)")
    (args.work / "steps.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
