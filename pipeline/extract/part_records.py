"""Completion records of the extract stage's parts: one ``parts/<shard>.json`` per finished part.

A record is written after its part is renamed into place; it holds the part's counts, skipped samples and
hashes, the shard it was made from and a fingerprint of the encoders. A rerun skips shards whose record still
matches (img2dataset's per-shard stats files), so a crash loses at most the shards in flight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from regtok.errors import RegtokError
from regtok.pipeline.extract.store import PARTS_DIR, PartWriter
from regtok.pipeline.manifests.manifest import write_json_atomic

if TYPE_CHECKING:
    from regtok.pipeline.extract.samples import ShardBatch
    from regtok.pipeline.extract.stage import Job


def record_path(root: Path, name: str) -> Path:
    return root / PARTS_DIR / f"{name}.json"


def finished(root: Path, name: str, fp: str, shard: Path, stale: list[tuple[str, str]] | None = None) -> bool:
    """Whether a shard's part is complete for this fingerprint and was made from this very shard; RegtokError if
    it belongs to another run. A part made from another input (or changed since) is not finished; why goes
    into ``stale``."""
    rec_path, part = record_path(root, name), root / PARTS_DIR / f"{name}.h5"
    if not (rec_path.is_file() and part.is_file()):
        return False
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(rec, dict):
        return False
    if rec.get("fingerprint") != fp:
        raise RegtokError(f"{root} holds parts extracted with other encoders or feature kinds; use a new --out")
    why = _input_changed(rec, shard) or _part_changed(rec, part)
    if why and stale is not None:
        stale.append((name, why))
    return why is None


def shard_identity(shard: Path) -> dict:
    st = shard.stat()
    return {"shard_bytes": st.st_size, "shard_mtime_ns": st.st_mtime_ns}


def _input_changed(rec: dict, shard: Path) -> str | None:
    """Why the shard a part was made from is not ``shard`` now, or None: the same path, size and mtime, or
    failing that the same sha256 (a shard copied or touched without changing)."""
    from regtok.pipeline.manifests.manifest import sha256_file

    try:
        if rec.get("shard") == str(shard) and all(rec.get(k) == v for k, v in shard_identity(shard).items()):
            return None
        if rec.get("shard_sha256") is not None and sha256_file(shard) == rec["shard_sha256"]:
            return None
    except OSError:
        pass  # unreadable now: extracting it again records the error
    return f"made from another input ({rec.get('shard')}, sha256 {str(rec.get('shard_sha256'))[:12]}…)"


def _part_changed(rec: dict, part: Path) -> str | None:
    """Why a part file is not what its record says (size; sha256 for small parts), or None."""
    from regtok.pipeline.extract.store import HASH_PARTS_UP_TO
    from regtok.pipeline.manifests.manifest import sha256_file

    size = part.stat().st_size
    if rec.get("bytes") is not None and size != rec["bytes"]:
        return "changed since it was written (size)"
    if size <= HASH_PARTS_UP_TO // 16 and rec.get("sha256") is not None and sha256_file(part) != rec["sha256"]:
        return "changed since it was written (sha256)"
    return None


def finish_part(job: Job, batch: ShardBatch, writer: PartWriter, bad: list[dict], fp: str) -> None:
    """Rename the part into place, then write its completion record."""
    from regtok.pipeline.manifests.manifest import sha256_file

    n = writer.close()
    skipped = [{"shard": job.names[batch.shard], **s} for s in bad]
    lost = None
    if batch.error:
        expected = job.expected.get(batch.shard)
        lost = max(expected - batch.read, 0) if expected is not None else None
        skipped.append({"shard": job.names[batch.shard], "key": None, "reason": batch.error, "lost": lost})
    identity = shard_identity(job.shards[batch.shard]) if batch.sha256 else {}
    record = {"fingerprint": fp, "shard": str(job.shards[batch.shard]), "shard_sha256": batch.sha256, **identity,
              "part": f"{PARTS_DIR}/{writer.path.name}", "samples": n, "read": batch.read,
              "labels": sorted({k for row in writer.labels for k in row}),
              "bytes": writer.path.stat().st_size, "sha256": sha256_file(writer.path), "skipped": skipped,
              "skip_count": len(bad) + ((lost if lost else 1) if batch.error else 0)}
    write_json_atomic(record_path(Path(job.config.out), job.names[batch.shard]), record)
