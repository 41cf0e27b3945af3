"""How much the cached-feature training loop gains, as ratios measured side by side (issue 5).

    python benchmarks/train.py [--samples 2000] [--batch-size 32] [--steps 2] [--repeats 3] [--device cpu]

Builds the embedded set (``regtok synth`` → ``regtok extract`` with the tiny encoders, pooled features) in a
temporary directory (or reuses ``--work``), then measures with the default model size:

1. regtok train samples/s ÷ the same model's train step on tensors already in memory (data-path overhead);
2. regtok train samples/s ÷ a plain DataLoader reading the HDF5 store sample by sample, for the whole step and
   for the data path alone (batches/s of each feeder, no model);
3. regtok train samples/s ÷ the same module trained with the frozen tiny encoders run on every step from the
   shards (what caching saves).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch

from regtok.config import TrainConfig, resolve
from regtok.data import make_batches
from regtok.model import RegTok
from regtok.pipeline.extract.store import open_store
from regtok.train import Callbacks, lr_at, make_optimizer, train


def regtok_cli() -> list[str]:
    exe = shutil.which("regtok")
    return [exe] if exe else [sys.executable, "-m", "regtok"]


def build_embedded(work: Path, samples: int) -> tuple[Path, Path]:
    """(shards dir, store dir) of the embedded synthetic set, extracted with the tiny encoders."""
    shards, store = work / "shards", work / "store"
    if not (shards / "dataset.json").is_file():
        from regtok.pipeline.data.synth import synthesize

        synthesize(shards, samples=samples, shards=4, seed=0)
    if not (store / "manifest.json").is_file():
        subprocess.run([*regtok_cli(), "extract", "--shards", str(shards / "dataset.json"), "--out", str(store),
                        "--encoder", "vision=tiny:0", "--encoder", "tactile=tiny:1"], check=True)
    return shards, store


def fresh(cfg: TrainConfig, store, device: torch.device) -> tuple[RegTok, torch.optim.Optimizer]:
    torch.manual_seed(cfg.seed)
    model = RegTok(cfg.model, {m: store.shape("pooled", m) for m in store.modalities}).to(device)
    return model, make_optimizer(model, cfg)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_step(model, opt, batch: dict, step: int, cfg: TrainConfig, gen: torch.Generator) -> None:
    """The model's train step with nothing around it (no logging, no sync, no NaN check)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg, 10_000)
    device = next(iter(batch.values())).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model.losses(batch, generator=gen)["loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()


def timed_steps(batches: Iterator[dict], cfg, store, device, warmup: int, steps: int) -> list[float]:
    """Seconds of each ``plain_step`` fed by ``batches``, batch fetch included (after ``warmup`` steps)."""
    model, opt = fresh(cfg, store, device)
    gen = torch.Generator(device=device)
    batches = iter(batches)
    seconds = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        batch = next(batches)
        plain_step(model, opt, {m: x.to(device).float() for m, x in batch.items()}, i, cfg, gen)
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds[warmup:]


class _Stop(Exception):
    pass


def regtok_train(cfg: TrainConfig, store, device, warmup: int, steps: int) -> list[float]:
    """Seconds of each step of regtok's own loop (regtok.train.train on regtok.data batches)."""
    data = make_batches(store, "pooled", np.arange(store.n), cfg.batch_size, cfg.seed, device)
    cfg = dataclasses.replace(cfg, epochs=(warmup + steps) // data.steps_per_epoch + 1)
    marks: dict[int, float] = {}

    class Clock(Callbacks):
        def on_step(self, step, total, record):
            sync(device)
            marks[step] = time.perf_counter()
            if step == warmup + steps:
                raise _Stop

    model, _ = fresh(cfg, store, device)
    try:
        train(model, data, cfg, Clock())
    except _Stop:
        pass
    return [marks[k] - marks[k - 1] for k in range(warmup + 1, warmup + steps + 1)]


def in_memory(store, cfg, device) -> Iterator[dict]:
    """Batches sliced from float32 tensors already on the device."""
    arrays = {m: torch.from_numpy(store.read("pooled", m)).float().to(device) for m in store.modalities}
    g = torch.Generator().manual_seed(0)
    while True:
        perm = torch.randperm(store.n, generator=g).to(device)
        for s in range(store.n // cfg.batch_size):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            yield {m: a[idx] for m, a in arrays.items()}


class H5Samples(torch.utils.data.Dataset):
    """The plain way: one HDF5 read per sample and modality."""

    def __init__(self, path: Path, modalities: tuple[str, ...], n: int):
        self.path, self.modalities, self.n, self._f = path, modalities, n, None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self._f is None:
            self._f = h5py.File(self.path, "r")
        return {m: torch.from_numpy(self._f[f"{m}/pooled"][i]) for m in self.modalities}


def dataloader(store, cfg, workers: int) -> Iterator[dict]:
    ds = H5Samples(store.root / "features.h5", store.modalities, store.n)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, persistent_workers=workers > 0)
    while True:
        yield from loader


def encoded_from_shards(shards: Path, store, cfg, device) -> Iterator[dict]:
    """Batches made by decoding shard images and running the frozen tiny encoders on every step."""
    from regtok.pipeline.data.shards import iter_shard
    from regtok.pipeline.encoders import load_encoder

    specs = {m: store.manifest["encoders"][m]["spec"] for m in store.modalities}
    encoders = {m: load_encoder(s, device) for m, s in specs.items()}
    paths = sorted(shards.glob("*.tar"))
    while True:
        samples = (s for p in paths for s in iter_shard(p))
        while chunk := list(itertools.islice(samples, cfg.batch_size)):
            if len(chunk) < cfg.batch_size:
                break
            batch = {}
            for m, enc in encoders.items():
                images = torch.stack([enc.prep.to_uint8(_member(s.files, m)) for s in chunk])  # (B, 3, H, W)
                batch[m] = enc.encode(images)[0].clone()  # (B, D); a normal tensor, not an inference one
            yield batch


def batches_per_s(batches: Iterator[dict], device, n: int) -> float:
    next(batches)
    sync(device)
    t0 = time.perf_counter()
    for batch in itertools.islice(batches, n):
        for x in batch.values():
            x.to(device).float()
    sync(device)
    return n / (time.perf_counter() - t0)


def _member(files: dict[str, bytes], modality: str) -> bytes:
    return next(v for k, v in files.items() if k.split(".")[0] == modality)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of every measurement")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="default", help="model size (the issue asks for the default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers of the plain baseline")
    ap.add_argument("--work", type=Path, help="Keep the embedded set here (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    work = args.work or Path(tempfile.mkdtemp(prefix="regtok-bench-"))
    shards, store_dir = build_embedded(work, args.samples)
    store = open_store(store_dir)
    cfg = resolve(TrainConfig, args.preset, {"batch_size": args.batch_size, "warmup_steps": 10})
    w, s = args.warmup, args.steps
    # Interleaved rounds: the machine's load drifts, and each method then sees the same drift.
    methods = {
        "regtok train": lambda: regtok_train(cfg, store, device, w, s),
        "in-memory step": lambda: timed_steps(in_memory(store, cfg, device), cfg, store, device, w, s),
        "DataLoader step": lambda: timed_steps(dataloader(store, cfg, args.workers), cfg, store, device, w, s),
        "encoders step": lambda: timed_steps(encoded_from_shards(shards, store, cfg, device), cfg, store, device,
                                             w, s),
    }
    data = make_batches(store, "pooled", np.arange(store.n), cfg.batch_size, cfg.seed, device)
    feeders = {
        "regtok batches": lambda: batches_per_s((b for e in itertools.count() for b in data.epoch(e)), device, 200),
        "DataLoader batches": lambda: batches_per_s(dataloader(store, cfg, args.workers), device, 20),
        "encoder batches": lambda: batches_per_s(encoded_from_shards(shards, store, cfg, device), device, 5),
    }
    runs: dict[str, list[float]] = {name: [] for name in {**methods, **feeders}}
    for _ in range(args.repeats):
        for name, fn in methods.items():
            runs[name] += fn()  # seconds per step
        for name, fn in feeders.items():
            runs[name].append(fn())  # batches/s
    # The best step of each method: on a shared machine the fastest step is the least disturbed one.
    rates = {name: cfg.batch_size / min(runs[name]) for name in methods}
    feeders = {name: float(np.median(runs[name])) for name in feeders}
    print(f"embedded set: {store.n} pairs, pooled dims {[store.shape('pooled', m)[1] for m in store.modalities]}, "
          f"{args.preset} model, batch {cfg.batch_size}, device {device}, {args.threads} threads, work dir {work}")
    for name, v in {**rates, **feeders}.items():
        if name in rates:
            med = cfg.batch_size / float(np.median(runs[name]))
            print(f"  {name:20s} {v:12.1f} samples/s at the best step ({med:.1f} at the median of {len(runs[name])})")
        else:
            print(f"  {name:20s} {v:12.1f} batches/s (median of rounds: {', '.join(f'{x:.0f}' for x in runs[name])})")
    r = rates["regtok train"]
    print(f"1. regtok train / in-memory step          = {r / rates['in-memory step']:.3f}  (target >= 0.95)")
    print(f"2. regtok train / DataLoader step         = {r / rates['DataLoader step']:.3f}")
    print(f"   regtok data path / DataLoader data path = "
          f"{feeders['regtok batches'] / feeders['DataLoader batches']:.1f}x  (target >= 20x)")
    print(f"3. regtok train / encoders on every step  = {r / rates['encoders step']:.3f}")
    print(f"   regtok data path / encoders data path   = "
          f"{feeders['regtok batches'] / feeders['encoder batches']:.1f}x")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
