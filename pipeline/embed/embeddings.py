"""embeddings.h5: shared embeddings per prefix k, as `regtok eval --save-embeddings` and `regtok embed`
(:func:`embed_shards`) write them.

    /keys                 (N,) sample keys in row order
    /<modality>/k<k>      (N, E) float32 L2-normalised shared embeddings at prefix k
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from regtok.errors import RegtokError


class EmbeddingWriter:
    """Receives (modality, k, (N, E)) from evaluate and writes embeddings.h5 under a temporary name."""

    def __init__(self, path: Path, keys: list[str]) -> None:
        import h5py

        self.path, self.tmp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = h5py.File(self.tmp, "w")
        self.file.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))

    def __call__(self, modality: str, k: int, emb: np.ndarray) -> None:
        self.file.create_dataset(f"{modality}/k{k}", data=np.asarray(emb, dtype=np.float32))

    def close(self) -> Path:
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path


def embed_shards(run_dir: str | os.PathLike, shards: str, out: str | os.PathLike, *, batch_size: int = 64,
                 device: str = "auto", workers: int | str = "auto", console: Any = None, show_progress: bool = True,
                 modalities: Sequence[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """`regtok embed`: new shards → the run's encoders → its shared embeddings at every shared prefix, in ``out``
    (``/keys``, ``/<modality>/k<k>`` (N, E) float32, as ``regtok eval --save-embeddings`` writes them).

    ``modalities``: which of the run's modalities to embed (default: those the shards' first sample holds, so
    touch-only query images embed their touch alone). The shards go through ``regtok extract`` (same decoding,
    skip rules and float16 features) into a temporary store beside ``out``, which is removed afterwards. An
    existing ``out`` is replaced only with ``overwrite``. Returns {"samples", "skipped", "prefixes", "modalities",
    "path"}.
    """
    import shutil

    from regtok.model import allowed_keeps
    from regtok.pipeline.embed.api import check_weights, load_run, open_store, training_encoders
    from regtok.pipeline.extract import ExtractConfig, run_extract
    from regtok.pipeline.manifests.outdir import claim_file

    out = Path(out).absolute()
    claim_file(out, "embed", overwrite)
    run = load_run(run_dir, "cpu")
    spec = "::".join(str(Path(part).absolute()) for part in shards.split("::"))
    chosen = _embed_modalities(run, spec, modalities)
    records = {m: rec for m, rec in training_encoders(run).items() if m in chosen}
    encoders = tuple((m, rec["spec"]) for m, rec in records.items())
    tmp = out.with_name(f".{out.name}.store.{os.getpid()}.tmp")
    try:
        cfg = ExtractConfig(shards=spec, out=str(tmp), encoders=encoders, tokens=run.feature_kind == "tokens",
                            batch_size=batch_size, workers=workers, device=device, max_skip_fraction=1.0)
        _, manifest = run_extract(cfg, command=["regtok", "embed"], console=console, show_progress=show_progress)
        for m, rec in manifest["encoders"].items():
            check_weights(m, records[m], rec.get("weights_sha256"))
        store = open_store(tmp)
        ks = allowed_keeps(run.n_shared, "power_of_two")  # the shared prefixes eval's retrieval reports
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = EmbeddingWriter(out, store.keys())
        for m in records:
            x = store.read(run.feature_kind, m)
            for k in ks:
                writer(m, k, run.embed(x, m, k))
        writer.file.attrs["run"] = str(run.path.absolute())
        writer.file.attrs["run_step"] = run.step
        writer.file.attrs["shards"] = spec
        writer.close()
        return {"samples": store.n, "skipped": manifest["skip_count"], "prefixes": ks, "modalities": list(records),
                "path": out}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _embed_modalities(run: Any, spec: str, asked: Sequence[str] | None) -> list[str]:
    """The run's modalities to embed: ``asked``, else those whose image the shards' first sample holds."""
    from regtok.pipeline.data import IMAGE_EXTS, expand_shards, iter_shard

    if asked:
        unknown = [m for m in asked if m not in run.modalities]
        if unknown:
            raise RegtokError(f"the run has modalities {', '.join(run.modalities)}, not {unknown[0]!r}")
        return [m for m in run.modalities if m in asked]
    paths = expand_shards(spec)
    first = next(iter_shard(paths[0]), None) if paths else None
    if first is None:
        return list(run.modalities)  # extract says what is wrong with the shards
    found = [m for m in run.modalities if any(f"{m}.{ext}" in first.files for ext in IMAGE_EXTS)]
    if not found:
        raise RegtokError(f"the shards' first sample ({first.key}: {', '.join(sorted(first.files))}) holds none of "
                          f"the run's modalities ({', '.join(run.modalities)})")
    return found
