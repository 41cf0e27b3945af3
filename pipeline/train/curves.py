"""``curves.png``, the figure a person reads from a run's metrics: every loss term and validation R@1 against epoch.

It needs matplotlib (``pip install 'regtok[plot]'``); without it :func:`plot_curves` returns None and writes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regtok.pipeline.runtime.figures import DPI, pyplot


def plot_curves(records: list[dict[str, Any]], path: Path, kept_epoch: int | None = None,
                modalities: Sequence[str] = ("A", "B"), model_cfg: dict[str, Any] | None = None,
                kept_label: str = "best") -> Path | None:
    """curves.png from metrics.jsonl records (epochs counted from 1, 0 = before training): every loss term (epoch
    means, and each logged step faint) and validation R@1 (%) against epoch, the epoch whose weights were kept
    marked. A term whose weight in ``model_cfg`` is 0 is drawn dotted and grey and named as not in the loss."""
    epochs = [r for r in records if r.get("type") == "epoch"]
    if not epochs:
        return None
    plt = pyplot()
    if plt is None:
        return None
    weights = loss_weights(model_cfg or {})
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10.5, 3.9))
    for i, term in enumerate(_terms(epochs[-1])):
        _loss_line(ax_loss, records, epochs, term, f"C{i % 10}", weights.get(term))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss terms: epoch means, every logged step faint")
    ax_loss.legend(fontsize=7, frameon=False)
    _validation_panel(ax_val, [r for r in records if r.get("type") in ("start", "epoch")], kept_epoch, modalities,
                      kept_label)
    for ax in (ax_loss, ax_val):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _terms(record: dict[str, Any]) -> list[str]:
    return [k for k in record if k == "loss" or ("/" not in k and k not in _NOT_LOSS and not k.startswith("val"))]


def _loss_line(ax: Any, records: list[dict[str, Any]], epochs: list[dict[str, Any]], term: str, colour: str,
               weight: float | None) -> None:
    """One loss term: each logged step faint (at its fraction of the epochs), the epoch means marked at the
    middle of their epoch; a term of weight 0 dotted grey."""
    per_epoch = epochs[-1]["step"] / epochs[-1]["epoch"]
    unused = weight == 0
    colour = "black" if term == "loss" else ("0.6" if unused else colour)
    steps = [r for r in records if r.get("type") == "step" and _finite(r.get(term))]
    if steps:
        ax.plot([r["step"] / per_epoch for r in steps], [r[term] for r in steps], color=colour, alpha=0.3, lw=0.9)
    means = [(r["epoch"] - 0.5, r[term]) for r in epochs if _finite(r.get(term))]  # a mean over the epoch
    if means:
        label = term + (" (total)" if term == "loss" else " (weight 0: not in the loss)" if unused
                        else f" (×{weight:g} in the loss)" if weight is not None and weight != 1 else "")
        ax.plot(*zip(*means, strict=True), color=colour, marker="o", ms=4, lw=2.0 if term == "loss" else 1.4,
                ls=":" if unused else "-", label=label)


def loss_weights(model_cfg: dict[str, Any]) -> dict[str, float]:
    """Each logged loss term's factor in the total, from the model config (``regtok.losses.total_loss``); terms
    not listed enter with factor 1 or are diagnostics."""
    if not model_cfg:
        return {}
    loss_type = model_cfg.get("loss_type", "contrastive")
    flow = model_cfg.get("flow_weight", 1.0) if loss_type == "combined" else 1.0
    out = {"preservation": model_cfg.get("preservation_weight", 1.0),
           "agreement": model_cfg.get("agreement_weight", 0.0)}
    if loss_type in ("flow_matching", "combined"):
        out.update(flow=flow, variance=flow * model_cfg.get("flow_var_weight", 0.0),
                   covariance=flow * model_cfg.get("flow_cov_weight", 0.0),
                   uniformity=flow * model_cfg.get("flow_uniformity_weight", 0.0))
    return out


def _validation_panel(ax: Any, records: list[dict[str, Any]], kept_epoch: int | None,
                      modalities: Sequence[str], kept_label: str = "best") -> None:
    """Validation R@1 (%) per prefix and direction after each epoch; coinciding lines' markers set apart."""
    keys = sorted({k for r in records for k in r if k.startswith("val_r1_")})
    values: list[float] = []
    for i, key in enumerate(keys):
        shift = 0.05 * (i - (len(keys) - 1) / 2)
        pts = [(r["epoch"], 100 * r[key]) for r in records if _finite(r.get(key))]
        values += [y for _, y in pts]
        ax.plot([x + shift for x, _ in pts], [y for _, y in pts], marker="os^v"[i % 4], ls=("-", "--")[i % 2],
                ms=5, color=f"C{i // 2}", mfc="white" if i % 2 else None, label=_val_label(key, modalities),
                clip_on=False)
    if kept_epoch is not None:
        ax.axvline(kept_epoch, color="gray", ls=":", lw=1.2,
                   label=f"kept weights: epoch {kept_epoch} ({kept_label})")
    if values:
        ax.set_ylim(*recall_limits(values))
        ax.legend(fontsize=7, frameon=False)
    ax.set(xlabel="epoch (0: before training)", ylabel="validation R@1 (%)", title="validation retrieval")


def recall_limits(values: Sequence[float]) -> tuple[float, float]:
    """y limits of a recall axis in %: the values with a margin, never below 0 or past 100."""
    lo, hi = min(values), max(values)
    pad = max(2.0, 0.08 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


_NOT_LOSS = {"type", "step", "epoch", "seconds", "samples_per_s", "logit_scale", "grad_norm", "lr"}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _val_label(key: str, modalities: Sequence[str]) -> str:
    """val_r1_full_a_to_b → "full prefix, vision→tactile"; val_r1_k1_b_to_a → "k=1, tactile→vision"."""
    a, b = (list(modalities) + ["A", "B"])[:2]
    prefix, _, direction = key[len("val_r1_"):].partition("_")
    arrow = {"a_to_b": f"{a}→{b}", "b_to_a": f"{b}→{a}"}.get(direction, direction)
    return f"{'full prefix' if prefix == 'full' else prefix.replace('k', 'k=', 1)}, {arrow}"
