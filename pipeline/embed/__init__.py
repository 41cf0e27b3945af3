"""A trained run applied to new data: the Python API (``regtok.load_run``, ``open_store``, ``Embedder``) and
`regtok embed`.

Reads: a run directory (train/), the training store's manifest it names (for the encoder specs and weights
hashes), and a feature store or new images / shards. Writes: ``EMB.h5`` (`regtok embed`; the format
``regtok eval --save-embeddings`` writes too); the API writes nothing.

- ``api.py``: :class:`Run`, :func:`load_run`, :func:`open_store`, :class:`Embedder`, what ``regtok`` exports.
- ``embeddings.py``: :func:`embed_shards`, the entry point of `regtok embed`, and the ``embeddings.h5`` writer.
"""

from regtok.pipeline import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "api": ("Embedder", "Run", "load_run", "open_store"),
    "embeddings": ("EmbeddingWriter", "embed_shards"),
})
