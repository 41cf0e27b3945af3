"""WebDataset tar shards: deterministic writing, robust reading, and shard specs.

A sample is a group of consecutive tar members sharing a key (the member name up to the first dot of its
basename, as webdataset splits it): ``000123.vision.png``, ``000123.tactile.png``, ``000123.json``.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from regtok.errors import RegtokError

SHARD_PATTERN = "shard-{:06d}.tar"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm")  # the image members extract reads (extract/samples.py)
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def shard_name(index: int) -> str:
    """``shard-000012.tar`` for index 12."""
    return SHARD_PATTERN.format(index)


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, Iterable[tuple[str, bytes]]]]) -> int:
    """Write ``(key, [(ext, bytes), …])`` samples to a tar shard, byte-for-byte deterministic.

    Members keep the given order; mtime, uid/gid, owner names and mode are fixed. The shard is written to a
    temporary name and renamed, so a crash never leaves a partial shard under the final name.
    Returns the number of samples written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    with open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            n += 1
    os.replace(tmp, path)
    return n


@dataclass
class ShardSample:
    """One sample read from a shard: its key and ``{ext: bytes}``."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)


class ShardReadError(Exception):
    """A shard that could not be read to its end (truncated, not a tar, unreadable)."""

    def __init__(self, path: str, reason: str, samples_read: int) -> None:
        super().__init__(f"{path}: {reason} (after {samples_read} samples)")
        self.path, self.reason, self.samples_read = path, reason, samples_read


def prepare_out_dir(out: Path, command: str = "synth", overwrite: bool = False) -> None:
    """Create ``out``; refuse a folder holding anything but an earlier output of ``regtok COMMAND`` (its
    dataset.json and the shards it lists) unless ``overwrite``."""
    from regtok.pipeline.manifests.outdir import claim, dataset_foreign

    claim(out, dataset_foreign(out, command), command, overwrite)
    out.mkdir(parents=True, exist_ok=True)


def remove_stale_shards(out: Path, written: list[Path]) -> None:
    """Delete ``shard-NNNNNN.tar`` files left in ``out`` by an earlier, larger run."""
    keep = {p.name for p in written}
    for p in out.glob("shard-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if p.name not in keep:
            p.unlink()


def iter_shard(path: str | os.PathLike) -> Iterator[ShardSample]:
    """Yield the samples of a shard in file order.

    A read error (truncation, corrupt header) raises :class:`ShardReadError` after every complete sample
    before it has been yielded; the sample that was being assembled when the error hit is not yielded.
    """
    path = str(path)
    n = 0
    current: ShardSample | None = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                m = _KEY_EXT.match(info.name)
                if m is None:
                    continue  # a member without an extension belongs to no sample (webdataset skips it too)
                key, ext = m.group(1), m.group(2)
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise EOFError("member data ends early")
                if current is not None and current.key != key:
                    yield current
                    n += 1
                    current = None
                if current is None:
                    current = ShardSample(key)
                current.files[ext] = data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ShardReadError(path, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__, n) from e
    if current is not None:
        yield current


def expand_shards(spec: str, *, allow_outside: bool = True) -> list[Path]:
    """Expand a shard spec to an ordered list of local shard paths.

    ``spec`` is a brace pattern (``data/shard-{000000..000015}.tar``), a directory (its ``*.tar`` files,
    sorted), a ``dataset.json`` written by ``regtok synth``/``regtok pack``, a single tar, or several of these
    joined by ``::``. Commands (``pipe:``) and remote URLs are refused: shard specs are data, not code.
    """
    out: list[Path] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            continue
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", part) and not part.startswith("file:"):
            raise RegtokError(f"shard spec {part!r}: only local paths are allowed (no 'pipe:' commands or URLs)")
        part = part.removeprefix("file:")
        p = Path(part)
        if p.is_dir():
            found = sorted(p.glob("*.tar"))
            if not found:
                raise RegtokError(f"shard directory {part} holds no .tar files")
            out.extend(found)
        elif p.suffix == ".json":
            out.extend(_dataset_shards(p))
        else:
            from braceexpand import UnbalancedBracesError, braceexpand

            try:
                expanded = [Path(x) for x in braceexpand(part)]
            except UnbalancedBracesError:
                raise RegtokError(f"shard spec {part!r}: unbalanced braces (expected e.g. "
                                  f"shard-{{000000..000015}}.tar)") from None
            missing = [str(x) for x in expanded if not x.exists()]
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise RegtokError(f"shard not found: {missing[0]}{more}")
            out.extend(expanded)
    if not out:
        raise RegtokError(f"shard spec {spec!r} names no shards")
    return out


def _dataset_shards(path: Path) -> list[Path]:
    from regtok.pipeline.manifests.manifest import read_manifest, resolve_path

    m = read_manifest(path, kind="dataset")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise RegtokError(f"{path}: dataset manifest lists no shards")
    paths = []
    for s in shards:
        if not isinstance(s, dict) or not isinstance(s.get("path"), str):
            raise RegtokError(f"{path}: every shard entry needs a string 'path'")
        p = resolve_path(path, s["path"])
        if not p.exists():
            raise RegtokError(f"{path}: shard {s['path']} is missing")
        paths.append(p)
    return paths
