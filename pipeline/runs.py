"""The run directory: weights, resolved config, metrics, resume state and the run manifest.

    RUN_DIR/checkpoint.safetensors   model weights (logit scale and flow head included); metadata: step
    RUN_DIR/state.pt                 resume state: optimizer state, step, RNG states (tensors/dicts only,
                                     loadable with ``weights_only=True``)
    RUN_DIR/config.json              {"train": TrainConfig, "model_spec": model.spec(), "modalities", "feature_kind"}
    RUN_DIR/metrics.jsonl            one JSON object per logging step and per epoch
    RUN_DIR/curves.png               loss terms and validation R@1 against epoch (needs matplotlib)
    RUN_DIR/manifest.json            the run manifest (kind "run")

Every file is written to a temporary name and renamed into place, so a crash leaves the previous version whole.
The weights and the resume state are two files: ``state.pt`` records the step of the weights it belongs to and
:func:`load_resume` refuses a mismatched pair. Reading a finished run back (eval, embed, the API) is
:mod:`regtok.pipeline.run_load`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from regtok.config import TrainConfig, to_dict
from regtok.errors import RegtokError
from regtok.pipeline.manifest import (
    environment,
    file_record,
    input_ref,
    manifest_path,
    new_manifest,
    write_json_atomic,
    write_manifest,
)
from regtok.train import Callbacks, ResumeState, full_r1

CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"  # the weights of the best validation score (keep_best); what eval and the API load
STATE = "state.pt"
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


class WriteFailed(RegtokError):
    """A run file could not be written (a full disk, most often: torch.save says so as a RuntimeError)."""


def save_checkpoint(run_dir: str | os.PathLike, model: nn.Module, state: ResumeState) -> None:
    """Atomically write the weights and the resume state of ``state.step``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = _write_weights(run_dir, CHECKPOINT, model, {"step": str(state.step)})
    payload = {"step": state.step, "optimizer": _to_cpu(state.optimizer), "rng": _to_cpu(state.rng),
               "best": float(state.best)}
    try:
        tmp_state = _write_tmp(run_dir, STATE, lambda path: torch.save(payload, path))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Each file is whole at any instant; a crash between the two renames leaves a pair of different steps,
    # which load_resume detects from the step both record.
    os.replace(tmp_state, run_dir / STATE)
    os.replace(tmp, run_dir / CHECKPOINT)


def _write_weights(run_dir: Path, name: str, model: nn.Module, metadata: dict[str, str]) -> Path:
    """``model``'s weights, fsynced, under a temporary name beside ``name``; the caller renames it."""
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return _write_tmp(run_dir, name, lambda path: save_file(weights, str(path), metadata=metadata))


