"""What each part of the register set holds: probes of the register groups and reconstruction against references.

A register group at prefix k is a set of whole registers, **concatenated** (never averaged: different registers
carry different channels, so a mean mixes them): ``shared`` = registers [0, min(k, n_shared)), ``private`` =
[n_shared, k) (empty for k <= n_shared), ``all`` = [0, k). Probes are ridge regressions fitted on the run's
*training* rows and scored on the evaluated split (:func:`regtok.probes.fit_probes`), beside the same probe on the
raw input features (standardised, PCA-reduced on the training rows), the reference a part is read against.

Labels say which part should hold them (``group`` in the store's label schema): ``shared`` (both views depend on
it, e.g. the material) or a modality's name (one view only, e.g. the albedo of a photo). Two numbers summarise the
split, per modality m over the labels that belong to m alone and that the raw features decode:

- leakage = Σ max(0, score from the shared part) / Σ score from the raw features, at k = n_shared;
- complementarity = the same from the private part, at k = n_registers.

A score is R² for a continuous label and (accuracy − chance) / (1 − chance) for a categorical one, so 0 is a
constant predictor and 1 a perfect one. Leakage near 0 and complementarity near 1 is the split the method promises.
Pure functions of tensors; no files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from regtok.probes import LABEL_TYPES, ProbeResult, fit_probes

GROUPS = ("shared", "private", "all")
MIN_RAW_SCORE = 0.05  # a label the raw features decode below this is left out of leakage and complementarity


def group_columns(group: str, k: int, n_shared: int, width: int) -> slice | None:
    """The columns of a group at prefix k in the concatenated registers (B, R·width); None when it is empty."""
    lo, hi = {"shared": (0, min(k, n_shared)), "private": (n_shared, k), "all": (0, k)}[group]
    return slice(lo * width, hi * width) if hi > lo else None


def probe_plan(ks: Sequence[int], n_shared: int) -> list[tuple[str, int]]:
    """The (group, k) cells worth a probe: shared up to k = n_shared (it stops growing there), private beyond it,
    and all beyond it (all equals shared up to there)."""
    cells = [("shared", k) for k in ks if k <= n_shared]
    if n_shared not in ks and any(k > n_shared for k in ks):
        cells.append(("shared", n_shared))
    cells += [(g, k) for g in ("private", "all") for k in ks if k > n_shared]
    return cells


def label_targets(labels: Mapping[str, Tensor], rows_fit: Tensor | None, labels_test: Mapping[str, Tensor],
                  schema: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, tuple], list[str]]:
    """{name: (y_fit, y_test, kind, n_classes)} of the probe-able labels, and notes on those skipped."""
    targets, notes = {}, []
    for name, col in labels.items():
        kind = schema.get(name, {}).get("type")
        if kind not in LABEL_TYPES:
            notes.append(f"label {name!r} skipped: type {kind!r} is not one of {LABEL_TYPES}")
            continue
        if name not in labels_test:
            notes.append(f"label {name!r} skipped: the evaluated split does not have it")
            continue
        classes = schema[name].get("classes")
        y_fit = col if rows_fit is None else col[rows_fit]
        targets[name] = (y_fit, labels_test[name], kind, len(classes) if classes else None)
    return targets, notes


def probe_rows(fit: Mapping[str, Tensor], test: Mapping[str, Tensor], targets: dict[str, tuple],
               plan: Sequence[tuple[str, int]], n_shared: int, width: int, raw: Mapping[str, tuple[Tensor, Tensor]],
               seed: int, val_fraction: float, log: Any = None) -> list[dict[str, Any]]:
    """Every probe: per modality, the raw features (group "raw", k None) and each (group, k) of ``plan``.

    fit, test: {modality: (N, R·width) concatenated registers}; raw: {modality: (fit (N, F), test (M, F))}.
    """
    rows: list[dict[str, Any]] = []
    for m in fit:
        cells: list[tuple[str, int | None, Tensor, Tensor]] = [("raw", None, *raw[m])]
        for group, k in plan:
            cols = group_columns(group, k, n_shared, width)
            cells.append((group, k, fit[m][:, cols], test[m][:, cols]))
        for group, k, x_fit, x_test in cells:
            if log is not None:
                log(f"probes {m} {group}" + (f" k={k}" if k is not None else ""))
            results = fit_probes(x_fit, x_test, targets, seed, val_fraction)
            rows += [_probe_row(m, group, k, name, targets[name][2], r) for name, r in results.items()]
    return rows


def _probe_row(m: str, group: str, k: int | None, name: str, kind: str, r: ProbeResult | None) -> dict[str, Any]:
    row: dict[str, Any] = {"k": k, "modality": m, "group": group, "label": name,
                           "metric": "accuracy" if kind == "categorical" else "r2", "value": None}
    if r is not None:
        row.update(value=r.value, chance=r.chance, alpha=r.alpha, n_train=r.n_train, n_test=r.n_test)
    return row


def normalised(row: Mapping[str, Any]) -> float | None:
    """A probe's score on a common scale: R², or (accuracy − chance) / (1 − chance); None when absent."""
    if row.get("value") is None:
        return None
    if row["metric"] == "r2":
        return row["value"]
    chance = row.get("chance") or 0.0
    return (row["value"] - chance) / (1 - chance) if chance < 1 else 0.0


