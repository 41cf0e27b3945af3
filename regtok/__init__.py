"""regtok: FlexTok-style register tokens that align two modalities on cached frozen-encoder features.

Pure library code (model, losses, training, retrieval, probes). Importing this package must stay cheap:
no torch import here, so that `regtok --help` is instant.
"""

__version__ = "0.1.0"

# The Python API (pipeline/embed/api.py), imported on first use so that `import regtok` stays cheap.
__all__ = ["Embedder", "Run", "load_run", "open_store"]


def __getattr__(name: str):
    if name in __all__:
        from regtok.pipeline import embed

        return getattr(embed, name)
    raise AttributeError(f"module 'regtok' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
