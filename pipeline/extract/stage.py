"""Stage 1, extract: frozen encoders over WebDataset shards into an HDF5 feature store.

One part per shard (``parts/<shard>.h5``) plus a completion record (``parts/<shard>.json``: counts, skipped
samples, hashes, and a fingerprint of the encoders) written after the part is renamed into place. A rerun
skips shards whose record matches, so a crash loses at most the shards in flight. ``torchrun`` ranks split
the shard list (rank r takes r::world); rank 0 writes ``features.h5`` and ``manifest.json`` after a barrier.

A truncated shard keeps its complete samples and is listed in ``skipped`` (with ``key: null``); it counts
for the samples it is known to have lost (from the dataset manifest) or for one sample when that is unknown.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from regtok.distributed import resolve_device
from regtok.errors import RegtokError
from regtok.pipeline.data import expand_shards
from regtok.pipeline.encoders import Encoder, load_encoder
from regtok.pipeline.extract.config import ExtractConfig
from regtok.pipeline.extract.part_records import finish_part, finished, record_path
from regtok.pipeline.extract.samples import LabelRules, ShardBatch, ShardStream
from regtok.pipeline.extract.store import INDEX_NAME, PARTS_DIR, PartWriter, write_index
from regtok.pipeline.manifests.labels import label_schema, with_groups
from regtok.pipeline.manifests.manifest import environment, input_ref, new_manifest, read_manifest, write_manifest
from regtok.pipeline.runtime.console import extract_progress
from regtok.pipeline.runtime.startup import gc_paused

PAUSE_ENV = "REGTOK_EXTRACT_PAUSE_AFTER_PART"  # seconds; lets crash tests kill a run between parts


class SkipLimitError(RegtokError):
    """More samples were skipped than ``max_skip_fraction`` allows (the store was still written)."""


@dataclass
class Job:
    """The resolved inputs of one extraction, shared by every rank."""

    config: ExtractConfig
    shards: list[Path]
    names: list[str]  # part names, unique, in shard order
    expected: dict[int, int] = field(default_factory=dict)  # shard index -> samples (from a dataset manifest)
    dataset: dict | None = None
    dataset_path: Path | None = None


def resolve_job(config: ExtractConfig) -> Job:
    """Expand the shard spec and read the dataset manifest when the spec is one."""
    shards = [p.absolute() for p in expand_shards(config.shards)]
    stems = [p.stem for p in shards]
    names = stems if len(set(stems)) == len(stems) else [f"{i:06d}-{s}" for i, s in enumerate(stems)]
    job = Job(config, shards, names)
    spec = Path(config.shards)
    if spec.suffix == ".json" and spec.is_file():
        from regtok.pipeline.manifests.manifest import resolve_path

        job.dataset, job.dataset_path = read_manifest(spec, kind="dataset"), spec.absolute()
        by_path = {resolve_path(spec, s["path"]).absolute(): s.get("samples") for s in job.dataset["shards"]}
        job.expected = {i: int(by_path[p]) for i, p in enumerate(shards) if isinstance(by_path.get(p), int)}
    return job


def pick_device(name: str, local_rank: int) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU; a bare ``cuda`` is this rank's GPU."""
    device = resolve_device(name)
    return torch.device("cuda", local_rank) if device.type == "cuda" and device.index is None else device


def load_encoders(config: ExtractConfig, device: torch.device) -> dict[str, Encoder]:
    """One encoder per modality; modalities with the same spec share one loaded model."""
    loaded: dict[str, Encoder] = {}
    out = {}
    for modality, spec in config.encoders:
        if spec not in loaded:
            loaded[spec] = load_encoder(spec, device)
        enc = loaded[spec]
        if config.tokens and not enc.provides_tokens:
            raise RegtokError(f"encoder {spec} ({modality}) does not expose token features; drop --tokens")
        out[modality] = enc
    return out


