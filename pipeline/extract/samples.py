"""The extract stage's input side: shards -> batches of uint8 images, keys and labels, in DataLoader workers.

Each worker takes whole shards (worker i of W takes shards i::W of the list it is given) and yields batches
that belong to one shard, then one closing :class:`ShardBatch` (``done=True``) carrying the shard's hash,
its skipped samples and, when it could not be read to its end, the error. The consumer therefore always
learns how a shard ended; nothing is dropped silently.

Bad samples are skipped with a reason: a missing modality, an undecodable image, a ``json`` member that is
not a JSON object. A truncated shard keeps the complete samples before the damage (``iter_shard`` yields
them) and reports the truncation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from regtok.pipeline.data import IMAGE_EXTS, ShardReadError, iter_shard
from regtok.pipeline.encoders.images import ImageDecodeError, ImagePrep


class SkipSample(Exception):
    """A sample that cannot be used; the message is the reason recorded in the manifest."""


@dataclass
class ShardBatch:
    """Up to ``batch_size`` samples of one shard (``done`` marks the shard's last batch)."""

    shard: int  # index into the job's shard list
    keys: list[str] = field(default_factory=list)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # {modality: (b, 3, H, W) uint8}
    labels: list[dict[str, float]] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # [{"key", "reason"}]
    done: bool = False
    error: str | None = None  # set when the shard could not be read to its end
    read: int = 0  # samples read from the shard (complete ones), set on the closing batch
    sha256: str | None = None  # of the shard file, set on the closing batch

    def pin_memory(self) -> ShardBatch:
        """Called by the DataLoader's pinning thread (CUDA): page-locked images copy to the GPU asynchronously."""
        self.images = {m: x.pin_memory() for m, x in self.images.items()}
        return self


@dataclass(frozen=True)
class LabelRules:
    """Which json fields become labels: every numeric field, or only the names of a dataset's label schema
    (whose categorical string values map to class indices)."""

    schema: dict | None = None

    def extract(self, record: dict) -> dict[str, float]:
        if self.schema is None:
            return {k: float(v) for k, v in record.items() if _is_number(v)}
        out = {}
        for name, spec in self.schema.items():
            v = record.get(name)
            if _is_number(v):
                out[name] = float(v)
            elif isinstance(v, str) and v in (spec.get("classes") or []):
                out[name] = float(spec["classes"].index(v))
        return out


def decode_sample(files: dict[str, bytes], preps: dict[str, ImagePrep],
                  rules: LabelRules) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One sample's ``{modality: (3, H, W) uint8}`` and labels; :class:`SkipSample` when it is unusable."""
    images = {}
    for modality, prep in preps.items():
        data = next((files[f"{modality}.{ext}"] for ext in IMAGE_EXTS if f"{modality}.{ext}" in files), None)
        if data is None:
            raise SkipSample(f"missing modality {modality!r} (members: {', '.join(sorted(files))})")
        try:
            images[modality] = prep.to_uint8(data)
        except ImageDecodeError as e:
            raise SkipSample(f"{modality}: {e}") from None
    labels: dict[str, float] = {}
    if "json" in files:
        try:
            record = json.loads(files["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SkipSample(f"bad json ({type(e).__name__}: {e})") from None
        if not isinstance(record, dict):
            raise SkipSample(f"bad json (a {type(record).__name__}, expected an object)")
        labels = rules.extract(record)
    return images, labels


class ShardStream(IterableDataset):
    """Shards -> :class:`ShardBatch` es; DataLoader workers split the shard list (worker i takes i::W)."""

    def __init__(self, shards: list[tuple[int, Path]], preps: dict[str, ImagePrep], batch_size: int,
                 rules: LabelRules) -> None:
        super().__init__()
        self.shards, self.preps, self.batch_size, self.rules = shards, preps, batch_size, rules

    def __iter__(self) -> Iterator[ShardBatch]:
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, path in self.shards[wid::workers]:
            yield from self.read_shard(index, path)

    def read_shard(self, index: int, path: Path) -> Iterator[ShardBatch]:
        from regtok.pipeline.manifests.manifest import sha256_file

        batch, read = ShardBatch(index), 0
        try:
            for sample in iter_shard(path):
                read += 1
                try:
                    images, labels = decode_sample(sample.files, self.preps, self.rules)
                except SkipSample as e:
                    batch.skipped.append({"key": sample.key, "reason": str(e)})
                    continue
                batch.keys.append(sample.key)
                batch.labels.append(labels)
                for m, img in images.items():
                    batch.images.setdefault(m, []).append(img)
                if len(batch.keys) == self.batch_size:
                    yield _stack(batch)
                    batch = ShardBatch(index)
        except ShardReadError as e:
            batch.error = f"unreadable shard: {e.reason} (kept the {e.samples_read} complete samples before it)"
        try:
            batch.sha256 = sha256_file(path)
        except OSError as e:
            batch.error = batch.error or f"unreadable shard: {e}"
        batch.done, batch.read = True, read
        yield _stack(batch)


def _stack(batch: ShardBatch) -> ShardBatch:
    batch.images = {m: torch.stack(imgs) for m, imgs in batch.images.items()}  # {m: (b, 3, H, W)}
    return batch


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
