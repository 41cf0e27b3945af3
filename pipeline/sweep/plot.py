"""sweep.png: the sweep's metric (%) against each swept parameter, every trial a point, the spread per choice."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from regtok.pipeline.sweep.space import Choices, Param, Range
from regtok.pipeline.sweep.spread import mean_std, resolution_text


def plot_sweep(report: dict[str, Any], space: dict[str, Param], path: Path) -> bool:
    """One panel per parameter: complete trials filled, pruned ones hollow, and for each choice the mean ± std
    of its complete trials (n beside it): the spread over seeds and the other parameters. The y axis is the
    metric in % and never runs past 100; the title gives the validation N and step. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(space)
    cols = min(3, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 3.0 * rows_n), squeeze=False, sharey=True)
    scored = [r for r in report["trials"] if r["value"] is not None and r["state"] in ("complete", "pruned")]
    for ax, name in zip(axes.flat, names, strict=False):
        _panel(ax, name, space[name], scored)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    values = [100 * r["value"] for r in scored]
    if values:
        lo, hi = min(values), max(values)
        pad = max(2.0, 0.1 * (hi - lo))
        axes[0, 0].set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{report['metric']} (%)", fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=7, frameon=False)
    best = report["best"]
    fig.suptitle(f"{report['metric']} per trial" + (f"; best {100 * best['value']:.1f} % (trial {best['number']})"
                                                    if best else "")
                 + f"\n{resolution_text(report.get('validation', {}).get('n'))}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _panel(ax: Any, name: str, param: Param, scored: list[dict[str, Any]]) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    labels = list(map(str, param.values)) if isinstance(param, Choices) else []
    for state, style in (("complete", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C1"})):
        pts = [r for r in scored if r["state"] == state and name in r["params"]]
        if not pts:
            continue
        xs = ([labels.index(str(r["params"][name])) + rng.uniform(-0.15, -0.05) for r in pts] if labels
              else [r["params"][name] for r in pts])
        ax.scatter(xs, [100 * r["value"] for r in pts], s=20, label=state, zorder=3, clip_on=False, **style)
    for i, label in enumerate(labels):  # the spread of each choice, beside its points
        ys = [100 * r["value"] for r in scored if r["state"] == "complete" and str(r["params"].get(name)) == label]
        if ys:
            mean, std = mean_std(ys)
            ax.errorbar(i + 0.12, mean, yerr=std or 0, fmt="_", ms=12, color="black", capsize=3, lw=1.2, zorder=4,
                        label="mean ± std of the complete trials" if i == 0 else None)
            ax.annotate(f"n={len(ys)}", (i + 0.2, mean), fontsize=6.5, va="center")
    if labels:
        ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20 if max(map(len, labels)) > 8 else 0)
        ax.set_xlim(-0.5, len(labels) - 0.5)
    elif isinstance(param, Range) and param.log:
        ax.set_xscale("log")
    ax.set_title(name, fontsize=9)
    ax.grid(alpha=0.3)
