"""Data in: `regtok synth` and `regtok pack` write WebDataset shards and their dataset manifest.

Reads: nothing (synth draws procedural surfaces, ``surfaces.py``), or a CSV of image paths and its image root
(pack). Writes: ``OUT/*.tar`` shards and ``OUT/dataset.json``.

- ``synth.py``: :func:`synthesize`, the embedded synthetic set; ``pack.py``: :func:`pack_csv`, a real paired set.
- ``shards.py``: the shard format, written deterministically and read robustly; extract and embed read shards
  through the names exported here.
"""

from regtok.pipeline import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "synth": ("synthesize", "check_args", "check_families"),
    "pack": ("pack_csv",),
    "shards": ("IMAGE_EXTS", "ShardReadError", "expand_shards", "iter_shard"),
})
