"""The train stage: a feature store → a run directory (its files: :mod:`regtok.pipeline.train.runs`).

:func:`train_run` loads the split (:func:`load_split`), builds the model and its start (:func:`build_model`),
hands both to the trainer (:func:`regtok.train.train`) with rank 0's writer, and writes the run manifest
(:func:`finish_run`). Under ``torchrun`` every rank calls it; rank 0 writes the files.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from regtok.config import TrainConfig, closest_preset, to_dict
from regtok.data import Batches, feature_stats, make_batches, rows_digest, sample_rows, split_rows, store_bytes
from regtok.errors import RegtokError
from regtok.pipeline.extract import check_compatible
from regtok.pipeline.runtime.distributed import init_distributed, leave_process_group, memory_budget
from regtok.pipeline.train.curves import plot_curves
from regtok.pipeline.train.runs import (
    CHECKPOINT,
    CONFIG,
    CURVES,
    MetricsLog,
    RunWriter,
    best_record,
    epoch_records,
    kept_record,
    load_resume,
    load_weights,
    read_metrics,
    rewrite_weights,
    save_start,
    saved_train_config,
    weights_file,
    write_config,
    write_run_manifest,
)
from regtok.pipeline.train.tensorboard_log import TensorBoardLog
from regtok.pipeline.train.weights import drop_stale_buffers, prune_weights
from regtok.train import ResumeState, TrainResult, full_r1, train


class StoreCache:
    """Feature stores opened once and read into memory once, for many runs in one process (a sweep worker)."""

    def __init__(self) -> None:
        self._stores: dict[str, Any] = {}
        self._arrays: dict[tuple[str, str, str], dict[str, torch.Tensor]] = {}

    def open(self, path: str | os.PathLike) -> Any:
        from regtok.pipeline.extract import open_store

        key = str(Path(path).resolve())
        if key not in self._stores:
            self._stores[key] = open_store(path)
        return self._stores[key]

    def arrays(self, store: Any, kind: str, device: torch.device) -> dict[str, torch.Tensor] | None:
        return self._arrays.get((str(store.root), kind, str(device)))

    def keep(self, store: Any, kind: str, device: torch.device, arrays: dict[str, torch.Tensor] | None) -> None:
        if arrays is not None:
            self._arrays[(str(store.root), kind, str(device))] = arrays


def pick_feature_kind(store: Any, requested: str) -> str:
    """``auto`` → tokens when the store has them, else pooled; an explicit kind must be in the store."""
    if requested == "auto":
        return "tokens" if store.has("tokens") else "pooled"
    if requested not in ("pooled", "tokens"):
        raise RegtokError(f"feature_kind must be auto, pooled or tokens, got {requested!r}")
    if not store.has(requested):
        have = store.manifest.get("feature_kinds")
        raise RegtokError(f"{store.root}: the store has no {requested} features (it has {have})")
    return requested


RESUME_FREE_KEYS = ("device", "compile", "log_every", "checkpoint_every")  # may change on --resume
MIN_TRAIN_ROWS = 2  # one row leaves the PCA/CCA start nothing to fit


@dataclass
class Split:
    """The stores, feature kind, rows and batches of one training run (validation batches on rank 0 only)."""

    store: Any
    val_store: Any
    kind: str
    train_rows: np.ndarray
    val_rows: np.ndarray
    data: Batches
    val: Batches | None

    def record(self, cfg: TrainConfig) -> dict[str, Any]:
        """Which rows train and validate (counts and :func:`regtok.data.rows_digest`), for metrics.jsonl and the
        manifest: runs validated on the same rows have the same ``val_rows_sha256``."""
        held_out = self.val_store is not self.store
        return {"split_seed": None if held_out else cfg.split_seed,
                "val_store": "held out (--val-features)" if held_out else f"{cfg.val_fraction:g} of the training store",
                "train_rows": len(self.train_rows), "train_rows_sha256": rows_digest(self.train_rows),
                "val_rows": len(self.val_rows), "val_rows_sha256": rows_digest(self.val_rows)}


def train_run(features: str | Path, out: str | Path, cfg: TrainConfig, *, val_features: str | Path | None = None,
              resume: bool = False, command: list[str] | None = None,
              on_step: Callable[[int, int, dict], None] | None = None, notify: Callable[[str], None] = lambda m: None,
              on_epoch: Callable[[dict], None] | None = None, tensorboard: bool = False,
              stop: Callable[[dict], str | None] | None = None, cache: StoreCache | None = None,
              keep: str = "all", overwrite: bool = False) -> tuple[Path | None, TrainResult]:
    """Train on a feature store into ``out``; returns (manifest path on rank 0 else None, result).

    ``out`` must be empty or a run (to ``resume``); ``overwrite`` writes into a directory that holds something
    else and starts an existing run again (its files are removed first). ``on_step(step, total, record)``
    follows every step, ``on_epoch(record)`` every epoch's metrics line. A non-finite loss is a RegtokError raised
    after the last good state has been saved. ``stop(epoch_record)`` may end a single-process run after an epoch
    (``result.status`` "stopped"; the manifest records ``stopped``). ``cache`` keeps stores open and in memory
    between calls (a sweep worker). ``keep`` (best, last, all): the weight files a finished run keeps
    (:func:`regtok.pipeline.train.weights.prune_weights`).
    """
    t0 = time.perf_counter()
    out = Path(out)
    claim_run_dir(out, resume, overwrite)
    rank, world, device = init_distributed(cfg.device)
    try:
        split = load_split(features, val_features, cfg, cache or StoreCache(), rank, world, device, notify)
        t_split = time.perf_counter()
        model, state = build_model(split, cfg, out, resume, notify)
        start_seconds = time.perf_counter() - t_split
        model.to(device)
        if rank == 0 and overwrite and not resume:
            remove_run_files(out)
        writer = open_writer(out, cfg, model, split, state, (on_step, on_epoch, stop), tensorboard, notify) \
            if rank == 0 else None
        t_train = time.perf_counter()
        for line in start_lines(split, cfg, device, world):
            notify(line)
        try:
            result = train(model, split.data, cfg, writer, val=split.val, resume=state)
            if writer is not None and result.status in ("done", "stopped"):
                prune_weights(out, keep)
                if writer.tb is not None:
                    epochs = epoch_records(out)
                    writer.tb.finish(kept_record(out), epochs[-1] if epochs else None)
        finally:  # a sweep worker runs many trials: a failed one must not leave its files open
            if writer is not None:
                writer.close()
        if result.status not in ("done", "stopped"):
            where = f"; last good state (step {result.step}) saved in {out}" if rank == 0 else ""
            raise RegtokError(f"{result.message}; stopped{where}")
        if rank != 0:
            return None, result
        refit_kept_decoders(out, model, split, cfg, notify)
        timings = {"seconds": time.perf_counter() - t0, "load_seconds": t_train - t0,  # the start included
                   "start_seconds": start_seconds, "train_seconds": time.perf_counter() - t_train}
        return finish_run(out, cfg, split, result, command, features, val_features, str(device), world,
                          timings), result
    finally:
        leave_process_group(world)


def open_writer(out: Path, cfg: TrainConfig, model: nn.Module, split: Split, state: ResumeState | None,
                callbacks: tuple[Callable | None, Callable | None, Callable | None], tensorboard: bool,
                notify: Callable[[str], None]) -> RunWriter:
    """Rank 0's writer: config.json, start.safetensors (a new run's model before its first step), metrics.jsonl
    (opened with the split's record on a new run; on a resume, lines a crash cut short are dropped, and said so),
    TensorBoard. ``callbacks``: (on_step, on_epoch, stop)."""
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        drop_stale_buffers(out)
    tb = TensorBoardLog(out, to_dict(cfg), purge_step=state.step if state else None) if tensorboard else None
    write_config(out, cfg, model, tuple(split.store.modalities), split.kind)
    if state is None:
        save_start(out, model)
    log = MetricsLog(out, keep_until_step=state.step if state else None)
    if log.dropped:
        notify(f"{out / 'metrics.jsonl'}: dropped line(s) {', '.join(map(str, log.dropped))}, truncated or "
               "damaged (the run was interrupted while writing them)")
    on_step, on_epoch, stop = callbacks
    writer = RunWriter(out, log, on_step, on_epoch, tb, stop)
    if state is None:
        writer.metrics.append({"type": "split", "step": 0, **split.record(cfg)})
    return writer


def start_lines(split: Split, cfg: TrainConfig, device: torch.device, world: int) -> list[str]:
    """What the run is about to do, and what a user should know first (warm-up longer than the run, the
    GPU-sized default preset on a CPU)."""
    total = cfg.epochs * split.data.steps_per_epoch
    lines = [f"training on {len(split.train_rows)} samples ({split.kind} features, {split.data.steps_per_epoch} "
             f"steps/epoch of {split.data.batch_size}, {total} steps), validating on {len(split.val_rows)}, "
             f"device {device}, {world} rank(s)"]
    if device.type == "cpu" and closest_preset(to_dict(cfg))[0] == "default":
        lines.append(f"note: this is the default preset, a {cfg.model.n_layers}-layer, {cfg.model.hidden_dim}-wide "
                     "model sized for a GPU; on a CPU add --preset tiny for a run of seconds to minutes")
    if cfg.warmup_steps > total:
        lines.append(f"warning: warmup_steps {cfg.warmup_steps} exceeds the run's {total} steps: the learning rate "
                     f"never reaches lr {cfg.lr:g} (it peaks at {cfg.lr * total / cfg.warmup_steps:.3g}); lower "
                     "warmup_steps or train longer")
    return lines


def claim_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """``out`` holds nothing but a run (see :func:`regtok.pipeline.manifests.outdir.run_foreign`), and a run there is
    only continued with ``resume`` or started again with ``overwrite``."""
    from regtok.pipeline.manifests.outdir import claim, run_foreign

    claim(out, run_foreign(out), "train", overwrite)
    if not resume and not overwrite and (out / CHECKPOINT).exists():
        raise RegtokError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start it "
                          "again, or choose another --out")


def remove_run_files(out: Path) -> None:
    """The files of an earlier run in ``out`` (a run started again must not keep its old best weights); nothing
    when ``out`` holds no run (then --overwrite only lets the new run's files replace same-named ones)."""
    import shutil

    from regtok.pipeline.manifests.outdir import RUN_FILES, is_run_config

    if not is_run_config(out / CONFIG):
        return
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def load_split(features: str | Path, val_features: str | Path | None, cfg: TrainConfig, cache: StoreCache,
               rank: int, world: int, device: torch.device, notify: Callable[[str], None]) -> Split:
    """The training and validation rows of the store(s), as batches on ``device`` (or streamed)."""
    store = cache.open(features)
    if len(store.modalities) != 2:
        raise RegtokError(f"{features}: training needs exactly two modalities, the store has {store.modalities}")
    kind = pick_feature_kind(store, cfg.feature_kind)
    val_store = cache.open(val_features) if val_features is not None else store
    if val_features is not None:
        check_compatible(val_store, kind, {m: store.shape(kind, m) for m in store.modalities}, ordered=True,
                         what="the validation store", expected_by="the training store")
        train_rows, val_rows = np.arange(store.n), np.arange(val_store.n)
    else:
        train_rows, val_rows = split_rows(store.n, cfg.val_fraction, cfg.split_seed)
        if len(train_rows) < MIN_TRAIN_ROWS:
            raise RegtokError(f"val_fraction {cfg.val_fraction:g} leaves {len(train_rows)} training rows of the "
                              f"store's {store.n}; training needs at least {MIN_TRAIN_ROWS}: lower --val-fraction")
    data = make_batches(store, kind, train_rows, cfg.batch_size, cfg.seed, device,
                        memory_budget(device, cfg.max_memory_fraction), rank, world,
                        arrays=cache.arrays(store, kind, device))
    cache.keep(store, kind, device, data.arrays)
    if data.streaming:
        notify(f"the store's {kind} features ({store_bytes(store, kind) / 2**30:.2f} GiB) exceed "
               f"max_memory_fraction={cfg.max_memory_fraction} of free {device.type} memory: streaming batches")
    val = None
    if rank == 0 and len(val_rows):
        val = make_batches(val_store, kind, val_rows, cfg.batch_size, cfg.seed, device,
                           memory_budget(device, cfg.max_memory_fraction),
                           arrays=data.arrays if val_store is store else cache.arrays(val_store, kind, device))
        cache.keep(val_store, kind, device, val.arrays)
    return Split(store, val_store, kind, train_rows, val_rows, data, val)


def build_model(split: Split, cfg: TrainConfig, out: Path, resume: bool, notify: Callable[[str], None],
                decoders: bool = True) -> tuple[nn.Module, ResumeState | None]:
    """The model with the training split's feature statistics, and either its resumed state or its CCA start
    (without ``decoders``, the decoders' fit is left out: retrieval does not read them)."""
    from regtok.model import RegTok

    torch.manual_seed(cfg.seed)
    store, kind = split.store, split.kind
    model = RegTok(cfg.model, {m: tuple(store.shape(kind, m)) for m in store.modalities})
    model.set_feature_stats(feature_stats(split.data.all()))  # the training split's, on every rank
    state = _resume_state(out, cfg, model) if resume else None
    if state is None:
        if cfg.model.read_dim:
            chosen = _init_reads(model, split, cfg)
            if chosen.get("read_init") == "cca":
                notify(f"reads start on the training split's canonical directions (ridge {chosen['ridge']:g}, "
                       f"weights ρ^{chosen['power']:g}, validation R@1 {chosen['val_r1']:.3f})")
        if not decoders:
            return model, state
        left = model.fit_decoders(sample_rows(split.data, DECODER_FIT_ROWS, cfg.seed))
        notify("the decoders start as a linear readout of the start's registers (unexplained share at the full "
               "prefix: " + ", ".join(f"{m} {v[-1]:.3f}" for m, v in left.items()) + ")")
    return model, state


def _init_reads(model: nn.Module, split: Split, cfg: TrainConfig) -> dict[str, Any]:
    """The reads' PCA/CCA start on the training rows; one error line when too few rows leave it nothing to fit."""
    try:
        return model.init_reads(sample_rows(split.data, cfg.init_max_rows, cfg.seed), cfg.seed)
    except (np.linalg.LinAlgError, torch.linalg.LinAlgError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RegtokError(f"the reads' start could not be fitted on {len(split.train_rows)} training rows "
                          f"({first}); use more rows, or model.read_init=random") from None


DECODER_FIT_ROWS = 4096  # training rows (a seeded subset) the decoders are fitted on in closed form


def refit_kept_decoders(out: Path, model: nn.Module, split: Split, cfg: TrainConfig,
                        notify: Callable[[str], None]) -> None:
    """Fit the decoders of the weights eval will use (best.safetensors, else checkpoint.safetensors) in closed form
    on the training rows, and write them back: whichever epoch keep_best chose, its reconstruction is converged."""
    import copy

    name = weights_file(out)
    kept = copy.deepcopy(model)
    load_weights(kept, out, name)
    left = kept.fit_decoders(sample_rows(split.data, DECODER_FIT_ROWS, cfg.seed))
    rewrite_weights(out, name, kept)
    notify(f"decoders of {name} refitted on the training rows (unexplained share at the full prefix: "
           + ", ".join(f"{m} {v[-1]:.3f}" for m, v in left.items()) + ")")


def finish_run(out: Path, cfg: TrainConfig, split: Split, result: TrainResult, command: list[str] | None,
               features: str | Path, val_features: str | Path | None, device: str, world: int,
               timings: dict[str, float]) -> Path:
    """Complete ``result.metrics`` (headline R@1, the kept epoch), draw curves.png, write the run manifest."""
    if not result.metrics:  # resumed a finished run
        epochs = epoch_records(out)
        result.metrics = {k: v for k, v in (epochs[-1] if epochs else {}).items() if k not in ("type", "epoch")}
    r1 = full_r1(result.metrics)
    if r1 is not None:  # one headline number for summaries
        result.metrics["val/R@1"] = r1
    best = best_record(out)
    if best is not None:  # the weights eval and the API use
        result.metrics.update({"best/val_select": best["val_select"], "best/epoch": best["epoch"],
                               "best/step": best["step"]})
    timings = {**timings, "last_epoch_seconds": result.metrics.get("seconds"),
               "samples_per_s": result.metrics.get("samples_per_s")}
    metrics = {k: v for k, v in result.metrics.items() if k not in ("seconds", "samples_per_s")}  # results only
    kept = kept_record(out)
    plot_curves(read_metrics(out), out / CURVES, kept["epoch"] if kept else None, split.store.modalities,
                to_dict(cfg.model), kept_label="best" if best is not None else "last")
    return write_run_manifest(out, command=command if command is not None else list(sys.argv), config=to_dict(cfg),
                              features=features, val_features=val_features, metrics={**metrics, "step": result.step},
                              timings=timings, device=device, feature_kind=split.kind,
                              modalities=list(split.store.modalities), world_size=world,
                              streaming=split.data.streaming, val_samples=len(split.val_rows),
                              train_samples=len(split.train_rows), split=split.record(cfg),
                              kept={"weights": weights_file(out), "epoch": kept["epoch"] if kept else None},
                              stopped=_stopped(out, result))


def _stopped(out: Path, result: TrainResult) -> dict[str, Any] | None:
    """The manifest's record of a run stopped early: the last epoch it ran (counted from 1) and why."""
    if result.status != "stopped":
        return None
    epochs = epoch_records(out)
    return {"after_epoch": epochs[-1]["epoch"] if epochs else 0, "reason": result.message}


def _resume_state(out: Path, cfg: TrainConfig, model: nn.Module) -> ResumeState:
    """Load weights and resume state from ``out``; the run's saved config must match ``cfg``."""
    saved = saved_train_config(out)
    if saved is None:
        raise RegtokError(f"{out}: nothing to resume (no {CONFIG})")
    now = to_dict(cfg)
    diff = [k for k in now if k not in RESUME_FREE_KEYS and now[k] != saved.get(k)]
    if diff:
        raise RegtokError(f"--resume with a config that differs from the run's in {', '.join(diff)}")
    load_weights(model, out)
    return load_resume(out)
