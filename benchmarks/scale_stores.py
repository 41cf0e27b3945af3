"""Feature stores shaped like a Stage-1 encoder's output, with a planted cross-modal structure, for
``benchmarks/scale.py``: written part by part through the pipeline's own store writer
(:class:`regtok.pipeline.extract.store.PartWriter`, :func:`regtok.pipeline.extract.store.write_index`), as
``regtok extract`` writes them, so that no store is ever held in memory whole.

The plant: each row has ``SHARED`` latent factors that both modalities see (each through its own noise of std
``VIEW_NOISE``, so retrieval is possible but not perfect: about 0.4 R@1 among 1,000 rows for an oracle that knows the
factors) and ``PRIVATE`` factors each modality sees alone. Each factor adds a spatial pattern (over the T tokens) times
a channel direction (in a 48-dimensional subspace of the D channels, as a ViT's token features occupy a subspace of
their width) to a large per-modality mean token, and every element gets Gaussian noise. Pooled features are a linear
map of the same factors plus noise. The maps are fixed by ``MAP_SEED``: every store (training or test, any N) is
seen through the same two "encoders".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MODALITIES = ("vision", "tactile")
SHARED, PRIVATE, CHANNEL_RANK = 16, 16, 48
VIEW_NOISE = 0.6  # std of each modality's own noise on the shared factors (the factors have std 1)
ELEMENT_NOISE = 0.5  # std of the noise on every stored number
MAP_SEED = 1234
BLOCK = 50  # rows generated at a time (about 100 MB of float32 for ViT-L tokens, both modalities)


@dataclass
class Encoder:
    """One modality's fixed map from factors to features."""

    spatial: np.ndarray  # (J, T)
    channels: np.ndarray  # (J, D)
    mean: np.ndarray  # (T, D)
    pooled: np.ndarray  # (J, P)


def encoders(tokens: tuple[int, int], pooled_dim: int) -> dict[str, Encoder]:
    """The two modalities' maps, a pure function of ``MAP_SEED`` and the shapes."""
    t, d = tokens
    rng = np.random.default_rng(MAP_SEED)
    out = {}
    j = SHARED + PRIVATE
    strength = 1.0 / (1.0 + np.arange(j) / 8.0)  # factors of decreasing strength, as principal components decay
    for m in MODALITIES:
        basis = np.linalg.qr(rng.normal(size=(d, CHANNEL_RANK)))[0]  # (D, r) orthonormal
        channels = (rng.normal(size=(j, CHANNEL_RANK)) @ basis.T) * (strength[:, None] * 4.0 / np.sqrt(CHANNEL_RANK))
        common = rng.normal(size=d)  # the large direction every token shares (mean cosine near 1, as in real ViTs)
        mean = 3.0 * common[None, :] + 0.5 * rng.normal(size=(t, d))
        out[m] = Encoder(rng.normal(size=(j, t)).astype(np.float32), channels.astype(np.float32),
                         mean.astype(np.float32), (rng.normal(size=(j, pooled_dim)) * strength[:, None])
                         .astype(np.float32))
    return out


