"""regtok's data plumbing: shards, images, encoders, HDF5 feature stores and manifests, one folder per stage.

The stages, each folder named as the README names its commands::

    data/      synth, pack     shards and dataset.json
    extract/   extract         shards → a feature store
    train/     train           a feature store → a run
    sweep/     sweep, compare  many runs on one store, and runs side by side
    eval/      eval            a run and a held-out store → a report
    embed/     embed           a run applied to new data (and the Python API)
    lineage/   demo, show, verify, rerun   the whole pipeline and its records

and what they share: ``manifests/`` (manifests, label schemas, output directories), ``runtime/`` (console,
config files, process group, start-up, figures), ``encoders/`` (the frozen encoders). Each folder's ``__init__``
says what it reads and writes and exports its entry point; a stage imports another stage only through those
exports, and a shared folder imports no stage.

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
