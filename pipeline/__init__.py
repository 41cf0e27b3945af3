"""regtok's data plumbing: shards, images, encoders, HDF5 feature stores and manifests, one folder per stage.

Importing this package, or any of its folders, must stay cheap (no torch), so that `regtok --help` is instant:
a folder's ``__init__`` names its exports and imports each from its module on first use (:func:`lazy_exports`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]) -> tuple[Callable, Callable, list[str]]:
    """``__getattr__``, ``__dir__`` and ``__all__`` for the folder ``package``: ``exports`` maps each of its modules
    to the names it exports, and each name is imported from its module when it is first asked for."""
    home = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str):
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{home[name]}"), name)

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *home})

    return __getattr__, __dir__, sorted(home)
