"""Stage 1, `regtok extract`: frozen encoders over WebDataset shards into an HDF5 feature store.

Reads: shards (data/) or their ``dataset.json``; the encoders named by specs (encoders/). Writes: ``STORE/parts/``
(one ``.h5`` part and one completion record per shard), ``STORE/features.h5`` (an index over the parts) and
``STORE/manifest.json``.

- ``stage.py``: :func:`run_extract`, the entry point; ``config.py``: :class:`ExtractConfig` (no torch).
- ``samples.py``: shards → batches of uint8 images in DataLoader workers; ``part_records.py``: the completion
  records that let a rerun skip finished shards.
- ``store.py``: the feature store's format, written here and read by train, eval, sweep and embed through
  :func:`open_store`; ``compat.py``: whether a store fits what a run or another store expects.
"""

from regtok.pipeline import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "stage": ("run_extract", "SkipLimitError"),
    "config": ("ExtractConfig",),
    "store": ("FeatureStore", "open_store", "virtual_sources"),
    "compat": ("check_compatible",),
})
