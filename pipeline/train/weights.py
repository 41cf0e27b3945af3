"""A run's weight files: the last checkpoint, the kept best weights, the resume state and the fixed buffers.

    RUN_DIR/checkpoint.safetensors   the last weights; metadata: step
    RUN_DIR/best.safetensors         the weights of the best validation epoch (keep_best): what eval and the API
                                     load; metadata: step, epoch (counted from 1), val_select
    RUN_DIR/buffers.safetensors      the model's fixed buffers, once per run; metadata: a digest of each
    RUN_DIR/start.safetensors        the model at its start, before any step (the CCA start, the fitted decoders):
                                     eval's "start" baseline loads it instead of fitting the start again
    RUN_DIR/state.pt                 resume state: optimizer state, step, RNG states (tensors and dicts only,
                                     loadable with ``weights_only=True``)

**Fixed buffers.** A model's persistent buffers that training never changes (the read basis, its centre, the
feature statistics …) are most of a small run's bytes: the read basis alone is (T·D_in) × read_dim floats. The
first weights file a run writes puts every persistent buffer into ``buffers.safetensors`` with a digest of its
value; each weights file then leaves out every buffer whose value still has that digest and keeps any that
changed. Which buffers are fixed is found by value, not by name, so this holds whatever buffers the model has.
:func:`read_weights` reads the buffers file under the weights file's own tensors: the pair is always the exact
state dict. Runs written before the buffers file existed hold every tensor in each weights file and load as
they did.

Every file is written to a temporary name and renamed into place, so a crash leaves the previous version whole;
a file that cannot be written (a full disk, a read-only directory) is a :class:`WriteFailed` that names it, with
its temporary removed. The weights and the resume state are two files: ``state.pt`` records the step of the
weights it belongs to and :func:`load_resume` refuses a mismatched pair.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from regtok.errors import RegtokError
from regtok.reduce import TOKEN_DIM
from regtok.train import ResumeState

CHECKPOINT = "checkpoint.safetensors"
BEST = "best.safetensors"  # the weights of the best validation score (keep_best); what eval and the API load
BUFFERS = "buffers.safetensors"  # the fixed buffers, once per run
START = "start.safetensors"  # the model before its first step: eval's "start" baseline
STATE = "state.pt"
EPOCHS_FROM = "epochs_from"  # best.safetensors metadata: "1" where epochs are counted from 1 (absent: from 0)


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


def save_best(run_dir: str | os.PathLike, model: nn.Module, record: dict[str, Any]) -> None:
    """Atomically write ``best.safetensors``: the weights now, with the step, epoch and score in its metadata."""
    run_dir = Path(run_dir)
    meta = {"step": str(record["step"]), "epoch": str(record["epoch"]), EPOCHS_FROM: "1",
            "val_select": repr(float(record["val_select"]))}
    os.replace(_write_weights(run_dir, BEST, model, meta), run_dir / BEST)


def save_start(run_dir: str | os.PathLike, model: nn.Module) -> None:
    """Atomically write ``start.safetensors``: the weights of a new run before its first step."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    os.replace(_write_weights(run_dir, START, model, {"step": "0"}), run_dir / START)


def rewrite_weights(run_dir: str | os.PathLike, name: str, model: nn.Module) -> None:
    """Atomically replace the weights file ``name`` with ``model``'s weights, keeping its metadata (step …)."""
    run_dir = Path(run_dir)
    os.replace(_write_weights(run_dir, name, model, _metadata(run_dir / name)), run_dir / name)


def persistent_buffers(model: nn.Module) -> list[str]:
    """The state-dict names of ``model``'s persistent buffers: the candidates for ``buffers.safetensors``."""
    saved = set(model.state_dict())
    return [name for name, _ in model.named_buffers() if name in saved]


def _write_weights(run_dir: Path, name: str, model: nn.Module, metadata: dict[str, str]) -> Path:
    """``model``'s weights less its fixed buffers, fsynced, under a temporary name beside ``name``."""
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    fixed = _fixed_buffers(run_dir, {k: weights[k] for k in persistent_buffers(model)})
    kept = {k: v for k, v in weights.items() if k not in fixed}
    return _write_tmp(run_dir, name, lambda path: save_file(kept, str(path), metadata=metadata))


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
        kept = ("the last complete checkpoint is kept" if (run_dir / CHECKPOINT).is_file() else
                "no checkpoint had been written yet")
        raise WriteFailed(f"could not write {run_dir / name}: {reason} ({free}); {kept}") from None
    return tmp


