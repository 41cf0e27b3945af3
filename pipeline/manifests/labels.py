"""Label schemas: the ``labels`` block of dataset and features manifests, inferred in one place.

Each label is ``{"type": "continuous", "range": [lo, hi]}``, ``{"type": "categorical", "classes": [...]}`` (a
value is a class index) or ``{"type": "text"}`` (kept in the sample json, never a number); a generator that
knows its labels declares them instead (``pipeline.data.synth.declared_labels``). A label may also say which part of
the representation should hold it, ``"group"``: ``shared`` (both views depend on it) or a modality's name (one
view only); ``regtok eval`` reads leakage and complementarity from them (:func:`with_groups` sets them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FREE_TEXT_MIN_VALUES = 10  # a text column with more distinct values than this, and than half its cells, is text


def label_schema(columns: Mapping[str, Sequence[str] | np.ndarray], as_class: Sequence[str] = (),
                 as_text: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """The manifest's ``labels`` block implied by each label's values ``{name: values}``.

    A float array (NaN where absent, as a store holds labels) is continuous with the range of its finite values
    (null when there are none). Text cells ("" where absent, as a CSV holds labels): continuous with its range
    if every non-empty value is numeric, else categorical with its sorted distinct values as classes, unless it
    reads as free text (more distinct values than FREE_TEXT_MIN_VALUES and than half its non-empty cells): then
    ``text``, kept in the json as written. ``as_class`` columns are categorical and ``as_text`` columns text,
    whatever their values.
    """
    labels: dict[str, dict[str, Any]] = {}
    for col, values in columns.items():
        if isinstance(values, np.ndarray) and values.dtype.kind == "f":
            finite = values[np.isfinite(values)]
            labels[col] = {"type": "continuous",
                           "range": [float(finite.min()), float(finite.max())] if len(finite) else None}
            continue
        if col in as_text:
            labels[col] = {"type": "text"}
            continue
        values = [(v or "").strip() for v in values]
        present = [v for v in values if v]
        classes = sorted(set(present))
        if present and all(is_number(v) for v in present):
            nums = [float(v) for v in present]
            labels[col] = {"type": "continuous", "range": [min(nums), max(nums)]}
        elif col not in as_class and len(classes) > max(FREE_TEXT_MIN_VALUES, len(present) // 2):
            labels[col] = {"type": "text"}
        else:
            labels[col] = {"type": "categorical", "classes": classes}
    return labels


def class_list(classes: Sequence[str], shown: int = 5) -> str:
    """"30 classes: glass, metal, stone, wood, wool, …": a count and the first few, for a one-line message."""
    head = ", ".join(map(str, classes[:shown])) + (", …" if len(classes) > shown else "")
    return f"{len(classes)} class{'es' if len(classes) != 1 else ''}: {head}"


def class_difference(here: Sequence[str], there: Sequence[str]) -> str:
    """Where two class lists part: "30 classes here, 31 there; first difference at index 4: 'glass' here,
    'gold' there" (never the whole lists)."""
    i = next((i for i, (a, b) in enumerate(zip(here, there, strict=False)) if a != b), min(len(here), len(there)))
    show = lambda cs: repr(cs[i]) if i < len(cs) else "nothing"  # noqa: E731
    return (f"{len(here)} classes here, {len(there)} there; first difference at index {i}: {show(here)} here, "
            f"{show(there)} there")


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_groups(values: Sequence[str]) -> dict[str, str]:
    """``--label-group NAME=GROUP`` values → {name: group}; a malformed or repeated one is an error."""
    from regtok.errors import RegtokError

    out: dict[str, str] = {}
    for text in values:
        name, eq, group = text.partition("=")
        if not eq or not name.strip() or not group.strip():
            raise RegtokError(f"--label-group needs NAME=GROUP (GROUP: shared or a modality), got {text!r}")
        if name.strip() in out:
            raise RegtokError(f"--label-group names {name.strip()!r} twice")
        out[name.strip()] = group.strip()
    return out


def with_groups(schema: Mapping[str, dict[str, Any]], groups: Mapping[str, str],
                modalities: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``schema`` with each named label's ``group`` set: ``shared`` or one of ``modalities``; unknown labels and
    groups are errors that name what is allowed."""
    from regtok.errors import RegtokError

    allowed = ("shared", *modalities)
    out = {name: dict(spec) for name, spec in schema.items()}
    for name, group in groups.items():
        if name not in out:
            raise RegtokError(f"--label-group {name}={group}: no label {name!r} (labels: {', '.join(out) or 'none'})")
        if group not in allowed:
            raise RegtokError(f"--label-group {name}={group}: the group must be one of {', '.join(allowed)}")
        out[name]["group"] = group
    return out
