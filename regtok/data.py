"""Training batches from a cached feature store, drawn without per-sample reads.

The whole store (every modality of the chosen feature kind) is read once, in large contiguous reads, into
device memory as float16; each epoch draws batches from a seeded random permutation made on the device. A store
larger than the caller's memory budget (``pipeline.runtime.distributed.memory_budget``) is streamed instead: each chunk
of the same permutation is read with one sorted read per modality, the next chunk in a thread while the steps of
this one run (two chunks in memory at most). Under DDP each rank takes its slice of every global batch.

The store is any object with ``modalities``, ``n``, ``shape(kind, modality)`` and ``read(kind, modality, rows)``
(``pipeline.extract.store.FeatureStore``); nothing here knows the file format.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

READ_CHUNK_BYTES = 256 << 20  # one contiguous read from the store
STREAM_CHUNK_BATCHES = 64  # global batches per sorted read when streaming, at most STREAM_CHUNK_BYTES of them
STREAM_CHUNK_BYTES = 256 << 20  # float16 bytes (every modality) of one sorted read when streaming
ALL_BATCH_BYTES = 64 << 20  # float32 bytes (per modality) of one batch of Batches.all: 1,024 rows up to ViT-L's


class StoreLike(Protocol):
    modalities: tuple[str, ...]
    n: int

    def shape(self, kind: str, modality: str) -> tuple[int, int]: ...
    def read(self, kind: str, modality: str, rows: Any = None) -> np.ndarray: ...


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``parts`` (e.g. ``"perm", epoch``)."""
    text = "/".join(str(p) for p in (seed, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def epoch_permutation(n: int, seed: int, epoch: int, device: torch.device) -> Tensor:
    """The order of the ``n`` training rows in ``epoch``: a pure function of (seed, epoch), made on ``device``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(seed, "perm", epoch))
    return torch.randperm(n, generator=g, device=device)  # (n,)


def split_rows(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of ``range(n)``; both parts sorted. ``val_fraction`` 0 → no validation."""
    n_val = int(round(n * val_fraction)) if val_fraction > 0 else 0
    n_val = min(max(n_val, 2 if val_fraction > 0 else 0), n - 1)
    order = np.random.default_rng(derive_seed(seed, "split")).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def rows_digest(rows: np.ndarray) -> str:
    """A short fingerprint of a set of store rows (sha256 of the sorted int64 indices, 16 hex digits): two runs
    validated on the same rows exactly when their digests match."""
    data = np.sort(np.asarray(rows, dtype=np.int64)).astype("<i8").tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def store_bytes(store: StoreLike, kind: str, rows: int | None = None) -> int:
    """Bytes the float16 arrays of ``kind`` take for ``rows`` rows (default: all)."""
    per_row = sum(int(np.prod(row_shape(kind, *store.shape(kind, m)))) for m in store.modalities) * 2
    return per_row * (store.n if rows is None else rows)


def read_to_device(store: StoreLike, kind: str, modality: str, device: torch.device) -> Tensor:
    """The whole ``(n, D)`` or ``(n, T, D)`` array of one modality, as float16 on ``device``, in large reads."""
    shape = (store.n, *row_shape(kind, *store.shape(kind, modality)))
    out = torch.empty(shape, dtype=torch.float16, device=device)
    step = max(1, READ_CHUNK_BYTES // max(1, 2 * int(np.prod(shape[1:]))))
    for start in range(0, store.n, step):
        stop = min(store.n, start + step)
        block = np.ascontiguousarray(store.read(kind, modality, slice(start, stop)), dtype=np.float16)
        out[start:stop].copy_(torch.from_numpy(block), non_blocking=False)
    return out


@dataclass
class Batches:
    """Seeded batches of the rows ``rows`` of a store, for one rank.

    ``batch_size`` is the global batch (all ranks together); each rank yields ``batch_size // world_size`` rows
    of every global batch. The last incomplete global batch of an epoch is dropped, so every step has the same
    shape. ``arrays`` holds the whole store in device memory; ``None`` means streaming from ``store``.
    """

    store: StoreLike
    kind: str
    rows: np.ndarray  # (N,) store rows this split uses
    batch_size: int
    seed: int
    device: torch.device
    arrays: dict[str, Tensor] | None
    rank: int = 0
    world_size: int = 1

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.store.modalities)

    @property
    def streaming(self) -> bool:
        return self.arrays is None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows) // self.batch_size

    @property
    def row_numbers(self) -> int:
        """Numbers in one row of every modality (T·D each for tokens, D for pooled)."""
        return sum(int(np.prod(row_shape(self.kind, *self.store.shape(self.kind, m)))) for m in self.modalities)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Tensor]]:
        """The batches of ``epoch`` from its ``start_step``-th on: ``{modality: (B_rank, …) float32}``."""
        perm_device = self.device if self.arrays is not None else torch.device("cpu")
        perm = epoch_permutation(len(self.rows), self.seed, epoch, perm_device)  # (N,)
        local = self.batch_size // self.world_size
        lo, hi = self.rank * local, (self.rank + 1) * local
        if self.arrays is not None:
            rows = torch.as_tensor(self.rows, device=self.device)[perm]  # (N,)
            for step in range(start_step, self.steps_per_epoch):
                idx = rows[step * self.batch_size + lo: step * self.batch_size + hi]  # (B_rank,)
                yield {m: a[idx].float() for m, a in self.arrays.items()}
            return
        rows = self.rows[perm.numpy()]
        per_read = max(1, min(STREAM_CHUNK_BATCHES, STREAM_CHUNK_BYTES // (2 * self.row_numbers * self.batch_size)))
        firsts = list(range(start_step, self.steps_per_epoch, per_read))

        def read(first: int) -> dict[str, Tensor]:  # the rows of steps first … first + per_read - 1, in step order
            steps = range(first, min(self.steps_per_epoch, first + per_read))
            chunk = np.stack([rows[s * self.batch_size + lo: s * self.batch_size + hi] for s in steps])
            return self._read_sorted(chunk.reshape(-1))

        # The next chunk is read in a thread while the steps of this one run (the read is I/O and copies, which
        # leave the interpreter free); on 2 cores its copies still take 7-13 % of a ViT-L-14 step (README).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="regtok-read") as pool:
            pending = pool.submit(read, firsts[0]) if firsts else None
            for i, first in enumerate(firsts):
                arrays = pending.result()
                pending = pool.submit(read, firsts[i + 1]) if i + 1 < len(firsts) else None
                for j in range(min(per_read, self.steps_per_epoch - first)):
                    yield {m: a[j * local:(j + 1) * local].float() for m, a in arrays.items()}

    def all(self, batch_size: int | None = None) -> Iterator[dict[str, Tensor]]:
        """Every row once, in order (for validation), float32 on the device; by default 1,024 rows a batch, fewer
        when a modality's batch would exceed ALL_BATCH_BYTES (63 rows of ViT-L-14 tokens)."""
        if batch_size is None:
            widest = max(int(np.prod(row_shape(self.kind, *self.store.shape(self.kind, m)))) for m in self.modalities)
            batch_size = max(1, min(1024, ALL_BATCH_BYTES // (4 * widest)))
        for start in range(0, len(self.rows), batch_size):
            idx = self.rows[start:start + batch_size]
            if self.arrays is not None:
                t = torch.as_tensor(idx, device=self.device)
                yield {m: a[t].float() for m, a in self.arrays.items()}
            else:
                yield {m: a.float() for m, a in self._read_sorted(idx).items()}

    def _read_sorted(self, rows: np.ndarray) -> dict[str, Tensor]:
        """Rows in the given order, read from the store with one sorted read per modality."""
        uniq, inverse = np.unique(rows, return_inverse=True)
        out = {}
        for m in self.modalities:
            block = torch.from_numpy(np.ascontiguousarray(self.store.read(self.kind, m, uniq), dtype=np.float16))
            out[m] = block[torch.from_numpy(inverse)].to(self.device, non_blocking=True)
        return out


def make_batches(store: StoreLike, kind: str, rows: np.ndarray, batch_size: int, seed: int, device: torch.device,
                 memory_budget: int | None = None, rank: int = 0, world_size: int = 1,
                 arrays: dict[str, Tensor] | None = None) -> Batches:
    """Batches of ``rows``; reads the whole store into ``device`` memory unless it takes more than
    ``memory_budget`` bytes (then streams; ``None``: no limit).

    Pass ``arrays`` from an earlier call to share one in-memory copy between train and validation splits.
    The effective global batch is ``min(batch_size, len(rows))`` rounded down to a multiple of ``world_size``.
    """
    batch_size = min(batch_size, len(rows)) // world_size * world_size
    if batch_size < 1:
        raise ValueError(f"{len(rows)} rows cannot make a batch for {world_size} rank(s)")
    if arrays is None and fits_in_memory(store, kind, memory_budget):
        arrays = {m: read_to_device(store, kind, m, device) for m in store.modalities}
    return Batches(store, kind, np.asarray(rows, dtype=np.int64), batch_size, seed, device, arrays, rank, world_size)


def fits_in_memory(store: StoreLike, kind: str, memory_budget: int | None) -> bool:
    """Whether the store's ``kind`` arrays fit in ``memory_budget`` bytes (``None``: no limit)."""
    return memory_budget is None or store_bytes(store, kind) <= memory_budget


def row_shape(kind: str, n_tokens: int, dim: int) -> tuple[int, ...]:
    """One row of ``kind`` features: ``(D,)`` pooled, ``(T, D)`` tokens (``store.shape`` gives ``(T, D)`` for both,
    ``T`` = 1 for pooled)."""
    return (dim,) if kind == "pooled" else (n_tokens, dim)


@torch.no_grad()
def feature_stats(batches: Iterator[dict[str, Tensor]]) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-dimension mean and std of each modality's features over all rows (and tokens): ``{m: ((D,), (D,))}``.

    Accumulated in float64 in one pass, so a streamed store gives the same statistics as an in-memory one.
    """
    sums: dict[str, tuple[Any, Any, int]] = {}
    for batch in batches:
        for m, x in batch.items():
            x = x.reshape(-1, x.shape[-1]).double()  # (B*T, D)
            s1, s2, n = sums.get(m, (0.0, 0.0, 0))
            sums[m] = (s1 + x.sum(0), s2 + (x * x).sum(0), n + x.shape[0])
    return {m: ((s1 / n).float(), (s2 / n - (s1 / n) ** 2).clamp_min(0).sqrt().float())
            for m, (s1, s2, n) in sums.items()}


class RowView:
    """One modality's features at given rows of a :class:`Batches`, read lazily: ``view[a:b]`` → (b, …) float32 on
    the device. Nothing is copied until sliced, so a sample of 20,000 ViT-L token rows costs a chunk at a time."""

    def __init__(self, data: Batches, modality: str, rows: np.ndarray) -> None:
        self.data, self.modality, self.rows = data, modality, rows
        self.shape = (len(rows), *row_shape(data.kind, *data.store.shape(data.kind, modality)))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx: Any) -> Tensor:
        rows = np.atleast_1d(self.rows[idx])
        if self.data.arrays is not None:
            return self.data.arrays[self.modality][torch.as_tensor(rows, device=self.data.device)].float()
        uniq, inverse = np.unique(rows, return_inverse=True)
        block = np.ascontiguousarray(self.data.store.read(self.data.kind, self.modality, uniq), dtype=np.float32)
        return torch.from_numpy(block)[torch.from_numpy(inverse)].to(self.data.device)


def sample_rows(data: Batches, max_rows: int, seed: int) -> dict[str, RowView]:
    """A seeded subset of at most ``max_rows`` of ``data``'s rows, in store order: ``{modality: RowView}`` (lazy)."""
    rows = data.rows
    if len(rows) > max_rows:
        pick = np.random.default_rng(derive_seed(seed, "init-rows")).choice(len(rows), max_rows, replace=False)
        rows = rows[np.sort(pick)]
    return {m: RowView(data, m, rows) for m in data.modalities}
