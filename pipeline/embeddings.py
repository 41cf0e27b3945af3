"""embeddings.h5: shared embeddings per prefix k, as `regtok eval --save-embeddings` and `regtok embed` write them.

    /keys                 (N,) sample keys in row order
    /<modality>/k<k>      (N, E) float32 L2-normalised shared embeddings at prefix k
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


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
