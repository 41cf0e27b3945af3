"""``prefix.png``, the figure a person reads from an eval report: retrieval R@1 against k beside its references,
reconstruction, and the probe heatmaps.

It needs matplotlib (``pip install 'regtok[plot]'``); without it :func:`plot_prefix` returns None and writes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from regtok.pipeline.runtime.figures import DPI, pyplot

DIRECTIONS = ("a_to_b", "b_to_a")
GROUPS = ("shared", "private", "all")
# Horizontal reference lines of the retrieval panel: report key, label, colour, line style.
REFERENCES = (("cca", "linear CCA", "tab:green", (0, (6, 2))),
              ("weighted_cca", "weighted CCA", "tab:olive", (0, (6, 1, 1, 1))),
              ("start", "regtok at its start", "tab:gray", (0, (2, 1))),
              ("linear_infonce", "linear InfoNCE head", "tab:purple", (0, (3, 1, 1, 1))),
              ("mlp_infonce", "MLP InfoNCE head", "tab:red", (0, (4, 2, 1, 2))),
              ("raw_pooled", "raw pooled", "tab:brown", (0, (1, 1.5))))


def _mean_r1(row: dict[str, Any]) -> float:
    return (row["a_to_b"]["R@1"] + row["b_to_a"]["R@1"]) / 2


def n_shared_of(report: dict[str, Any]) -> int:
    """The run's n_shared: recorded by evaluate, else the largest k whose private probe group is empty."""
    recorded = report.get("prefixes", {}).get("n_shared")
    if recorded is not None:
        return int(recorded)
    empty = [p["k"] for p in report["probes"] if p["group"] == "private" and p["value"] is None]
    return max(empty, default=max((r["k"] for r in report["retrieval"]), default=1))


def group_ks(report: dict[str, Any]) -> dict[str, list[int | None]]:
    """The probe cells worth showing per group: the raw features (k None), shared k <= n_shared (it stops growing
    there), private and all k > n_shared (private is empty below, all equals shared)."""
    ks = report.get("prefixes", {}).get("probes") or sorted({p["k"] for p in report["probes"] if p["k"] is not None})
    n_shared = n_shared_of(report)
    shared = [k for k in ks if k <= n_shared]
    if any(p["group"] == "shared" and p["k"] == n_shared for p in report["probes"]) and n_shared not in shared:
        shared.append(n_shared)
    raw = [None] if any(p["group"] == "raw" for p in report["probes"]) else []
    return {"raw": raw, "shared": shared, "private": [k for k in ks if k > n_shared],
            "all": [k for k in ks if k > n_shared]}