def fingerprint(config: ExtractConfig, encoders: dict[str, Encoder]) -> str:
    """What a finished part depends on besides its shard: encoders, weights, feature kinds."""
    key = {"tokens": config.tokens, "encoders": {m: [str(e.spec), e.weights_sha256] for m, e in encoders.items()}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def extract_shards(job: Job, encoders: dict[str, Encoder], rank: int, world: int, fp: str,
                   on_batch=None, log: Callable[[str], None] = lambda msg: None) -> dict:
    """Encode this rank's unfinished shards; write a part and a completion record per shard.

    ``on_batch(samples, skipped, shard_done)`` is called after every batch (for progress); ``log`` is told of
    parts that are redone because they were made from another input. Returns counters.
    """
    cfg, root = job.config, Path(job.config.out)
    (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    mine = list(range(rank, len(job.shards), world))
    for i in mine:  # temporaries of a crashed run of this shard
        for tmp in (root / PARTS_DIR).glob(f".{job.names[i]}.h5.*.tmp"):
            tmp.unlink(missing_ok=True)
    stale: list[tuple[str, str]] = []
    todo = [(i, job.shards[i]) for i in mine if not finished(root, job.names[i], fp, job.shards[i], stale)]
    for name, why in stale:
        record_path(root, name).unlink(missing_ok=True)  # never reused, even after a crash
        log(f"part {name} was {why}: extracting it again")
    if len(todo) < len(mine):
        log(f"{len(mine) - len(todo)} of {len(mine)} shard(s) already have a finished part; they are kept")
    stats = {"shards": len(todo), "resumed_shards": len(mine) - len(todo), "samples": 0, "skipped": 0}
    if not todo:
        return stats
    preps = {m: e.prep for m, e in encoders.items()}
    rules = LabelRules(job.dataset.get("labels") if job.dataset else None)
    stream = ShardStream(todo, preps, cfg.batch_size, rules)
    on_cuda = any(_on_cuda(e) for e in encoders.values())
    workers = stats["workers"] = decode_workers(cfg.workers, on_cuda, len(todo))
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         prefetch_factor=4 if workers else None, pin_memory=on_cuda)
    writers: dict[int, PartWriter] = {}
    skipped: dict[int, list[dict]] = {}
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    try:
        for batch in loader:
            name = job.names[batch.shard]
            features = encode_batch(batch, encoders, cfg.tokens) if batch.keys else None
            if batch.shard not in writers:  # after the first forward, which tells the encoders' output dims
                writers[batch.shard] = PartWriter(root / PARTS_DIR / f"{name}.h5", part_shapes(encoders, cfg.tokens))
            writer = writers[batch.shard]
            if features is not None:
                writer.append(batch.keys, features, batch.labels)
            skipped.setdefault(batch.shard, []).extend(batch.skipped)
            stats["samples"] += len(batch.keys)
            stats["skipped"] += len(batch.skipped)
            if batch.done:
                finish_part(job, batch, writers[batch.shard], skipped.pop(batch.shard), fp)
                del writers[batch.shard]  # only now: a part that failed to finish is aborted below
                if pause:
                    time.sleep(pause)
            if on_batch is not None:
                on_batch(len(batch.keys), len(batch.skipped) + (1 if batch.done and batch.error else 0), batch.done)
    except OSError as e:  # disk full, read-only, quota: the finished parts stay, the one in flight is dropped
        raise RegtokError(f"cannot write the store in {root}: {_os_reason(e)}; finished parts are kept, run the "
                          f"same command again to resume") from None
    finally:
        for w in writers.values():
            w.abort()
    return stats


def _os_reason(e: OSError) -> str:
    """One line for an OSError, h5py's included (whose text holds the errno message)."""
    if e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def decode_workers(requested: int | str, on_cuda: bool, shards: int) -> int:
    """DataLoader workers for ``shards`` shards: the requested count, or for ``auto`` none on the CPU and up
    to 8 per GPU (the node's cores shared among its ranks).

    On the CPU the forward already keeps every core busy, and a decoding worker beside it preempts one of the
    OpenMP threads, which then all wait for it at the next barrier: on the 2-core dev machine (ViT-B-32, 400
    images, batch 32) the encode phase took 17.8-17.9 s with no worker, 18.2-18.3 s with 1 and 18.3-18.7 s with
    2, while decoding itself costs 0.25 s of it. On CUDA the forward is fast and decoding is what limits.
    """
    if requested == "auto":
        if not on_cuda:
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        requested = max(1, min(8, cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)))
    return min(int(requested), shards)


