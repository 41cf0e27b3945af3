"""`regtok compare`: runs (final validation metrics and configs) or eval reports (retrieval and baseline rows) side
by side, with the config keys that differ marked; optionally a Markdown file and a plot of validation R@1 per epoch.

A sweep directory stands for all of its trials.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regtok.config import flatten
from regtok.errors import RegtokError
from regtok.pipeline.sweep_report import fmt as _fmt

RUN_METRICS = (("val/R@1", "val/R@1"), ("val_select", "val/select"), ("best/val_select", "best val/select"),
               ("best/epoch", "best epoch"), ("loss", "loss (last epoch)"), ("step", "steps"))


@dataclass
class Entry:
    name: str
    kind: str  # "run" or "eval"
    values: dict[str, Any]  # row label → value
    config: dict[str, Any] = field(default_factory=dict)  # flattened (dotted keys)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, validation R@1), runs only


def load_entries(paths: list[str | os.PathLike], warn: Callable[[str], None] = lambda msg: None) -> list[Entry]:
    """One entry per run or report; a sweep directory gives one per trial that has a run manifest. ``warn`` is
    told of what is left out (a damaged line of a run's metrics.jsonl)."""
    from regtok.pipeline.manifest import manifest_path, read_manifest

    entries = []
    for path in paths:
        mpath = manifest_path(path)
        if not mpath.is_file():
            if (Path(path) / "config.json").is_file():
                raise RegtokError(f"{path} is a run that has not finished (no manifest.json yet: it is being trained, "
                                  "or was interrupted and `regtok train … --resume` continues it)")
            raise RegtokError(f"{path}: no manifest.json (compare takes run, eval report or sweep directories)")
        m = read_manifest(mpath)
        if m["kind"] == "run":
            entries.append(_run_entry(mpath.parent, m, warn))
        elif m["kind"] == "eval":
            entries.append(_report_entry(mpath.parent))
        elif m["kind"] == "sweep":
            for t in m.get("trials", []):
                trial = mpath.parent / str(t.get("path"))
                if t.get("path") and (trial / "manifest.json").is_file():
                    entries.append(_run_entry(trial, read_manifest(trial / "manifest.json", kind="run"), warn))
        else:
            raise RegtokError(f"{path} is a {m['kind']} manifest; compare takes run, eval report or sweep directories")
    if not entries:
        raise RegtokError("nothing to compare")
    return entries


def _run_entry(run_dir: Path, m: dict[str, Any], warn: Callable[[str], None]) -> Entry:
    metrics = m.get("metrics") or {}
    values = {label: metrics.get(key) for key, label in RUN_METRICS}
    if m.get("stopped"):
        values["stopped after epoch"] = m["stopped"].get("epoch", 0) + 1
    return Entry(str(run_dir), "run", values, flatten(m.get("config") or {}), _curve(run_dir, warn))


def _curve(run_dir: Path, warn: Callable[[str], None]) -> list[tuple[int, float]]:
    """(epoch, validation R@1) from metrics.jsonl; a line that is not a metrics record is skipped and named."""
    from regtok.pipeline.runs import METRICS, metrics_lines
    from regtok.train import full_r1

    path = run_dir / METRICS
    curve, bad = [], []
    for number, r in metrics_lines(path) if path.is_file() else []:
        try:
            r1 = full_r1(r) if r is not None else None
            if r is None or (r1 is not None and not isinstance(r1, int | float)):
                raise TypeError
            if r.get("type") in ("start", "epoch") and r1 is not None:
                curve.append((int(r["epoch"]) + 1, float(r1)))  # "start" (epoch -1) is epoch 0
        except (TypeError, ValueError, KeyError):
            bad.append(number)
    if bad:
        warn(f"{path} line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: not a metrics record, skipped")
    return curve


def _report_entry(report_dir: Path) -> Entry:
    from regtok.pipeline.report_md import retrieval_rows

    try:
        report = json.loads((report_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RegtokError(f"{report_dir}: cannot read report.json ({e})") from None
    values: dict[str, Any] = {}
    for label, row in retrieval_rows(report):
        values[f"R@1 {label}"] = (row["a_to_b"]["R@1"] + row["b_to_a"]["R@1"]) / 2
    h = report.get("headline") or {}
    values["regtok / best baseline"] = h.get("ratio")
    values["N"] = report.get("n")
    return Entry(str(report_dir), "eval", values)


def differing_keys(entries: list[Entry]) -> list[str]:
    keys = sorted({k for e in entries for k in e.config})
    return [k for k in keys if len({json.dumps(e.config.get(k)) for e in entries}) > 1]


Table = tuple[str, list[str], list[tuple[str, list[str], bool]]]


def tables(entries: list[Entry], all_keys: bool = False) -> list[Table]:
    """[(title, column names, [(row label, cells, differs)])] — one table for runs and one for reports."""
    out = []
    for kind, title in (("run", "runs"), ("eval", "eval reports")):
        group = [e for e in entries if e.kind == kind]
        if not group:
            continue
        labels = list(dict.fromkeys(label for e in group for label in e.values))
        rows = [(label, [_fmt(e.values.get(label)) for e in group], False) for label in labels]
        if kind == "run":
            differ = set(differing_keys(group))
            keys = sorted({k for e in group for k in e.config}) if all_keys else sorted(differ)
            rows += [(k, [_fmt(e.config.get(k)) for e in group], k in differ) for k in keys]
        out.append((title, [_short(e.name, group) for e in group], rows))
    return out


def _short(name: str, group: list[Entry]) -> str:
    """The part of the path that tells the entries apart."""
    parts = [Path(e.name).parts for e in group]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return "/".join(Path(name).parts[common:]) or name


def render_markdown(entries: list[Entry], all_keys: bool = False) -> str:
    lines = ["# regtok compare", ""]
    for title, columns, rows in tables(entries, all_keys):
        lines += [f"## {title.capitalize()}", "", "| | " + " | ".join(columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for label, cells, differs in rows:
            mark = "**" if differs else ""
            lines.append(f"| {mark}{label}{mark} | " + " | ".join(f"{mark}{c}{mark}" for c in cells) + " |")
        if title == "runs":
            lines += ["", "Config keys in **bold** differ between the runs." if all_keys else
                      "The config rows are the keys that differ between the runs (--all-keys shows every key)."]
        lines.append("")
    if any(e.curve for e in entries):
        lines += ["![validation R@1 per epoch](curves.png)", ""]
    return "\n".join(lines) + "\n"


def plot_curves(entries: list[Entry], path: Path) -> bool:
    """Validation R@1 (full prefix, mean of both directions) against epoch, one line per run."""
    runs = [e for e in entries if e.curve]
    if not runs:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, e in enumerate(runs):
        xs, ys = zip(*e.curve, strict=True)
        ax.plot(xs, ys, marker="o", ms=3, lw=1.4, color=f"C{i % 10}", label=_short(e.name, runs))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0: before training)")
    ax.set_ylabel("validation R@1 (full prefix)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1 if len(runs) <= 8 else 2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