def factor_rows(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The shared factors (n, SHARED) and each modality's view of all its factors (n, SHARED + PRIVATE)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, SHARED))
    views = {m: np.concatenate([z + VIEW_NOISE * rng.normal(size=z.shape), rng.normal(size=(n, PRIVATE))], 1)
             for m in MODALITIES}
    return z, views


def features(enc: Encoder, view: np.ndarray, rng: np.random.Generator, tokens: bool) -> dict[str, np.ndarray]:
    """Pooled (b, P) and, with ``tokens``, token (b, T, D) float16 features of one block of factor rows."""
    v = view.astype(np.float32)
    pooled = v @ enc.pooled + ELEMENT_NOISE * rng.standard_normal((len(v), enc.pooled.shape[1]), dtype=np.float32)
    out = {"pooled": pooled.astype(np.float16)}
    if tokens:
        weights = v[:, :, None] * enc.spatial[None]  # (b, J, T)
        x = np.einsum("bjt,jd->btd", weights, enc.channels, optimize=True)  # (b, T, D)
        x += enc.mean
        x += ELEMENT_NOISE * rng.standard_normal(x.shape, dtype=np.float32)
        out["tokens"] = x.astype(np.float16)
    return out


def labels(z: np.ndarray, views: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A shared class (deciles of the first shared factor) and one continuous factor of vision alone."""
    material = np.searchsorted(np.quantile(z[:, 0], np.linspace(0, 1, 11)[1:-1]), z[:, 0]).astype(np.float64)
    return {"material": material, "albedo": views["vision"][:, SHARED].astype(np.float64)}


SCHEMA = {"material": {"type": "categorical", "classes": [f"c{i}" for i in range(10)], "group": "shared"},
          "albedo": {"type": "continuous", "group": "vision"}}


def write_part(path: Path, n: int, seed: int, key_prefix: str, tokens: tuple[int, int] | None,
               pooled_dim: int) -> dict:
    """One part of ``n`` rows (factors from ``seed``), written block by block; its manifest record."""
    from regtok.pipeline.extract.store import PartWriter
    from regtok.pipeline.manifests.manifest import sha256_file

    encs = encoders(tokens or (1, CHANNEL_RANK), pooled_dim)  # no token maps: any width the basis fits
    shapes = {m: {"pooled": (pooled_dim,), **({"tokens": tokens} if tokens else {})} for m in MODALITIES}
    z, views = factor_rows(n, seed)
    lab = labels(z, views)
    rng = np.random.default_rng(seed + 1)
    writer = PartWriter(path, shapes)
    try:
        for lo in range(0, n, BLOCK):
            hi = min(n, lo + BLOCK)
            feats = {m: features(encs[m], views[m][lo:hi], rng, tokens is not None) for m in MODALITIES}
            writer.append([f"{key_prefix}{i:07d}" for i in range(lo, hi)], feats,
                          [{k: float(v[i]) for k, v in lab.items()} for i in range(lo, hi)])
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"path": str(path), "shard": f"{path.stem}.tar", "samples": n, "bytes": path.stat().st_size,
            "sha256": sha256_file(path)}


def write_store(root: Path, parts: list[dict], tokens: tuple[int, int] | None, pooled_dim: int) -> Path:
    """A feature store at ``root`` over already written ``parts`` (records from :func:`write_part`, anywhere: the
    index and the manifest name them relative to ``root``), with its features manifest."""
    from regtok.pipeline.extract.store import write_index
    from regtok.pipeline.manifests.manifest import new_manifest, write_manifest

    root.mkdir(parents=True, exist_ok=True)
    rel = [{**p, "path": os.path.relpath(p["path"], root)} for p in parts]
    shapes = {m: {"pooled": (pooled_dim,), **({"tokens": tokens} if tokens else {})} for m in MODALITIES}
    n = write_index(root, [p["path"] for p in rel], shapes, sorted(SCHEMA))
    encoder = {"spec": "bench:planted", "pooled_dim": pooled_dim, "token_shape": list(tokens) if tokens else None,
               "weights_sha256": None}
    write_manifest(root / "manifest.json", new_manifest(
        "features", command=["benchmarks/scale.py"], modalities=list(MODALITIES),
        encoders={m: dict(encoder) for m in MODALITIES}, feature_kinds=["pooled", "tokens"] if tokens else ["pooled"],
        samples=n, skipped=[], parts=rel, labels=SCHEMA))
    return root


def parts_for(folder: Path, name: str, n: int, part_rows: int, seed: int, tokens: tuple[int, int] | None,
              pooled_dim: int, log=print) -> list[dict]:
    """``n`` rows as parts of ``part_rows`` in ``folder`` (reused when already there); their records.

    Part i's factors come from ``seed + i``, so a store over the first k parts is the first rows of a larger one.
    """
    records = []
    for i, lo in enumerate(range(0, n, part_rows)):
        path = folder / f"{name}-{i:04d}.h5"
        rows = min(part_rows, n - lo)
        if path.is_file():
            records.append({"path": str(path), "shard": f"{path.stem}.tar", "samples": rows,
                            "bytes": path.stat().st_size, "sha256": None})
            continue
        log(f"writing {path.name} ({rows} rows)")
        records.append(write_part(path, rows, seed + 1000 * i, f"{name}-{i:04d}-", tokens, pooled_dim))
    return records