def part_shapes(encoders: dict[str, Encoder], tokens: bool) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{modality: {kind: per-row shape}}`` of the stored features."""
    return {m: {"pooled": (e.pooled_dim,), **({"tokens": e.token_shape} if tokens else {})}
            for m, e in encoders.items()}


def _on_cuda(enc: Encoder) -> bool:
    return next(enc.parameters()).device.type == "cuda"


def encode_batch(batch: ShardBatch, encoders: dict[str, Encoder], tokens: bool) -> dict:
    """``{modality: {"pooled": (b, D), "tokens": (b, T, Dt)}}`` float16 numpy."""
    out = {}
    for m, enc in encoders.items():
        pooled, toks = enc.encode(batch.images[m], tokens)  # (b, D), (b, T, Dt) | None
        out[m] = {"pooled": pooled.to(torch.float16).cpu().numpy()}
        if tokens:
            out[m]["tokens"] = toks.to(torch.float16).cpu().numpy()
    return out


def run_extract(config: ExtractConfig, *, command: list[str] | None = None, show_progress: bool = True,
                console=None, overwrite: bool = False) -> tuple[Path, dict | None]:
    """Run the stage on this process's rank; rank 0 returns ``(manifest path, manifest)``, others ``None``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the ranks join a process group (gloo on CPU, nccl on CUDA).
    ``config.out`` must be empty or hold an earlier extraction (``overwrite`` lifts that), and is locked while
    this runs: a second extraction into it stops with a RegtokError.
    Raises :class:`SkipLimitError` on rank 0, after writing the store, when too much input was skipped.
    """
    import torch.distributed as dist

    from regtok.pipeline.runtime.distributed import join_process_group, launched, leave_process_group

    t0 = time.perf_counter()
    rank, world, local_rank = launched()
    device = pick_device(config.device, local_rank)
    if world > 1:
        join_process_group(device)
    lock = None
    try:
        job = resolve_job(config)
        lock = _claim_out(config, overwrite, rank, world, device)
        # What is alive after loading (modules, models) lives as long as the process: frozen out of the cyclic
        # collector's reach, forked DataLoader workers do not copy the parent's heap on their first collection, and
        # no collection scans it again, the one at interpreter exit included (~0.7 s with open_clip loaded).
        with gc_paused(freeze=True):
            encoders = load_encoders(config, device)
        fp = fingerprint(config, encoders)
        t_loaded = time.perf_counter()
        total = sum(job.expected.get(i, 0) for i in range(rank, len(job.shards), world)) or None
        mine = len(range(rank, len(job.shards), world))
        with extract_progress(total, enabled=show_progress and rank == 0, console=console, shards=mine) as on_batch:
            stats = extract_shards(job, encoders, rank, world, fp, on_batch, log=_say(console))
        counts = torch.tensor([stats["samples"], stats["skipped"], stats["shards"]], dtype=torch.float64,
                              device=device if world > 1 and device.type == "cuda" else "cpu")
        if world > 1:
            dist.all_reduce(counts)  # also the barrier: every rank's parts are in place after it
        t_done = time.perf_counter()
        if rank != 0:
            _leave_together(world)
            return Path(config.out) / "manifest.json", None
        samples, images = int(counts[0]), int(counts[0]) * len(encoders)
        seconds = t_done - t0
        timings = {"seconds": round(seconds, 3), "load_seconds": round(t_loaded - t0, 3),
                   "encode_seconds": round(t_done - t_loaded, 3), "samples_encoded": samples,
                   "shards_encoded": int(counts[2]), "samples_per_s": round(samples / seconds, 2) if seconds else None,
                   "images_per_s": round(images / seconds, 2) if seconds else None, "ranks": world,
                   "decode_workers": stats.get("workers", 0)}
        try:
            return write_store(job, encoders, fp, timings, command, device)
        finally:
            _leave_together(world)
    finally:
        if lock is not None:
            lock.release()
        leave_process_group(world)


def _claim_out(config: ExtractConfig, overwrite: bool, rank: int, world: int, device: torch.device):
    """Rank 0 checks that ``--out`` holds nothing but an earlier extraction and locks it; every rank stops
    when rank 0 could not. Returns rank 0's :class:`~pipeline.manifests.outdir.DirLock` (None on other ranks)."""
    from regtok.pipeline.manifests.outdir import DirLock, claim, store_foreign

    out, lock, error = Path(config.out), None, None
    if rank == 0:
        try:
            claim(out, store_foreign(out), "extract", overwrite)
            lock = DirLock(out)
        except RegtokError as e:
            error = e
        except OSError as e:  # a read-only or unwritable --out
            error = RegtokError(f"cannot write into {out}: {_os_reason(e)}")
    if world > 1:
        import torch.distributed as dist

        failed = torch.tensor([float(error is not None)], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(failed)
        if failed.item() and error is None:
            error = RegtokError(f"rank 0 could not take {out} (see its message)")
    if error is not None:
        if lock is not None:
            lock.release()
        raise error
    return lock


def _say(console) -> Callable[[str], None]:
    """A one-line notice on stderr (through ``console`` when there is one)."""
    if console is not None:
        return lambda msg: console.print(msg, markup=False, highlight=False, soft_wrap=True)
    import sys

    return lambda msg: print(msg, file=sys.stderr)


def _leave_together(world: int) -> None:
    """Ranks wait for rank 0's index and manifest before tearing down the process group.

    Without it, a rank with no shard left while rank 0 was still writing, and its process aborted at exit in
    about 1 run of 3 ("terminate called without an active exception", a gloo thread outliving the interpreter);
    with it, 0 of 12 runs of 2 CPU ranks over 1 shard did.
    """
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def write_store(job: Job, encoders: dict[str, Encoder], fp: str, timings: dict, command: list[str] | None,
                device: torch.device) -> tuple[Path, dict]:
    """Check every shard has a finished part, write the index and the manifest; enforce the skip limit."""
    cfg, root = job.config, Path(job.config.out)
    records = []
    for name, shard in zip(job.names, job.shards, strict=True):
        if not finished(root, name, fp, shard):
            raise RegtokError(f"shard {name} has no finished part; rerun the same command to complete the store")
        records.append(json.loads(record_path(root, name).read_text()))
    shapes = part_shapes(encoders, cfg.tokens)
    label_names = sorted({n for r in records for n in r["labels"]})
    n = write_index(root, [r["part"] for r in records], shapes, label_names)
    skipped = [s for r in records for s in r["skipped"]]
    skip_count = sum(r["skip_count"] for r in records)
    from regtok.pipeline.manifests.manifest import file_record

    inputs = [input_ref("dataset", job.dataset_path, root)] if job.dataset_path else []
    inputs += [{"role": "shard", "path": r["shard"], "sha256": r["shard_sha256"], "samples": r["read"]}
               for r in records]
    manifest = new_manifest(
        "features", command=command, config=cfg.to_dict(), inputs=inputs,
        outputs={"files": [file_record(root / INDEX_NAME, root)], "index": INDEX_NAME},
        environment_=environment(str(device)), timings=timings,
        modalities=list(encoders), encoders={m: e.describe() for m, e in encoders.items()},
        feature_kinds=["pooled", "tokens"] if cfg.tokens else ["pooled"], samples=n,
        parts=[{"path": r["part"], "shard": name, "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"]}
               for name, r in zip(job.names, records, strict=True)],
        skipped=skipped, skip_count=skip_count,
        labels=with_groups(_labels(root, label_names, job.dataset), dict(cfg.label_groups), list(encoders)),
    )
    path = root / "manifest.json"
    write_manifest(path, manifest)
    total = n + skip_count
    if total == 0:
        where = f"shard {job.shards[0]} holds" if len(job.shards) == 1 else \
            f"the {len(job.shards)} shards (first: {job.shards[0]}) hold"
        raise SkipLimitError(f"{where} no samples; the empty store was written: {path}")
    if skip_count / total > cfg.max_skip_fraction:
        raise SkipLimitError(f"skipped {skip_count} of {total} samples ({skip_count / max(total, 1):.1%}), more than "
                             f"--max-skip-fraction {cfg.max_skip_fraction}; the store was written: {path}")
    return path, manifest


def _labels(root: Path, names: list[str], dataset: dict | None) -> dict:
    """The dataset manifest's label schema when there is one, else the one the stored values imply."""
    if dataset and isinstance(dataset.get("labels"), dict):
        return {k: v for k, v in dataset["labels"].items() if k in names}
    import h5py

    with h5py.File(root / INDEX_NAME, "r") as f:
        return label_schema({name: f[f"labels/{name}"][:] for name in names})
