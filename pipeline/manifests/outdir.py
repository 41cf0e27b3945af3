"""Output directories: a stage writes only into an empty directory or its own earlier output, and one
``regtok extract`` at a time writes into a store.

"Its own earlier output" is recognised by the stage's manifest: a ``dataset.json`` written by the same command
(``synth``: it records a generator; ``pack``: it records a source CSV) together with the shards it lists, or a
features ``manifest.json`` with its index and ``parts/`` (or ``parts/`` alone: an interrupted extraction).
Anything else needs ``--overwrite``.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from regtok.errors import RegtokError

LOCK_NAME = ".regtok-extract.lock"


def _entries(out: Path) -> list[str]:
    """Names in ``out`` besides temporaries (``.NAME.PID.tmp``) and the extract lock."""
    if not out.exists():
        return []
    if not out.is_dir():
        raise RegtokError(f"{out} is a file, not a directory")
    return sorted(p.name for p in out.iterdir()
                  if p.name != LOCK_NAME and not (p.name.startswith(".") and p.name.endswith(".tmp")))


def _manifest(path: Path, kind: str) -> dict | None:
    from regtok.pipeline.manifests.manifest import ManifestError, read_manifest

    try:
        return read_manifest(path, kind=kind)
    except ManifestError:
        return None


def dataset_foreign(out: Path, maker: str) -> list[str]:
    """What in ``out`` is not an earlier ``regtok synth`` / ``regtok pack`` (``maker``) output."""
    entries = _entries(out)
    if not entries:
        return []
    m = _manifest(out / "dataset.json", "dataset") if "dataset.json" in entries else None
    made_by = None if m is None else "synth" if m.get("generator") else "pack" if m.get("source") else None
    if made_by != maker:
        return _first(entries, "dataset.json")
    own = {"dataset.json"} | {s["path"] for s in m.get("shards") or [] if isinstance(s, dict)
                              and isinstance(s.get("path"), str)}
    return [e for e in entries if e not in own]


def store_foreign(out: Path) -> list[str]:
    """What in ``out`` is not an earlier ``regtok extract`` output (finished or interrupted)."""
    entries = _entries(out)
    if not entries:
        return []
    if "manifest.json" in entries:
        if _manifest(out / "manifest.json", "features") is None:
            return _first(entries, "manifest.json")
        own = {"manifest.json", "features.h5", "parts"}
    elif (out / "parts").is_dir():
        own = {"features.h5", "parts"}  # interrupted before the manifest: resume it
    else:
        own = set()
    return [e for e in entries if e not in own]


RUN_FILES = {"checkpoint.safetensors", "best.safetensors", "buffers.safetensors", "start.safetensors", "state.pt",
             "config.json", "metrics.jsonl", "curves.png", "manifest.json", "tb"}  # pipeline/train/runs.py's names
REPORT_FILES = {"report.json", "report.md", "prefix.png", "embeddings.h5", "manifest.json"}  # pipeline/eval/stage.py's
COMPARE_FILES = {"compare.md", "curves.png"}


def run_foreign(out: Path) -> list[str]:
    """What in ``out`` is not a ``regtok train`` run (finished, or interrupted before its manifest)."""
    entries = _entries(out)
    if "manifest.json" in entries and _manifest(out / "manifest.json", "run") is None:
        return _first(entries, "manifest.json")
    if "config.json" in entries and not is_run_config(out / "config.json"):
        return _first(entries, "config.json")
    return [e for e in entries if e not in RUN_FILES]


def is_run_config(path: Path) -> bool:
    """Whether ``path`` is a run's ``config.json`` (it holds the train config and the model spec)."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"train", "model_spec"} <= data.keys()


def report_foreign(out: Path, overwrite: bool) -> list[str]:
    """What in ``out`` stops ``regtok eval`` from writing there: anything, unless ``overwrite``; an earlier report
    is replaced only with ``overwrite`` too (it is never replaced silently)."""
    entries = _entries(out)
    if entries and not overwrite and _manifest(out / "manifest.json", "eval") is not None:
        raise RegtokError(f"{out} already holds an eval report; pass --overwrite to replace it, or choose another "
                          "--out")
    return entries


def compare_foreign(out: Path) -> list[str]:
    """What in ``out`` is not an earlier ``regtok compare --out`` (compare.md and its curves.png)."""
    entries = _entries(out)
    own = COMPARE_FILES if "compare.md" in entries else set()
    return [e for e in entries if e not in own]


def claim_file(path: Path, command: str, overwrite: bool) -> None:
    """RegtokError when the output file ``path`` exists (unless ``overwrite``) or is a directory."""
    if path.is_dir():
        raise RegtokError(f"{path} is a directory; `regtok {command}` writes a file there")
    if path.exists() and not overwrite:
        raise RegtokError(f"{path} already exists; pass --overwrite to replace it, or choose another --out")


def _first(entries: list[str], name: str) -> list[str]:
    """``entries`` with ``name`` first when it is there (the message names it)."""
    return sorted(entries, key=lambda e: e != name)


def claim(out: Path, foreign: list[str], command: str, overwrite: bool) -> None:
    """RegtokError unless ``out`` holds nothing foreign (or ``overwrite`` says to write there anyway)."""
    if foreign and not overwrite:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise RegtokError(f"{out} already holds {foreign[0]}{more}, which is not the output of an earlier "
                          f"`regtok {command}`; pass --overwrite to write into it anyway, or choose another --out")


class DirLock:
    """An advisory POSIX record lock (``fcntl.lockf``) on ``DIR/.regtok-extract.lock``, held while one extraction
    writes ``DIR``; the file holds the holder's pid.

    The lock belongs to the process that took it: it goes when that process ends (also when killed), and the
    children it forks (DataLoader workers, which can outlive a killed parent for seconds) never hold it. A
    ``flock`` lock would stay held by those children, so a resume right after a kill -9 would be refused.
    """

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / LOCK_NAME, "a+")
        try:
            fcntl.lockf(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            raise RegtokError(f"{out} is being written by another regtok extract (pid {holder}); wait for it to "
                              f"finish, or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        fcntl.lockf(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()
