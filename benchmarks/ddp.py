"""What DDP's unused-parameter search costs a train step, as a ratio measured side by side (issue 15).

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/ddp.py [--preset default]
        [--batch-size 32] [--steps 20] [--repeats 3] [--dims 192,192] [--tokens 1]

Each rank (gloo on CPU, one thread) trains the model on its half of random in-memory batches with the trainer's
own step (``regtok.train.LossModule`` under DDP: forward, backward with the gradient all-reduce, clipping, AdamW),
once with ``find_unused_parameters=False`` (what ``regtok.train.wrap`` passes) and once with ``True`` (what it
passed before), in interleaved rounds so that both see the same machine load. Rank 0 prints seconds per step.
"""

from __future__ import annotations

import argparse
import math
import time


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (all ranks)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dims", default="192,192", help="feature width of each modality")
    ap.add_argument("--tokens", type=int, default=1, help="feature tokens per sample (1: pooled)")
    return ap


if __name__ == "__main__":
    parser().parse_args()  # --help and a bad flag answer here, before torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from regtok.config import TrainConfig, resolve  # noqa: E402
from regtok.model import RegTok  # noqa: E402
from regtok.pipeline.runtime.distributed import init_distributed, leave_process_group  # noqa: E402
from regtok.train import LossModule, make_optimizer  # noqa: E402


def step_seconds(cfg: TrainConfig, inputs: dict[str, tuple[int, int]], rank: int, world: int,
                 find_unused: bool, steps: int, warmup: int = 2) -> list[float]:
    """Seconds of each of ``steps`` DDP train steps (after ``warmup``), batches made in advance."""
    torch.manual_seed(cfg.seed)
    model = RegTok(cfg.model, inputs).train()
    net = nn.parallel.DistributedDataParallel(LossModule(model, rank, world), find_unused_parameters=find_unused)
    opt = make_optimizer(model, cfg)
    local = cfg.batch_size // world
    g = torch.Generator().manual_seed(rank)
    batches = [{m: torch.randn(local, *((d,) if t == 1 else (t, d)), generator=g) for m, (t, d) in inputs.items()}
               for _ in range(warmup + steps)]
    gen = torch.Generator()
    seconds = []
    for i, batch in enumerate(batches):
        dist.barrier()
        t0 = time.perf_counter()
        gen.manual_seed(i)
        opt.zero_grad(set_to_none=True)
        net(batch, generator=gen)["loss"].backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        seconds.append(time.perf_counter() - t0)
    return seconds[warmup:]


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(1)
    rank, world, _ = init_distributed("cpu")
    try:
        cfg = resolve(TrainConfig, args.preset, {"batch_size": args.batch_size})
        inputs = {m: (args.tokens, int(d)) for m, d in zip(("vision", "tactile"), args.dims.split(","), strict=True)}
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for flag in runs:
                runs[flag] += step_seconds(cfg, inputs, rank, world, flag, args.steps)
        if rank == 0:
            print(f"{world} CPU ranks (gloo, 1 thread each), {args.preset} model, global batch {cfg.batch_size}, "
                  f"inputs {inputs}, {args.repeats} rounds of {args.steps} steps")
            for flag, s in runs.items():
                print(f"  find_unused_parameters={flag!s:5}  median {np.median(s) * 1e3:8.2f} ms/step  "
                      f"best {min(s) * 1e3:8.2f} ms/step")
            ratio = np.median(runs[True]) / np.median(runs[False])
            print(f"  median step with the search / without = {ratio:.3f}")
    finally:
        leave_process_group(world)


if __name__ == "__main__":
    main()