def plot_prefix(report: dict[str, Any], path: Path) -> Path | None:
    """prefix.png (see :func:`prefix_figure`); None, writing nothing, without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig = prefix_figure(report)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def prefix_figure(report: dict[str, Any]) -> Any:
    """Retrieval R@1 against k (both directions, baselines and chance as lines) beside one heatmap of probe
    scores (label × k) per modality × register group, chance in each row label; a matplotlib Figure."""
    plt = pyplot()
    mods = list(report["modalities"])
    labels = sorted({p["label"] for p in report["probes"]})
    ks = {g: v for g, v in group_ks(report).items() if v} if labels else {}
    row_h = min(0.22, 11.0 / max(len(mods) * len(labels), 1))  # inches per heatmap row; tall tables get denser
    label_w = 0.2 + 0.048 * max((len(_row_label(report, lb)) for lb in labels), default=0)
    block_h = [0.55 + row_h * len(labels)] * len(mods)  # one modality's heatmaps with title and k ticks
    heat_w = sum(0.5 * len(v) for v in ks.values()) + 0.12 * (len(ks) - 1)
    width = 0.75 + 3.7 + (0.35 + label_w + heat_w + 0.9 if ks else 0.3)
    height = max(6.0, 0.55 + sum(block_h) + 0.1)
    fig = plt.figure(figsize=(width, height))
    place = lambda x, y, w, h: fig.add_axes((x / width, 1 - (y + h) / height, w / width, h / height))  # noqa: E731
    _retrieval_panel(place(0.75, 0.55, 3.7, 3.0), report)
    if report.get("reconstruction") and height >= 8.0:  # room below the retrieval legend
        _reconstruction_panel(place(0.75, 5.75, 3.7, min(2.2, height - 6.4)), report)
    image, top = None, 0.55
    for m, bh in zip(mods, block_h, strict=True):
        x = 0.75 + 3.7 + 0.35 + label_w
        for j, (group, gks) in enumerate(ks.items()):
            ax = place(x, top + 0.25, 0.5 * len(gks), bh - 0.55)
            image = _probe_heatmap(ax, report, m, group, gks, labels, first=j == 0, row_h=row_h)
            x += 0.5 * len(gks) + 0.12
        top += bh
    if image is not None:
        cbar = fig.colorbar(image, cax=place(width - 0.8, 0.8, 0.13, min(3.0, height - 1.4)))
        cbar.set_label("probe score: 0 = chance or worse, 1 = perfect", fontsize=7.5)
        cbar.ax.tick_params(labelsize=7)
    fig.text(0.1 / width, 1 - 0.15 / height, _title(report), fontsize=9.5, va="top")
    return fig


def _title(report: dict[str, Any]) -> str:
    a, b = report["modalities"]
    split = report.get("probe_split", {})
    return (f"regtok eval {a} ↔ {b}: retrieval on N = {report['n']} pairs; probes fitted on {split.get('train', '?')} "
            f"rows, scored on {split.get('test', '?')} (accuracy %, R² for continuous labels)")


def _retrieval_panel(ax: Any, report: dict[str, Any]) -> None:
    """R@1 (%) against the shared prefix k per direction, flow-transported rows dotted, references as lines."""
    a, b = report["modalities"]
    names = {"a_to_b": f"{a}→{b}", "b_to_a": f"{b}→{a}"}
    rows = report["retrieval"]
    ks = [r["k"] for r in rows]
    # the two directions often coincide: shift their markers apart along log-k and give them distinct styles
    for d, shift, marker, style, colour in zip(DIRECTIONS, (-0.06, 0.06), ("o", "s"), ("-", "--"),
                                               ("tab:blue", "tab:orange"), strict=True):
        ys = [100 * r[d]["R@1"] for r in rows]
        ax.plot([k * 2 ** shift for k in ks], ys, marker=marker, ls=style, color=colour, lw=1.6, ms=6, zorder=3,
                mfc="white" if d == "b_to_a" else colour, label=f"regtok {names[d]} (k={ks[-1]}: {ys[-1]:.1f}%)")
    flows = report.get("flow") or []
    if flows:
        steps = max(f["steps"] for f in flows)
        best = sorted((f for f in flows if f["steps"] == steps), key=lambda f: f["k"])
        for d, shift, marker, colour in zip(DIRECTIONS, (-0.12, 0.12), ("^", "v"), ("tab:blue", "tab:orange"),
                                            strict=True):
            ys = [100 * f[d]["R@1"] for f in best]
            ax.plot([f["k"] * 2 ** shift for f in best], ys, marker=marker, ls=":", color=colour, lw=1.2, ms=5,
                    label=f"flow {names[d]}, {steps} steps ({ys[-1]:.1f}%)")
    base = report.get("baselines", {})
    refs = {**base.get("linear", {}), "raw_pooled": base.get("raw_pooled", {})}
    for key, label, colour, style in REFERENCES:
        row = refs.get(key, {})
        if "a_to_b" in row:
            ax.axhline(100 * _mean_r1(row), color=colour, ls=style, lw=1.4, zorder=1,
                       label=f"{label}, mean of ↔ ({100 * _mean_r1(row):.1f}%)")
    if "chance" in base:
        chance = 100 * base["chance"]["a_to_b"]["R@1"]
        ax.axhline(chance, color="gray", ls="--", lw=1.0, zorder=1, label=f"chance ({chance:.2g}%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlim(min(ks) / 2 ** 0.4, max(ks) * 2 ** 0.4)
    ax.minorticks_off()
    ax.set_ylim(0, 100)  # a recall axis never runs past 100 %; markers on the edge are drawn whole
    for line in ax.get_lines():
        line.set_clip_on(False)
    ax.set_xlabel("shared prefix k (registers)")
    ax.set_ylabel("R@1 (%)")
    ax.set_title("cross-modal retrieval", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)


def _reconstruction_panel(ax: Any, report: dict[str, Any]) -> None:
    """Cosine between each modality's input feature and its reconstruction from the k-prefix, with its references:
    the per-position training mean (flat, dotted) and a ridge readout from the same registers (dashed)."""
    rows = report["reconstruction"]
    for i, m in enumerate(report["modalities"]):
        mine = sorted((r for r in rows if r["modality"] == m), key=lambda r: r["k"])
        ks = [r["k"] for r in mine]
        ax.plot(ks, [r["cosine"] for r in mine], marker="os"[i % 2], color=f"C{i + 2}", ms=5, lw=1.6,
                label=f"{m}: decoder")
        if mine and "ridge_reference" in mine[0]:
            ax.plot(ks, [r["ridge_reference"] for r in mine], ls="--", color=f"C{i + 2}", lw=1.0, alpha=0.8,
                    label=f"{m}: ridge readout")
            ax.axhline(mine[0]["mean_reference"], ls=":", color=f"C{i + 2}", lw=1.0,
                       label=f"{m}: per-position mean ({mine[0]['mean_reference']:.2f})")
    ks = sorted({r["k"] for r in rows})
    values = [r[key] for r in rows for key in ("cosine", "ridge_reference", "mean_reference") if key in r]
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set_ylim(min(0.0, *values) - 0.03, 1.03)
    ax.set_xlabel("prefix k (registers)", fontsize=8)
    ax.set_ylabel("cosine", fontsize=8)
    ax.set_title("reconstruction of the input feature", fontsize=9)
    ax.tick_params(labelsize=7.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, frameon=False, ncol=2)


def _probe_heatmap(ax: Any, report: dict[str, Any], modality: str, group: str, ks: Sequence[int],
                   labels: Sequence[str], first: bool, row_h: float) -> Any:
    """label × k cells coloured from chance (0) to perfect (1), each written as in report.md."""
    import numpy as np

    cells = {(p["label"], p["k"]): p for p in report["probes"] if p["modality"] == modality and p["group"] == group}
    score = np.full((len(labels), len(ks)), np.nan)
    for i, label in enumerate(labels):
        for j, k in enumerate(ks):
            p = cells.get((label, k))
            if p is None or p["value"] is None:
                continue
            chance = p.get("chance") or 0.0
            score[i, j] = (p["value"] - chance) / max(1.0 - chance, 1e-9)
            shade = min(max(score[i, j], 0.0), 1.0)
            ax.text(j, i, _cell(p["metric"], p["value"]), ha="center", va="center", fontsize=min(6.5, 30 * row_h),
                    color="white" if shade > 0.6 else "black")
    image = ax.imshow(np.clip(score, 0, 1), cmap="YlGnBu", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(ks)), ["raw" if k is None else str(k) for k in ks], fontsize=7)
    ax.set_yticks(range(len(labels)), [_row_label(report, lb) for lb in labels] if first else [],
                  fontsize=min(7.0, 32 * row_h))
    ax.tick_params(length=0, pad=2)
    ax.set_title(f"{modality} · {group}" if group != "raw" else f"{modality} · input", fontsize=8.5, pad=3)
    ax.set_xlabel("k" if group != "raw" else "", fontsize=7, labelpad=1)
    return image


def _cell(metric: str, value: float) -> str:
    """A probe score as report.md writes it: accuracy in %, R² with two decimals (no "-0.00")."""
    if metric == "accuracy":
        return f"{100 * value:.0f}"
    return f"{value:.2f}" if abs(value) >= 0.005 else "0.00"


def _row_label(report: dict[str, Any], label: str) -> str:
    """``label (acc %, chance 10.7)`` or ``label (R², chance -0.05)``: what a cell's number is and its floor."""
    p = next((p for p in report["probes"] if p["label"] == label and p.get("chance") is not None), None)
    if p is None:
        return label
    if p["metric"] == "accuracy":
        return f"{label} (acc %, chance {100 * p['chance']:.1f})"
    return f"{label} (R², chance {_cell('r2', p['chance'])})"
