"""Reading a trained run back: ``config.json`` checked to rebuild the model, the files a finished run's manifest
records checked against their sha256 (as ``regtok verify`` does), and weights loaded strictly (every key, shape and
dtype as the config builds them, every value finite). Eval, embed and the Python API load runs through here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from regtok.config import TrainConfig, from_dict
from regtok.errors import RegtokError
from regtok.pipeline.manifest import read_manifest
from regtok.pipeline.runs import CHECKPOINT, CONFIG, MANIFEST, checkpoint_step, first_line, weights_file


@dataclass
class LoadedRun:
    model: nn.Module  # RegTok, eval mode, on the CPU
    train_config: TrainConfig
    manifest: dict[str, Any]
    feature_kind: str
    modalities: tuple[str, ...] = ()
    step: int = 0


def load_weights(model: nn.Module, run_dir: str | os.PathLike, name: str = CHECKPOINT) -> None:
    """Load ``checkpoint.safetensors`` (or ``name``) into ``model`` (strict: every key must match)."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise RegtokError(f"{run_dir}: no {name}")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RegtokError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise RegtokError(f"{path} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in weights.items():
        want = expected[key]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise RegtokError(f"{path}: {key} is {value.dtype} {tuple(value.shape)}, the run's config builds "
                              f"{want.dtype} {tuple(want.shape)}; the weights and {CONFIG} do not belong together")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise RegtokError(f"{path}: {key} holds NaN or inf values")
    model.load_state_dict(weights)


def load_run(run_dir: str | os.PathLike) -> LoadedRun:
    """Rebuild a trained model from a run directory (weights + config.json); eval mode, CPU."""
    from regtok.model import RegTok

    run_dir = Path(run_dir)
    if run_dir.is_file():
        run_dir = run_dir.parent
    config = read_run_config(run_dir)
    chosen = weights_file(run_dir)
    manifest = read_manifest(run_dir / MANIFEST, kind="run") if (run_dir / MANIFEST).is_file() else {}
    if manifest:  # a finished run: its files are what it recorded (a run still training has no manifest yet)
        check_recorded(run_dir, manifest, (CONFIG, chosen))
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's RNG alone
        model = RegTok.from_spec(config["model_spec"])
    load_weights(model, run_dir, chosen)
    model.eval()
    return LoadedRun(model=model, train_config=from_dict(TrainConfig, config["train"]), manifest=manifest,
                     feature_kind=config["feature_kind"], modalities=tuple(config["modalities"]),
                     step=checkpoint_step(run_dir, chosen))


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


def check_recorded(run_dir: Path, manifest: dict[str, Any], names: tuple[str, ...]) -> None:
    """Each of ``names`` must be the file the run manifest records (size and sha256), as ``regtok verify`` checks."""
    from regtok.pipeline.manifest import sha256_file

    files = manifest["outputs"].get("files")
    records = {r.get("path"): r for r in files if isinstance(r, dict)} if isinstance(files, list) else {}
    for name in names:
        rec, path = records.get(name), run_dir / name
        if rec is None:
            raise RegtokError(f"{path} is not among the files the run manifest records; it was added after the run "
                              "was trained")
        if path.stat().st_size != rec.get("bytes") or sha256_file(path) != rec.get("sha256"):
            raise RegtokError(f"{path} has changed since the run was trained (size or sha256 differ from its "
                              f"manifest); `regtok verify {run_dir}` lists what changed")
