"""The run directory: weights, resolved config, metrics and the run manifest.

    RUN_DIR/checkpoint.safetensors   the last weights (logit scale and flow head included); metadata: step
    RUN_DIR/best.safetensors         the weights of the best validation epoch (keep_best): what eval loads
    RUN_DIR/buffers.safetensors      the model's fixed buffers, stored once per run (pipeline/train/weights.py)
    RUN_DIR/start.safetensors        the model before its first step: eval's "start" baseline
    RUN_DIR/state.pt                 resume state (pipeline/train/weights.py)
    RUN_DIR/config.json              {"train": TrainConfig, "model_spec": model.spec(), "modalities", "feature_kind"}
    RUN_DIR/metrics.jsonl            the split (which rows validate), then one JSON object per logged step and
                                     per epoch; epochs counted from 1, 0 = before training
    RUN_DIR/curves.png               loss terms and validation R@1 against epoch (needs matplotlib)
    RUN_DIR/tb/                      TensorBoard event files (--tensorboard; pipeline/train/tensorboard_log.py)
    RUN_DIR/manifest.json            the run manifest (kind "run")

Every file is written to a temporary name and renamed into place, so a crash leaves the previous version whole.
Reading a finished run back (eval, embed, the API) is :mod:`regtok.pipeline.train.run_load`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from regtok.config import TrainConfig, from_saved, to_dict
from regtok.pipeline.manifests.manifest import (
    environment,
    file_record,
    input_ref,
    manifest_path,
    new_manifest,
    write_json_atomic,
    write_manifest,
)
from regtok.pipeline.train.weights import (  # noqa: F401 - the run directory's names, importable from here
    BEST,
    BUFFERS,
    CHECKPOINT,
    START,
    STATE,
    WriteFailed,
    best_record,
    checkpoint_step,
    first_line,
    load_resume,
    load_weights,
    rewrite_weights,
    save_best,
    save_checkpoint,
    save_start,
    weights_file,
)
from regtok.train import Callbacks, ResumeState

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVES = "curves.png"  # loss terms and validation R@1 against epoch (with matplotlib)
MANIFEST = "manifest.json"


def write_config(run_dir: str | os.PathLike, cfg: TrainConfig, model: nn.Module, modalities: tuple[str, ...],
                 feature_kind: str) -> dict[str, Any]:
    """Write ``config.json``: everything needed to rebuild the model with nothing else."""
    data = {"train": to_dict(cfg), "model_spec": model.spec(), "modalities": list(modalities),
            "feature_kind": feature_kind}
    write_json_atomic(Path(run_dir) / CONFIG, data)
    return data


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed per line)."""

    def __init__(self, run_dir: str | os.PathLike, keep_until_step: int | None = None):
        """Open for appending; with ``keep_until_step`` drop lines after that step first (for resume), and lines
        that are not a metrics record (a last line cut short by a crash): their numbers are in ``dropped``."""
        self.path = Path(run_dir) / METRICS
        self.dropped: list[int] = []
        if keep_until_step is not None and self.path.is_file():
            records = []
            for number, record in metrics_lines(self.path):
                if record is None:
                    self.dropped.append(number)
                else:
                    records.append(record)
            kept = [r for r in counted_from_one(records) if r.get("step", 0) <= keep_until_step]
            tmp = self.path.with_name(f".{METRICS}.tmp")
            tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif keep_until_step is None:
            self.path.write_text("")
        self._file = open(self.path, "a")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def metrics_lines(path: Path) -> list[tuple[int, dict[str, Any] | None]]:
    """(line number, record) for every non-blank line of a ``metrics.jsonl``; None where a line is not a metrics
    record (cut short by a crash, or damaged: see :func:`is_record`). Bytes that are not UTF-8 never stop the
    reading."""
    out: list[tuple[int, dict[str, Any] | None]] = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        out.append((number, record if is_record(record) else None))
    return out