def _fixed_buffers(run_dir: Path, buffers: dict[str, torch.Tensor]) -> set[str]:
    """The names of ``buffers`` whose values ``buffers.safetensors`` holds (it is written first if absent)."""
    path = run_dir / BUFFERS
    if not path.is_file():
        if not buffers:
            return set()
        digests = {k: _digest(v) for k, v in buffers.items()}
        os.replace(_write_tmp(run_dir, BUFFERS, lambda tmp: save_file(buffers, str(tmp), metadata=digests)), path)
    stored = _metadata(path)
    return {k for k, v in buffers.items() if stored.get(k) == _digest(v)}


def _digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def drop_stale_buffers(run_dir: str | os.PathLike) -> None:
    """Remove a buffers file a new run in ``run_dir`` did not write (left by a run that crashed before its first
    checkpoint): the new run writes its own."""
    (Path(run_dir) / BUFFERS).unlink(missing_ok=True)


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
    """{"step", "epoch" (from 1), "val_select"} of ``best.safetensors``, or None when the run kept none."""
    path = Path(run_dir) / BEST
    if not path.is_file():
        return None
    meta = _metadata(path)
    shift = 0 if meta.get(EPOCHS_FROM) == "1" else 1  # files written before epochs were counted from 1
    return {"step": int(meta.get("step", 0)), "epoch": int(meta.get("epoch", 0)) + shift,
            "val_select": float(meta.get("val_select", "nan"))}


def weights_file(run_dir: str | os.PathLike) -> str:
    """The weights a finished run is used with: ``best.safetensors`` when kept, else ``checkpoint.safetensors``."""
    return BEST if (Path(run_dir) / BEST).is_file() else CHECKPOINT


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full state dict a weights file stands for: its tensors over its run's ``buffers.safetensors``."""
    path = Path(path)
    try:
        weights = load_file(str(path))
        buffers = load_file(str(path.parent / BUFFERS)) if (path.parent / BUFFERS).is_file() else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise RegtokError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    return {**buffers, **weights}


def load_weights(model: nn.Module, run_dir: str | os.PathLike, name: str = CHECKPOINT) -> None:
    """Load ``checkpoint.safetensors`` (or ``name``) into ``model``, strictly: every key, shape and dtype as the
    model builds them, every value finite."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise RegtokError(f"{run_dir}: no {name}")
    weights = read_weights(path)
    if any(k.endswith(("decoder.queries", "decoder.summary.1.weight")) for k in weights):
        raise RegtokError(f"{path} was written by an older regtok, whose preservation decoder this version replaced "
                          "(docs/learning.md); train the run again")
    wide = sorted(k for k in model.state_dict() if k.endswith(".token_basis") and k not in weights)
    if wide:
        raise RegtokError(f"{path} was written by an older regtok, whose read flattened tokens wider than {TOKEN_DIM} "
                          f"without reducing each token first ({wide[0]} is missing); train the run again")
    _check_weights(path, weights, model.state_dict())
    model.load_state_dict(weights)


def _check_weights(path: Path, weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every key of the model, each of its shape and dtype, every value finite."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise RegtokError(f"{path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in weights.items():
        want = expected[key]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise RegtokError(f"{path}: {key} is {value.dtype} {tuple(value.shape)}, the run's config builds "
                              f"{want.dtype} {tuple(want.shape)}; the weights and config.json do not belong together")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RegtokError(f"{path}: {key} holds NaN or inf values")


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


def prune_weights(run_dir: str | os.PathLike, keep: str) -> list[str]:
    """Remove the weight files a finished run need not keep; returns the names removed.

    ``best``: what eval needs, the kept best weights (or the last ones when the run kept no best) and the start;
    ``last``: what a resume needs, the last weights and the resume state (eval then uses the last weights, and
    fits the start again for its "start" baseline);
    ``all``: everything.
    """
    run_dir = Path(run_dir)
    drop = {"all": (), "last": (BEST, START), "best": (CHECKPOINT, STATE) if (run_dir / BEST).is_file() else (STATE,)}
    if keep not in drop:
        raise RegtokError(f"--keep must be one of {', '.join(drop)}, got {keep!r}")
    removed = [name for name in drop[keep] if (run_dir / name).is_file()]
    for name in removed:
        (run_dir / name).unlink()
    return removed


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
