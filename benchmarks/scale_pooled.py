"""``benchmarks/scale.py --pooled``: pooled features at dataset scale with the ``default`` preset (issue 22, item 5).

For each N (training rows of 768-d pooled features, two modalities, the planted structure of ``scale_stores.py``),
it runs what ``regtok train`` runs before its first step (``pipeline.train.stage.load_split`` and ``build_model``: the
feature statistics, the CCA start and the decoders' fit) and then ``1 + steps`` steps of ``regtok.train.train``
with the ``default`` preset, once with the store in memory and once streamed from disk (``max_memory_fraction=0``),
both from the same start (built once per N).
samples/s is the batch over the median step time after the first (the trainer's own clock, as in its records).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import scale_stores
import torch

POOLED_DIM, PART_ROWS = 768, 20_000  # every N a whole number of parts


class _Stop(Exception):
    pass


def step_seconds(model, data, cfg, steps: int) -> list[float]:
    """The seconds of each of ``steps`` training steps of ``model`` on ``data`` (regtok.train.train's loop), after a
    first step that is not counted (it reads the first chunk of a streamed store)."""
    import numpy as np

    from regtok.train import Callbacks, train

    marks: list[float] = []

    class Clock(Callbacks):
        def on_step(self, step, total, record):
            marks.append(time.perf_counter())
            if len(marks) > steps:
                raise _Stop

    try:
        train(model, data, cfg, Clock(), val=None)
    except _Stop:
        pass
    return np.diff(marks).tolist()


def timed_steps(store_dir, cfg, steps: int, started=None) -> dict:
    """The start's wall time and the seconds of each training step of ``cfg`` on a store (pipeline code paths).
    ``started``: a model already built on this store (the start does not depend on how batches are read), trained
    from a copy of it; the row then has no start time."""
    import copy

    import numpy as np

    from regtok.pipeline.train.stage import StoreCache, build_model, load_split

    t0 = time.perf_counter()
    split = load_split(store_dir, None, cfg, StoreCache(), 0, 1, torch.device(cfg.device), lambda _m: None)
    t1 = time.perf_counter()
    model = copy.deepcopy(started) if started is not None else \
        build_model(split, cfg, store_dir, resume=False, notify=lambda _m: None)[0]
    t2 = time.perf_counter()
    start = copy.deepcopy(model) if started is None else None
    step_s = float(np.median(step_seconds(model, split.data, cfg, steps)))
    return {"run_bytes": run_bytes(model, cfg), "load_seconds": t1 - t0,
            "start_seconds": t2 - t1 if started is None else None, "step_seconds": step_s,
            "samples_per_s": cfg.batch_size / step_s, "streaming": split.data.streaming,
            "steps_per_epoch": split.data.steps_per_epoch, "epoch_hours": split.data.steps_per_epoch * step_s / 3600,
            "_start": start}


def run_bytes(model, cfg) -> int:
    """Bytes of a run directory's weight files for ``model``: buffers, start, best and last weights, resume state
    (AdamW's moments made by one step of zero gradients), written by the pipeline's own writers."""
    import tempfile
    from pathlib import Path

    from regtok.pipeline.train.weights import save_best, save_checkpoint, save_start
    from regtok.train import ResumeState, make_optimizer

    opt = make_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    with tempfile.TemporaryDirectory() as tmp:
        save_start(tmp, model)
        save_checkpoint(tmp, model, ResumeState(1, opt.state_dict()))
        save_best(tmp, model, {"step": 1, "epoch": 1, "val_select": 0.0})
        return sum(p.stat().st_size for p in Path(tmp).iterdir())


def run_pooled(args: argparse.Namespace) -> None:
    from regtok.config import TrainConfig, resolve

    torch.set_num_threads(args.threads)
    parts = scale_stores.parts_for(args.work / "parts", f"pooled{PART_ROWS}", max(args.sizes), PART_ROWS, 5, None,
                                   POOLED_DIM)
    rows = []
    for n in args.sizes:
        chosen, total = [], 0
        for p in parts:
            if total < n:
                chosen.append(p)
                total += p["samples"]
        if total != n:
            raise SystemExit(f"N = {n} is not made of whole {PART_ROWS}-row parts")
        store = scale_stores.write_store(args.work / f"pooled-{n}", chosen, None, POOLED_DIM)
        started = None
        for fraction in (0.5, 0.0):  # in memory (the default), then streamed from the same start
            cfg = resolve(TrainConfig, "default", {"feature_kind": "pooled", "device": args.device,
                                                   "max_memory_fraction": fraction, "epochs": 1})
            cfg = dataclasses.replace(cfg, val_fraction=0.1)
            what = "start and " if started is None else ""
            print(f"N = {n}, max_memory_fraction {fraction}: {what}{args.steps + 1} steps", flush=True)
            row = {"n": n, "max_memory_fraction": fraction, **timed_steps(store, cfg, args.steps, started)}
            start = row.pop("_start")
            started = start if started is None else started
            row["peak_rss_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            print(json.dumps(row), flush=True)
            rows.append(row)
    (args.work / "pooled.json").write_text(json.dumps(rows, indent=1))
    print("| N | store | peak RSS so far (GB) | run files (MB) | start (s) | samples/s | hours per epoch "
          "(extrapolated) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        start = "(the same)" if r["start_seconds"] is None else f"{r['start_seconds']:.0f}"
        print(f"| {r['n']:,} | {'streamed' if r['streaming'] else 'in memory'} | {r['peak_rss_so_far'] / 1e9:.2f} | "
              f"{r['run_bytes'] / 1e6:.0f} | {start} | {r['samples_per_s']:.1f} | "
              f"{r['epoch_hours']:.2f} |")
    for streaming in (False, True):
        by_n = {r["n"]: r["samples_per_s"] for r in rows if r["streaming"] == streaming}
        lo, hi = min(by_n), max(by_n)
        print(f"{'streamed' if streaming else 'in memory'}: samples/s at N {hi:,} / at N {lo:,} = "
              f"{by_n[hi] / by_n[lo]:.3f} (target >= 0.90)")
    print(f"(median of {args.steps} steps each; {args.threads} threads)")