def part_summary(probes: Sequence[Mapping[str, Any]], schema: Mapping[str, Mapping[str, Any]],
                 modalities: Sequence[str], n_shared: int, n_registers: int) -> dict[str, Any]:
    """Leakage and complementarity per modality (see the module docstring), and what the shared part keeps of
    the shared labels, each with the labels it was computed over."""
    cell = {(p["modality"], p["group"], p["k"], p["label"]): p for p in probes}
    out: dict[str, Any] = {"k_shared": n_shared, "k_private": n_registers, "min_raw_score": MIN_RAW_SCORE,
                           "leakage": {}, "complementarity": {}, "shared_kept": {}, "labels": {}}
    for m in modalities:
        own = [name for name, s in schema.items() if s.get("group") == m]
        shared = [name for name, s in schema.items() if s.get("group") == "shared"]
        for key, names, group, k in (("leakage", own, "shared", n_shared),
                                     ("complementarity", own, "private", n_registers),
                                     ("shared_kept", shared, "shared", n_shared)):
            ratio, used = _ratio(cell, m, names, group, k)
            out[key][m] = ratio
            out["labels"].setdefault(m, {})[key] = used
    return out


def _ratio(cell: Mapping[tuple, Mapping[str, Any]], m: str, names: Sequence[str], group: str,
           k: int) -> tuple[float | None, list[str]]:
    """Σ max(0, part score) / Σ raw score over ``names`` the raw features decode; None when there are none."""
    num = den = 0.0
    used = []
    for name in names:
        raw = normalised(cell.get((m, "raw", None, name), {}))
        part = normalised(cell.get((m, group, k, name), {}))
        if raw is None or part is None or raw < MIN_RAW_SCORE:
            continue
        num, den = num + max(0.0, part), den + raw
        used.append(name)
    return (num / den if den > 0 else None), used


def cosine(recon: Tensor, target: Tensor) -> Tensor:
    """Per-sample cosine between (B, T, D) reconstructions and targets, averaged over positions. (B,) float64.

    The per-position sums are taken in the inputs' precision and divided in float64: at ViT-L-14's 257 × 1024
    a float64 copy of both inputs cost 5x the time and 4 GB per batch, for a difference below 1e-7."""
    dot = torch.linalg.vecdot(recon.float(), target.float()).double()  # (B, T)
    norms = torch.linalg.vector_norm(recon.float(), dim=-1).double() * torch.linalg.vector_norm(target.float(), dim=-1)
    return (dot / norms.clamp_min(1e-8)).mean(1)
