"""Reading a trained run back: ``config.json`` checked to rebuild the model, the files a finished run's manifest
records checked against their sha256 (as ``regtok verify`` does), weights loaded strictly (every key, shape and
dtype as the config builds them, every value finite; :func:`regtok.pipeline.train.weights.load_weights`), and the
stores its manifest names as inputs. Eval, embed and the Python API load runs through here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regtok.config import TrainConfig, from_dict, from_saved
from regtok.errors import RegtokError
from regtok.pipeline.manifests.manifest import read_manifest, resolve_path
from regtok.pipeline.train.runs import CONFIG, MANIFEST, epoch_records
from regtok.pipeline.train.weights import BUFFERS, CHECKPOINT, START, checkpoint_step, load_weights, weights_file

# load_run's choice: the kept best weights (what eval uses), the last ones, or the model before its first step
WEIGHTS = ("best", "last", "start")


@dataclass
class LoadedRun:
    model: nn.Module  # RegTok, eval mode, on the CPU
    train_config: TrainConfig
    manifest: dict[str, Any]
    feature_kind: str
    modalities: tuple[str, ...] = ()
    step: int = 0
    weights: str = CHECKPOINT  # the file the weights came from
    epoch: int | None = None  # the epoch (from 1) whose weights these are, when the metrics say
    run_dir: Path | None = None  # the run directory they were read from


def load_run(run_dir: str | os.PathLike, weights: str = "best") -> LoadedRun:
    """Rebuild a trained model from a run directory (weights + config.json); eval mode, CPU.

    ``weights``: "best", the weights eval uses (``best.safetensors`` when the run kept one, else the last),
    "last" (``checkpoint.safetensors``) or "start" (``start.safetensors``, the model before its first step). A
    finished run's files must be those its manifest records.
    """
    from regtok.model import RegTok

    if weights not in WEIGHTS:
        raise RegtokError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    config = read_run_config(run_dir)
    chosen = {"best": weights_file(run_dir), "last": CHECKPOINT, "start": START}[weights]
    manifest = read_manifest(run_dir / MANIFEST, kind="run") if (run_dir / MANIFEST).is_file() else {}
    if not (run_dir / chosen).is_file() and chosen not in recorded_files(manifest):
        why = {"last": "it kept only its best weights (a sweep trial with --keep best); load weights='best'",
               "start": "it was trained by an older regtok, or kept only its last weights (--keep last)"}.get(
                   weights, "the run has no weights yet")
        raise RegtokError(f"{run_dir} has no {chosen}: {why}")
    if manifest:  # a finished run: its files are what it recorded (a run still training has no manifest yet)
        check_recorded(run_dir, manifest, (CONFIG, chosen, *_buffers(run_dir, manifest)))
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        model = RegTok.from_spec(config["model_spec"])
    load_weights(model, run_dir, chosen)
    model.eval()
    step = checkpoint_step(run_dir, chosen)
    epoch = next((r["epoch"] for r in epoch_records(run_dir) if r["step"] == step), None)
    return LoadedRun(model=model, train_config=from_dict(TrainConfig, from_saved(config["train"])), manifest=manifest,
                     feature_kind=config["feature_kind"], modalities=tuple(config["modalities"]), step=step,
                     weights=chosen, epoch=epoch, run_dir=run_dir)


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """``config.json`` of a run, checked to hold what rebuilds the model."""
    try:
        config = json.loads((run_dir / CONFIG).read_text())
    except OSError:
        raise RegtokError(f"{run_dir} is not a run directory (no readable {CONFIG})") from None
    except ValueError as e:
        raise RegtokError(f"{run_dir / CONFIG} is not valid JSON ({getattr(e, 'msg', e)})") from None
    ok = (isinstance(config, dict) and isinstance(config.get("model_spec"), dict)
          and isinstance(config.get("train"), dict) and config.get("feature_kind") in ("pooled", "tokens")
          and isinstance(config.get("modalities"), list) and all(isinstance(m, str) for m in config["modalities"]))
    if not ok:
        raise RegtokError(f"{run_dir / CONFIG} is not a regtok run config (it needs train, model_spec, modalities "
                          "and feature_kind)")
    return config


def _buffers(run_dir: Path, manifest: dict[str, Any]) -> tuple[str, ...]:
    """``buffers.safetensors`` when the weights are read over it (it is there) or the manifest records it."""
    return (BUFFERS,) if (run_dir / BUFFERS).is_file() or BUFFERS in recorded_files(manifest) else ()


def recorded_files(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The run manifest's file records by name (none for a run still training, which has no manifest)."""
    if not manifest:
        return {}
    files = manifest["outputs"].get("files")
    return {r.get("path"): r for r in files if isinstance(r, dict)} if isinstance(files, list) else {}


def check_recorded(run_dir: Path, manifest: dict[str, Any], names: tuple[str, ...]) -> None:
    """Each of ``names`` must be the file the run manifest records (size and sha256), as ``regtok verify`` checks."""
    from regtok.pipeline.manifests.manifest import sha256_file

    records = recorded_files(manifest)
    for name in names:
        rec, path = records.get(name), run_dir / name
        if rec is None:
            raise RegtokError(f"{path} is not among the files the run manifest records; it was added after the run "
                              "was trained")
        if not path.is_file():
            raise RegtokError(f"{path} is missing: the run manifest records it; `regtok verify {run_dir}` lists "
                              "what changed")
        if path.stat().st_size != rec.get("bytes") or sha256_file(path) != rec.get("sha256"):
            raise RegtokError(f"{path} has changed since the run was trained (size or sha256 differ from its "
                              f"manifest); `regtok verify {run_dir}` lists what changed")


def run_input(run_manifest: Path, role: str) -> Path | None:
    """The path of the run manifest's input with ``role`` (a features manifest), when recorded and present."""
    if not run_manifest.is_file():
        return None
    for ref in read_manifest(run_manifest, kind="run").get("inputs", []):
        path = resolve_path(run_manifest, ref["path"])
        if ref.get("role") == role and path.is_file():
            return path
    return None


def training_store_manifest(run_manifest: Path) -> dict | None:
    """The features manifest the run was trained on, when the run manifest points at a readable one."""
    path = run_input(run_manifest, "features")
    return read_manifest(path, kind="features") if path is not None else None