def is_record(record: Any) -> bool:
    """A JSON object whose step (when given) is a whole number; a start, step or epoch line holds numbers only
    besides its type, and a start or epoch line its epoch."""
    if not isinstance(record, dict) or not _whole(record.get("step", 0)):
        return False
    if record.get("type") not in ("start", "step", "epoch"):
        return True
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for k, v in record.items() if k != "type")
    return numbers and (record["type"] == "step" or _whole(record.get("epoch")))


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` (lines that are not a metrics record are left out), epochs counted from 1
    (0: before training) whatever version wrote it."""
    path = Path(run_dir) / METRICS
    return counted_from_one([r for _, r in metrics_lines(path) if r is not None] if path.is_file() else [])


def counted_from_one(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Metrics records with epochs counted from 1: lines of a version that counted from 0 (its start line is
    epoch -1, its first epoch 0) are shifted; others are returned as they are."""
    if any((r.get("type") == "start" and r.get("epoch") == -1) or (r.get("type") in ("step", "epoch")
                                                                   and r.get("epoch") == 0) for r in records):
        return [{**r, "epoch": r["epoch"] + 1} if "epoch" in r else r for r in records]
    return records


def epoch_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The epoch lines of ``metrics.jsonl`` (one per epoch, after its validation)."""
    return [r for r in read_metrics(run_dir) if r.get("type") == "epoch"]


def kept_record(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The epoch line whose weights the run is used with (:func:`weights_file`): the kept best epoch, or the
    epoch of the last checkpoint; None when the metrics do not say."""
    epochs = epoch_records(run_dir)
    best = best_record(run_dir) if weights_file(run_dir) == BEST else None
    if best is not None:
        return next((r for r in epochs if r["epoch"] == best["epoch"]), None)
    if (Path(run_dir) / CHECKPOINT).is_file():
        step = checkpoint_step(run_dir)
        return next((r for r in reversed(epochs) if r["step"] == step), None)
    return None


def write_run_manifest(run_dir: str | os.PathLike, *, command: list[str], config: dict[str, Any],
                       features: str | os.PathLike, val_features: str | os.PathLike | None,
                       metrics: dict[str, Any], timings: dict[str, Any], device: str, **extra: Any) -> Path:
    """Write ``manifest.json`` (kind "run"): inputs are the features manifests with their hashes."""
    run_dir = Path(run_dir)
    inputs = [input_ref("features", manifest_path(features), run_dir)]
    if val_features is not None:
        inputs.append(input_ref("val_features", manifest_path(val_features), run_dir))
    files = [file_record(run_dir / name, run_dir) for name in (CHECKPOINT, BEST, BUFFERS, START, CONFIG, METRICS,
                                                               STATE, CURVES) if (run_dir / name).is_file()]
    manifest = new_manifest("run", command=command, config=config, inputs=inputs,
                            outputs={"files": files, "checkpoint": files[0] if files else None},
                            environment_=environment(device), timings=timings, metrics=metrics, **extra)
    path = run_dir / MANIFEST
    write_manifest(path, manifest)
    return path


class RunWriter(Callbacks):
    """Rank 0's callbacks: metrics lines, atomic checkpoints, TensorBoard events, an optional per-step progress
    hook, and an optional ``stop(record) -> reason | None`` asked after every epoch (a sweep's pruner).

    The last step of every epoch is logged even when it is not a multiple of ``log_every``, so a run shorter
    than ``log_every`` steps still has its learning-rate and loss curves."""

    def __init__(self, run_dir: Path, metrics: MetricsLog, on_step: Callable[[int, int, dict], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None, tensorboard: Any = None,
                 stop: Callable[[dict], str | None] | None = None):
        self.run_dir, self.metrics, self._on_step, self._on_epoch = run_dir, metrics, on_step, on_epoch
        self.tb, self._stop = tensorboard, stop
        self._last: dict[str, Any] | None = None  # the last step's record, until it is logged

    def on_step(self, step: int, total: int, record: dict[str, float]) -> None:
        self._last = {"type": "step", "step": step, **record}
        if self._on_step is not None:
            self._on_step(step, total, record)

    def on_log(self, record: dict[str, Any]) -> None:
        if record.get("type") == "step":
            self._last = None
        elif record.get("type") == "epoch" and self._last is not None:
            self.on_log(self._last)  # the epoch's last step, not on the log_every grid
        self.metrics.append(record)
        if self.tb is not None:
            self.tb.log(record)
        if self._on_epoch is not None and record.get("type") == "epoch":
            self._on_epoch(record)

    def on_checkpoint(self, model: nn.Module, state: ResumeState) -> None:
        save_checkpoint(self.run_dir, model, state)

    def on_best(self, model: nn.Module, record: dict[str, Any]) -> None:
        save_best(self.run_dir, model, record)

    def should_stop(self, record: dict[str, Any]) -> str | None:
        return self._stop(record) if self._stop is not None else None

    def close(self) -> None:
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()


def stopped_after(stopped: dict[str, Any]) -> int:
    """The epoch (from 1) after which a run's manifest says it stopped (older manifests counted from 0)."""
    return int(stopped["after_epoch"]) if "after_epoch" in stopped else int(stopped.get("epoch", -1)) + 1


def saved_train_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``train`` section of a run's ``config.json``, or None when there is none."""
    path = Path(run_dir) / CONFIG
    return from_saved(json.loads(path.read_text())["train"]) if path.is_file() else None
