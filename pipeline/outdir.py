"""Output directories: a stage writes only into an empty directory or its own earlier output, and one
``regtok extract`` at a time writes into a store.

"Its own earlier output" is recognised by the stage's manifest: a ``dataset.json`` written by the same command
(``synth``: it records a generator; ``pack``: it records a source CSV) together with the shards it lists, or a
features ``manifest.json`` with its index and ``parts/`` (or ``parts/`` alone: an interrupted extraction).
Anything else needs ``--overwrite``.
"""

from __future__ import annotations

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
    from regtok.pipeline.manifest import ManifestError, read_manifest

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
    """An advisory ``fcntl`` lock on ``DIR/.regtok-extract.lock``, held while one extraction writes ``DIR``.

    The lock goes with its holder (also when the process is killed); the file holds the holder's pid.
    """

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / LOCK_NAME, "a+")
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
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
        fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
        self.file.close()