def _write_tmp(run_dir: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``write`` a temporary file beside ``name`` and fsync it; on any failure the temporary is removed, and an
    error of the disk (torch.save reports one as a RuntimeError) is a :class:`WriteFailed` naming the file."""
    tmp = run_dir / f".{name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        _fsync(tmp)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError | RuntimeError | SafetensorError):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        try:
            free = f"{shutil.disk_usage(run_dir).free / 2**20:,.0f} MiB free on its disk"
        except OSError:
            free = "its disk cannot be read"
        raise WriteFailed(f"could not write {run_dir / name}: {reason} ({free}); the last complete checkpoint is "
                          "kept") from None
    return tmp


def save_best(run_dir: str | os.PathLike, model: nn.Module, record: dict[str, Any]) -> None:
    """Atomically write ``best.safetensors``: the weights now, with the step, epoch and score in its metadata."""
    run_dir = Path(run_dir)
    meta = {"step": str(record["step"]), "epoch": str(record["epoch"]),
            "val_select": repr(float(record["val_select"]))}
    os.replace(_write_weights(run_dir, BEST, model, meta), run_dir / BEST)


def checkpoint_step(run_dir: str | os.PathLike, name: str = CHECKPOINT) -> int:
    """The step recorded in ``checkpoint.safetensors`` (or ``name``)."""
    return int(_metadata(Path(run_dir) / name).get("step", 0))


def _metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file; RegtokError when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RegtokError(f"{path} is not a readable safetensors file ({first_line(e)})") from None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def best_record(run_dir: str | os.PathLike) -> dict[str, float] | None:
    """{"step", "epoch", "val_select"} of ``best.safetensors``, or None when the run kept no best weights."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        return None
    meta = _metadata(path)
    return {"step": int(meta.get("step", 0)), "epoch": int(meta.get("epoch", 0)),
            "val_select": float(meta.get("val_select", "nan"))}


def weights_file(run_dir: str | os.PathLike) -> str:
    """The weights a finished run is used with: ``best.safetensors`` when kept, else ``checkpoint.safetensors``."""
    return BEST if (Path(run_dir) / BEST).is_file() else CHECKPOINT


def load_resume(run_dir: str | os.PathLike) -> ResumeState:
    """The resume state saved beside the weights; an error when absent or not of the same step."""
    run_dir = Path(run_dir)
    if not (run_dir / STATE).is_file() or not (run_dir / CHECKPOINT).is_file():
        raise RegtokError(f"{run_dir}: nothing to resume (need {CHECKPOINT} and {STATE})")
    try:
        payload = torch.load(run_dir / STATE, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise RegtokError(f"{run_dir / STATE} cannot be resumed from: it is truncated or holds objects beyond "
                          f"tensors ({first_line(e)}); start the run again in a new --out") from None
    if not (isinstance(payload, dict) and isinstance(payload.get("step"), int)
            and {"optimizer", "rng"} <= payload.keys()):
        raise RegtokError(f"{run_dir / STATE} is not a regtok resume state; start the run again in a new --out")
    if int(payload["step"]) != checkpoint_step(run_dir):
        raise RegtokError(f"{run_dir}: {STATE} (step {payload['step']}) and {CHECKPOINT} "
                          f"(step {checkpoint_step(run_dir)}) differ; the run was interrupted while saving")
    return ResumeState(int(payload["step"]), payload["optimizer"], payload["rng"],
                       float(payload.get("best", float("-inf"))))


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed per line)."""

    def __init__(self, run_dir: str | os.PathLike, keep_until_step: int | None = None):
        """Open for appending; with ``keep_until_step`` drop lines after that step first (for resume), and lines
        that are not a metrics record (a last line cut short by a crash): their numbers are in ``dropped``."""
        self.path = Path(run_dir) / METRICS
        self.dropped: list[int] = []
        if keep_until_step is not None and self.path.is_file():
            kept = []
            for number, record in metrics_lines(self.path):
                step = record.get("step", 0) if record is not None else None
                if not isinstance(step, int | float):
                    self.dropped.append(number)
                elif step <= keep_until_step:
                    kept.append(json.dumps(record, allow_nan=True))
            tmp = self.path.with_name(f".{METRICS}.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
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
    """(line number, record) for every non-blank line of a ``metrics.jsonl``; None where a line is not a JSON
    object (cut short by a crash, or damaged). Bytes that are not UTF-8 never stop the reading."""
    out: list[tuple[int, dict[str, Any] | None]] = []
    for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        out.append((number, record if isinstance(record, dict) else None))
    return out


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` (lines that are not a JSON object are left out)."""
    path = Path(run_dir) / METRICS
    return [r for _, r in metrics_lines(path) if r is not None] if path.is_file() else []


def write_run_manifest(run_dir: str | os.PathLike, *, command: list[str], config: dict[str, Any],
                       features: str | os.PathLike, val_features: str | os.PathLike | None,
                       metrics: dict[str, Any], timings: dict[str, Any], device: str, **extra: Any) -> Path:
    """Write ``manifest.json`` (kind "run"): inputs are the features manifests with their hashes."""
    run_dir = Path(run_dir)
    inputs = [input_ref("features", manifest_path(features), run_dir)]
    if val_features is not None:
        inputs.append(input_ref("val_features", manifest_path(val_features), run_dir))
    files = [file_record(run_dir / name, run_dir) for name in (CHECKPOINT, BEST, CONFIG, METRICS, STATE, CURVES)
             if (run_dir / name).is_file()]
    manifest = new_manifest("run", command=command, config=config, inputs=inputs,
                            outputs={"files": files, "checkpoint": files[0] if files else None},
                            environment_=environment(device), timings=timings, metrics=metrics, **extra)
    path = run_dir / MANIFEST
    write_manifest(path, manifest)
    return path


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


class RunWriter(Callbacks):
    """Rank 0's callbacks: metrics lines, atomic checkpoints, TensorBoard events, an optional per-step progress
    hook, and an optional ``stop(record) -> reason | None`` asked after every epoch (a sweep's pruner)."""

    def __init__(self, run_dir: Path, metrics: MetricsLog, on_step: Callable[[int, int, dict], None] | None = None,
                 on_epoch: Callable[[dict], None] | None = None, tensorboard: TensorBoardLog | None = None,
                 stop: Callable[[dict], str | None] | None = None):
        self.run_dir, self.metrics, self._on_step, self._on_epoch = run_dir, metrics, on_step, on_epoch
        self.tb, self._stop = tensorboard, stop

    def on_step(self, step: int, total: int, record: dict[str, float]) -> None:
        if self._on_step is not None:
            self._on_step(step, total, record)

    def on_log(self, record: dict[str, Any]) -> None:
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


TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install -e '.[tb]'"


def require_tensorboard() -> None:
    """One error line, before any work, when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise RegtokError(TENSORBOARD_MISSING)


class TensorBoardLog:
    """``RUN_DIR/tb/`` event files: every loss term, lr, gradient norm and samples/s per logged step (``train/``),
    the epoch means (``epoch/``) and validation R@1 (``val/``) per epoch, against the optimizer step."""

    def __init__(self, run_dir: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RegtokError(TENSORBOARD_MISSING) from None
        tb = run_dir / "tb"
        if tb.exists() and not tb.is_dir():
            raise RegtokError(f"{tb} is a file, not a directory; --tensorboard writes its event files there")
        tb.mkdir(exist_ok=True)
        probe = tb / f".probe.{os.getpid()}.tmp"  # the event writer's thread would fail later, with a traceback
        with open(probe, "w"):
            pass
        probe.unlink()
        self.writer = SummaryWriter(str(tb), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        kind, step = record.get("type"), int(record.get("step", 0))
        for key, value in record.items():
            if key in ("type", "step", "epoch") or not isinstance(value, int | float):
                continue
            group = "val" if key.startswith("val_") else ("train" if kind == "step" else "epoch")
            self.writer.add_scalar(f"{group}/{key}", value, step)
        r1 = full_r1(record)
        if r1 is not None:
            self.writer.add_scalar("val/R@1", r1, step)

    def close(self) -> None:
        self.writer.close()


def saved_train_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``train`` section of a run's ``config.json``, or None when there is none."""
    path = Path(run_dir) / CONFIG
    return json.loads(path.read_text())["train"] if path.is_file() else None
