"""One manifest schema for every stage (dataset, features, run, eval).

A manifest is JSON data, never code. Common fields::

    {"kind": "features", "schema_version": 1, "created": "2026-…Z",
     "command": ["regtok", "extract", …], "config": {…resolved config…},
     "inputs": [{"role": "dataset", "path": "…", "sha256": "…"}],
     "outputs": {"files": [{"path": "…", "bytes": 123, "sha256": "…"}], …},
     "environment": {"python": …, "torch": …, "open_clip": …, "timm": …, "device": …, "git_commit": …},
     "timings": {"seconds": …, …}}

Stage-specific fields (``shards``, ``encoders``, ``skipped``, ``metrics`` …) sit beside these at top level.
Paths are stored relative to the manifest's directory when they lie under it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from regtok.errors import RegtokError

SCHEMA_VERSION = 1
KINDS = ("dataset", "features", "run", "eval", "sweep")
REQUIRED = ("kind", "schema_version", "command", "config", "inputs", "outputs", "environment", "timings")


class ManifestError(RegtokError):
    """A manifest that is missing, unreadable, of the wrong kind, or edited into an invalid state."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``{"path", "bytes", "sha256"}`` of a file; path relative to ``root`` when it lies under it."""
    p = Path(path)
    return {"path": relpath(p, root), "bytes": p.stat().st_size, "sha256": sha256_file(p)}


def input_ref(role: str, path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """A reference to an upstream file (usually the previous stage's manifest) with its hash."""
    return {"role": role, "path": relpath(Path(path), root), "sha256": sha256_file(path)}


def relpath(path: Path, root: str | os.PathLike | None) -> str:
    """``path`` relative to ``root`` when it lies under it, else absolute."""
    path = Path(path).absolute()
    if root is not None:
        try:
            return path.relative_to(Path(root).absolute()).as_posix()
        except ValueError:
            pass
    return str(path)


def resolve_path(manifest_path: str | os.PathLike, recorded: str) -> Path:
    """A path recorded in a manifest, resolved against the manifest's directory."""
    p = Path(recorded)
    return p if p.is_absolute() else Path(manifest_path).absolute().parent / p


def environment(device: str | None = None) -> dict[str, Any]:
    """Versions of what produced a result: python, torch, open_clip, timm, numpy, h5py; device; git commit."""
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    for name, module in (("torch", "torch"), ("open_clip", "open_clip"), ("timm", "timm"),
                         ("numpy", "numpy"), ("h5py", "h5py"), ("regtok", "regtok")):
        mod = sys.modules.get(module)
        if mod is None:
            try:
                from importlib.metadata import version

                env[name] = version({"open_clip": "open_clip_torch"}.get(name, name))
            except Exception:
                env[name] = None
        else:
            env[name] = getattr(mod, "__version__", None)
    if device is not None:
        env["device"] = device
        if device.startswith("cuda") and "torch" in sys.modules:
            import torch

            env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    env["git_commit"] = _git_commit()
    return env


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def new_manifest(kind: str, *, command: list[str] | None = None, config: dict[str, Any] | None = None,
                 inputs: list[dict[str, Any]] | None = None, outputs: dict[str, Any] | None = None,
                 environment_: dict[str, Any] | None = None, timings: dict[str, Any] | None = None,
                 **extra: Any) -> dict[str, Any]:
    """Assemble a manifest dict with every common field; ``extra`` holds stage-specific fields."""
    if kind not in KINDS:
        raise ValueError(f"unknown manifest kind {kind!r}")
    m: dict[str, Any] = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": list(command if command is not None else sys.argv),
        "config": config or {},
        "inputs": inputs or [],
        "outputs": outputs or {},
        "environment": environment_ if environment_ is not None else environment(),
        "timings": timings or {},
    }
    m.update(extra)
    return m


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary name in the same directory, fsync, and rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a full disk: no half-written temporary is left behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Validate and write a manifest atomically."""
    validate(manifest, where=str(path))
    write_json_atomic(path, manifest)


def read_manifest(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Read and validate a manifest; ``path`` may be the manifest file or the directory holding it."""
    p = Path(path)
    if p.is_dir():
        for name in ("manifest.json", "dataset.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise ManifestError(f"{path}: no manifest.json or dataset.json in this directory")
    try:
        text = p.read_text()
    except OSError as e:
        raise ManifestError(f"cannot read manifest {p}: {e.strerror}") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{p} is not valid JSON (line {e.lineno}: {e.msg}); was it edited or truncated?") from None
    validate(m, where=str(p))
    kinds = (kind,) if isinstance(kind, str) else kind
    if kinds and m["kind"] not in kinds:
        raise ManifestError(f"{p} is a {m['kind']} manifest, expected {' or '.join(kinds)}")
    return m


def manifest_path(path: str | os.PathLike) -> Path:
    """The manifest file for a path that is either the file or its directory."""
    p = Path(path)
    if p.is_dir():
        for name in ("manifest.json", "dataset.json"):
            if (p / name).is_file():
                return p / name
    return p


def validate(m: Any, where: str = "manifest") -> None:
    """Raise ManifestError unless ``m`` has the common fields with the right types."""
    if not isinstance(m, dict):
        raise ManifestError(f"{where}: a manifest must be a JSON object")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise ManifestError(f"{where}: missing field(s) {', '.join(missing)}")
    if m["kind"] not in KINDS:
        raise ManifestError(f"{where}: unknown kind {m['kind']!r} (known: {', '.join(KINDS)})")
    if m["schema_version"] != SCHEMA_VERSION:
        raise ManifestError(f"{where}: schema_version {m['schema_version']!r}, this regtok reads {SCHEMA_VERSION}")
    types = {"command": list, "config": dict, "inputs": list, "outputs": dict, "environment": dict, "timings": dict}
    for key, tp in types.items():
        if not isinstance(m[key], tp):
            raise ManifestError(f"{where}: field {key!r} must be a {tp.__name__}")
    for ref in m["inputs"]:
        if not (isinstance(ref, dict) and isinstance(ref.get("path"), str)):
            raise ManifestError(f"{where}: every input needs a string 'path'")
