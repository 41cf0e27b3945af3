"""`regtok compare`: runs (their kept validation scores and configs) or eval reports (retrieval and baselines) side
by side, one row per configuration; optionally a Markdown file and a plot of the validation score per epoch.

Runs (or the runs behind eval reports) whose configs differ only in ``seed`` are one row with mean ± std and n
(:mod:`regtok.pipeline.sweep.spread`). Each table states the validation N and the step 1/N of its recalls and warns
when rows are within one step of the best. A sweep directory stands for all of its trials. Recalls are in %.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regtok.config import flatten
from regtok.errors import RegtokError
from regtok.pipeline.sweep.spread import (
    EVALUATE_MORE,
    NOT_A_METHOD,
    VALIDATE_MORE,
    mean_std,
    resolution_text,
    seed_groups,
    spread_text,
    tie_warning,
    within_one_step,
)

# Run rows: (label, is a recall). "kept" is the epoch whose weights eval uses (the best one with keep_best).
RUN_VALUES = (("val/select kept", True), ("val/R@1 kept", True), ("kept epoch", False), ("val/select last", True),
              ("loss (last epoch)", False), ("steps", False), ("stopped after epoch", False))
SELECT = "val/select kept"  # what the rows are ranked and compared by


@dataclass
class Entry:
    name: str
    kind: str  # "run" or "eval"
    values: dict[str, Any]  # column label → value (recalls as fractions)
    recalls: set[str] = field(default_factory=set)  # the labels that are recalls (shown in %)
    config: dict[str, Any] = field(default_factory=dict)  # flattened (dotted keys)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, val/select), runs only
    val_n: int | None = None  # the rows its recalls are measured on


@dataclass
class CompareTable:
    title: str
    columns: list[str]
    rows: list[list[str]]
    highlight: set[int] = field(default_factory=set)  # columns of config keys that differ between rows
    notes: list[str] = field(default_factory=list)


def load_entries(paths: list[str | os.PathLike], warn: Callable[[str], None] = lambda msg: None) -> list[Entry]:
    """One entry per run or report; a sweep directory gives one per trial that has a run manifest. ``warn`` is
    told of what is left out (a damaged line of a run's metrics.jsonl)."""
    from regtok.pipeline.manifests.manifest import manifest_path, read_manifest

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


def _run_entry(run_dir: Path, m: dict[str, Any], warn: Callable[[str], None] = lambda msg: None) -> Entry:
    from regtok.config import from_saved
    from regtok.pipeline.train import epoch_records, kept_record, stopped_after
    from regtok.train import full_r1

    metrics = m.get("metrics") or {}
    kept, epochs = kept_record(run_dir), epoch_records(run_dir)
    last = epochs[-1] if epochs else metrics
    values = {"val/select kept": (kept or {}).get("val_select", metrics.get("best/val_select")),
              "val/R@1 kept": full_r1(kept) if kept else None, "kept epoch": (kept or {}).get("epoch"),
              "val/select last": last.get("val_select"), "loss (last epoch)": last.get("loss"),
              "steps": metrics.get("step")}
    if m.get("stopped"):
        values["stopped after epoch"] = stopped_after(m["stopped"])
    return Entry(str(run_dir), "run", values, {label for label, recall in RUN_VALUES if recall},
                 flatten(from_saved(m.get("config") or {})), _curve(run_dir, warn), m.get("val_samples"))


def _curve(run_dir: Path, warn: Callable[[str], None]) -> list[tuple[int, float]]:
    """(epoch from 1, val/select) per validation in metrics.jsonl, 0 before training; a line that is not a metrics
    record (:func:`regtok.pipeline.train.runs.is_record`) is skipped and named."""
    from regtok.pipeline.train import METRICS, counted_from_one, metrics_lines
    from regtok.train import full_r1

    path = run_dir / METRICS
    lines = metrics_lines(path) if path.is_file() else []
    bad = [number for number, r in lines if r is None]
    if bad:
        warn(f"{path} line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}: not a metrics record, skipped")
    return [(int(r["epoch"]), r["val_select"] if "val_select" in r else full_r1(r))
            for r in counted_from_one([r for _, r in lines if r is not None])
            if r.get("type") in ("start", "epoch") and full_r1(r) is not None]


def _report_entry(report_dir: Path) -> Entry:
    from regtok.pipeline.eval import retrieval_rows

    try:
        report = json.loads((report_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RegtokError(f"{report_dir}: cannot read report.json ({e})") from None
    values: dict[str, Any] = {}
    for label, row in retrieval_rows(report):
        values[f"R@1 {label}"] = (row["a_to_b"]["R@1"] + row["b_to_a"]["R@1"]) / 2
    recalls = set(values)
    values["regtok / best baseline"] = (report.get("headline") or {}).get("ratio")
    return Entry(str(report_dir), "eval", values, recalls, _evaluated_config(report, report_dir),
                 val_n=report.get("n"))


def _evaluated_config(report: dict[str, Any], report_dir: Path) -> dict[str, Any]:
    """The evaluated run's config (its preset and what differs from it), with the evaluated store: reports of
    runs that differ only in seed, on the same store, are one row."""
    from regtok.config import TrainConfig, resolve, to_dict

    ev = report.get("evaluated") or {}
    try:
        config = flatten(to_dict(resolve(TrainConfig, ev.get("preset"))))
    except RegtokError:
        config = {}
    config.update(ev.get("differs_from_preset") or {})
    return {**config, "eval store": (ev.get("eval_store") or {}).get("path")} if ev else {"report": str(report_dir)}


def differing_keys(entries: list[Entry]) -> list[str]:
    keys = sorted({k for e in entries for k in e.config})
    return [k for k in keys if len({json.dumps(e.config.get(k), default=str) for e in entries}) > 1]


def tables(entries: list[Entry], all_keys: bool = False) -> list[CompareTable]:
    """One table for runs and one for eval reports: a row per configuration (runs that differ only in seed
    together), its values as mean ± std (n), then the config keys that differ between rows (every key with
    ``all_keys``)."""
    out = []
    for kind, title in (("run", "runs"), ("eval", "eval reports")):
        group = [e for e in entries if e.kind == kind]
        if group:
            out.append(_table(group, title, all_keys))
    return out


def _table(entries: list[Entry], title: str, all_keys: bool) -> CompareTable:
    groups = seed_groups(entries, lambda e: e.config)
    differ = [k for k in differing_keys(entries) if k.split(".")[-1] not in NOT_A_METHOD]
    keys = [k for k in sorted({k for e in entries for k in e.config}) if k != "report"] if all_keys else differ
    recalls = {label for e in entries for label in e.recalls}
    labels = list(dict.fromkeys(label for e in entries for label in e.values))
    labels = [lb for lb in labels if lb in recalls] + [lb for lb in labels if lb not in recalls]  # recalls first
    columns = [title, "n", *[f"{label} (%)" if label in recalls else label for label in labels],
               "val N" if title == "runs" else "N", *keys]
    rows = []
    for members in groups:
        cells = [_names(members, entries), str(len(members))]
        for label in labels:
            present = [e.values[label] for e in members if isinstance(e.values.get(label), int | float)]
            cells.append(spread_text(present, percent=label in recalls, n=len(members)) if present else "—")
        ns = sorted({e.val_n for e in members if e.val_n})
        cells.append("/".join(map(str, ns)) or "—")
        cells += [_cell(members[0].config.get(k)) for k in keys]
        rows.append(cells)
    first = 3 + len(labels)
    return CompareTable(title, columns, rows, {first + i for i, k in enumerate(keys) if k in differ},
                        _notes(entries, groups, title))


def _notes(entries: list[Entry], groups: list[list[Entry]], title: str) -> list[str]:
    """The validation N and step, and a warning when rows are within one step of the best."""
    ns = sorted({e.val_n for e in entries if e.val_n})
    n = ns[0] if ns else None
    runs = title == "runs"
    differs = "" if len(ns) < 2 else f" (N differs between rows: {', '.join(map(str, ns))})"
    notes = [resolution_text(n, "validation rows" if runs else "evaluated pairs") + differs]
    ks = [k for k in entries[0].values if k.startswith("R@1 k=")]
    key = SELECT if title == "runs" else max(ks, key=lambda k: int(k.removeprefix("R@1 k=")), default=None)
    means = {f"[{_names(g, entries)}]": mean_std(v)[0] for g in groups
             if (v := [e.values[key] for e in g if isinstance(e.values.get(key), int | float)])}
    warning = tie_warning(within_one_step(means, n), len(means), n, what="rows",
                          data="validation set" if runs else "evaluated split",
                          advice=VALIDATE_MORE if runs else EVALUATE_MORE)
    return notes + ([f"warning: by {key}, {warning}"] if warning else [])


def _names(members: list[Entry], everyone: list[Entry]) -> str:
    short = [_short(e.name, everyone) for e in members]
    return ", ".join(short) if len(short) <= 3 else f"{short[0]}, {short[1]} … {short[-1]}"


def _cell(value: Any) -> str:
    from regtok.pipeline.sweep.report import fmt

    return fmt(value)


def _short(name: str, group: list[Entry]) -> str:
    """The part of the path that tells the entries apart."""
    parts = [Path(e.name).parts for e in group]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    return "/".join(Path(name).parts[common:]) or name


def render_markdown(entries: list[Entry], all_keys: bool = False) -> str:
    lines = ["# regtok compare", "", "Recalls in %; a row is one configuration, its runs that differ only in `seed` "
             "together (mean ± sample std, n)."]
    for t in tables(entries, all_keys):
        lines += ["", f"## {t.title.capitalize()}", "", *[f"{note}." for note in t.notes], "",
                  "| " + " | ".join(f"**{c}**" if i in t.highlight else c for i, c in enumerate(t.columns)) + " |",
                  "|" + "---|" * len(t.columns)]
        lines += ["| " + " | ".join(row) + " |" for row in t.rows]
        if t.title == "runs":
            lines += ["", "Config keys in **bold** differ between the rows." if all_keys else
                      "The config columns are the keys that differ between the rows (--all-keys shows every key)."]
    if any(e.curve for e in entries):
        lines += ["", "![validation score per epoch](curves.png)"]
    return "\n".join(lines) + "\n"


def run_compare(paths: Sequence[str | os.PathLike], out: str | os.PathLike | None = None, *, all_keys: bool = False,
                overwrite: bool = False, warn: Callable[[str], None] = lambda msg: None,
                ) -> tuple[list[CompareTable], Path | None]:
    """`regtok compare`: the tables of ``paths`` side by side and, with ``out``, ``OUT/compare.md`` and
    ``OUT/curves.png`` (an ``out`` that holds anything else needs ``overwrite``). Returns the tables and the path of
    compare.md (None without ``out``)."""
    from regtok.pipeline.manifests.outdir import claim, compare_foreign

    if out is not None:
        out = Path(out)
        claim(out, compare_foreign(out), "compare", overwrite)
    entries = load_entries(list(paths), warn=warn)
    result = tables(entries, all_keys)
    if out is None:
        return result, None
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(entries, out / "curves.png")
    (out / "compare.md").write_text(render_markdown(entries, all_keys))
    return result, out / "compare.md"


def plot_curves(entries: list[Entry], path: Path) -> bool:
    """The validation score keep_best and sweeps rank by (val/select: full-prefix R@1, after transport for
    flow_matching runs; %) against epoch, one line per configuration (mean, ±std band over seeds)."""
    runs = [e for e in entries if e.curve]
    if not runs:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from regtok.pipeline.train import recall_limits

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    values: list[float] = []
    for i, members in enumerate(seed_groups(runs, lambda e: e.config)):
        epochs = sorted({x for e in members for x, _ in e.curve})
        stats = [mean_std([100 * y for e in members for x, y in e.curve if x == ep]) for ep in epochs]
        mean = [m for m, _ in stats]
        values += mean
        label = _names(members, runs) + (f" (n={len(members)})" if len(members) > 1 else "")
        ax.plot(epochs, mean, marker="o", ms=3, lw=1.4, color=f"C{i % 10}", label=label, clip_on=False)
        if len(members) > 1:
            ax.fill_between(epochs, [m - (s or 0) for m, s in stats], [m + (s or 0) for m, s in stats],
                            color=f"C{i % 10}", alpha=0.2, lw=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(*recall_limits(values))
    ax.set_xlabel("epoch (0: before training)")
    ax.set_ylabel("validation val/select (%)")
    ax.set_title("full-prefix R@1, after transport for flow_matching runs", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1 if len(runs) <= 8 else 2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
