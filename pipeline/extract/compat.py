"""Whether a feature store fits what a run or another store expects: one check for train and eval."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from regtok.errors import RegtokError
from regtok.pipeline.manifests.labels import class_difference


def check_compatible(store: Any, kind: str, inputs: Mapping[str, Sequence[int]], *, what: str, expected_by: str,
                     ordered: bool = False, trained_on: dict | None = None) -> None:
    """RegtokError unless ``store`` holds ``kind`` features of the modalities in ``inputs`` with those shapes.

    ``inputs`` maps each modality to the ``(tokens, dim)`` of one row (as ``FeatureStore.shape`` gives it);
    ``what`` names the store and ``expected_by`` whose ``inputs`` they are, in the message. ``ordered``: the
    modalities must come in the same order. With ``trained_on`` (the features manifest a run was trained on),
    the encoder specs and class lists must be the ones that store had.
    """
    mods = tuple(inputs)
    if (mods != tuple(store.modalities)) if ordered else (set(mods) != set(store.modalities)):
        raise RegtokError(f"{what} holds modalities {list(store.modalities)}, {expected_by} has {list(mods)}")
    if not store.has(kind):
        raise RegtokError(f"{expected_by} uses {kind} features, {what} holds only "
                          f"{store.manifest.get('feature_kinds')}")
    for m in mods:
        expected, got = tuple(inputs[m]), tuple(store.shape(kind, m))
        if expected != got:
            raise RegtokError(f"the {m} {kind} features of {what} do not match: {got} (tokens, dim), {expected_by} "
                              f"expects {expected}")
    if trained_on is not None:
        _check_same_sources(store.manifest, trained_on, mods)


def _check_same_sources(manifest: dict, trained_on: dict, mods: tuple[str, ...]) -> None:
    """The same encoder spec per modality and the same class list per label (a class index names one class)."""
    for m in mods:
        spec_run = (trained_on.get("encoders") or {}).get(m, {}).get("spec")
        spec_eval = (manifest.get("encoders") or {}).get(m, {}).get("spec")
        if spec_run is not None and spec_run != spec_eval:
            raise RegtokError(f"{m} encoder differs: the run was trained on {spec_run!r}, these features are "
                              f"from {spec_eval!r}")
    for name, spec in (trained_on.get("labels") or {}).items():
        here = (manifest.get("labels") or {}).get(name) or {}
        if "classes" in spec and "classes" in here and spec["classes"] != here["classes"]:
            raise RegtokError(f"label {name!r} differs from the run's training store ("
                              f"{class_difference(here['classes'], spec['classes'])}); pack this split with "
                              "--labels-from TRAIN/dataset.json")
