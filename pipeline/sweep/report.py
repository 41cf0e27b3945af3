"""What a sweep reports: report.json, report.md, sweep.png, best.yaml and the sweep manifest.

A trial's value is its metric for the weights ``regtok eval`` will use (the kept best epoch; see
:func:`regtok.pipeline.sweep.worker.run_trial`). The report states the validation N and the metric's step (1/N),
warns when trials are within one step of the best, and, when the space sweeps ``seed``, groups the trials that
differ only in their seed into one row with mean ± std and n (:mod:`regtok.pipeline.sweep.spread`); the best trial
is then the best of the best group. Recalls are fractions in report.json and percentages in report.md.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from regtok.config import PRESETS, TrainConfig, flatten, nested, to_dict
from regtok.pipeline.sweep.plot import plot_sweep
from regtok.pipeline.sweep.space import Param, diff_from_defaults, space_json, trial_config
from regtok.pipeline.sweep.spread import (
    mean_std,
    pct,
    resolution,
    resolution_text,
    seed_groups,
    tie_warning,
    within_one_step,
)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial (not the surplus ones a worker declined), best metric first; pruned ones by their kept value."""
    from optuna.trial import TrialState

    from regtok.pipeline.sweep.study import retried_from

    rows = []
    retried_as = {retried_from(t): t.number for t in study.get_trials(deepcopy=False)
                  if retried_from(t) is not None}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus") or t.state == TrialState.WAITING:
            continue
        a = t.user_attrs
        value = t.value if t.state == TrialState.COMPLETE else a.get("value", a.get("last_value"))
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": value, "params": dict(t.params),
                     "kept_epoch": a.get("kept_epoch"), "last_value": a.get("last_value"), "val_n": a.get("val_n"),
                     "epochs": a.get("epochs", len(t.intermediate_values) or None), "seconds": a.get("seconds"),
                     "path": a.get("path"), "error": a.get("error"), "retry_of": retried_from(t),
                     "retried_as": retried_as.get(t.number)})
    rank = {"complete": 0, "pruned": 1, "running": 2, "fail": 3}
    rows.sort(key=lambda r: (rank.get(r["state"], 4), -(r["value"] if r["value"] is not None else -math.inf),
                             r["number"]))
    return rows


def summarise(rows: list[dict[str, Any]], space: dict[str, Any]) -> dict[str, Any]:
    """The validation N and step, the trials within one step of the best, the seed groups and the best trial."""
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    ns = {r["val_n"] for r in complete if r["val_n"]}
    n = min(ns) if ns else None
    ties = within_one_step({r["number"]: r["value"] for r in complete}, n)
    groups = []
    if "seed" in space:
        for members in seed_groups(complete, lambda r: r["params"]):
            mean, std = mean_std([r["value"] for r in members])
            groups.append({"params": {k: v for k, v in members[0]["params"].items() if k != "seed"},
                           "trials": [r["number"] for r in members], "n": len(members), "mean": mean, "std": std})
        groups.sort(key=lambda g: -g["mean"])
    best = complete[0] if complete else None
    if groups:  # the best configuration over seeds, and its best trial
        best = next(r for r in complete if r["number"] in groups[0]["trials"])
    return {"validation": {"n": n, "resolution": resolution(n), "within_one_step": ties}, "groups": groups,
            "best": best}


def disk_bytes(out: Path) -> int:
    """Bytes the sweep's trial directories and study file take."""
    paths = [p for p in (out / "trials").rglob("*") if p.is_file()] if (out / "trials").is_dir() else []
    return sum(p.stat().st_size for p in [*paths, *out.glob("study.db*")])


def write_outputs(out: Path, study: Any, scfg: Any, space: dict[str, Param], base: TrainConfig, url: str, *,
                  features: str | os.PathLike, val_features: str | os.PathLike | None, command: list[str] | None,
                  seconds: float) -> dict[str, Any]:
    """Write report.json, report.md, sweep.png (with matplotlib), best.yaml and manifest.json; the report."""
    from regtok.pipeline.manifests.manifest import (
        environment,
        file_record,
        input_ref,
        manifest_path,
        new_manifest,
        write_manifest,
    )
    from regtok.pipeline.sweep.study import safe_url

    rows = trial_rows(study)
    summary = summarise(rows, space)
    best = summary["best"]
    report = {"study": scfg.study, "storage": safe_url(url), "sampler": scfg.sampler, "metric": scfg.metric,
              "pruning": scfg.pruner if scfg.prune else None, "space": space_json(space),
              "counts": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")},
              "trials": rows, "best": best, "validation": summary["validation"], "groups": summary["groups"],
              "keep": scfg.keep, "disk_bytes": disk_bytes(out), "seconds": round(seconds, 3)}
    files = ["report.json", "report.md"]
    if best is not None:
        best_cfg = trial_config(base, best["params"])  # not the trial's files: it may have run on another machine
        report["best"]["config"] = diff_from_defaults(best_cfg)
        write_best_yaml(out / "best.yaml", best, best_cfg, scfg.metric)
        files.append("best.yaml")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if plot_sweep(report, space, out / "sweep.png"):
        files.append("sweep.png")
    (out / "report.md").write_text(render_markdown(report, out))
    inputs = [input_ref("features", manifest_path(features), out)]
    if val_features is not None:
        inputs.append(input_ref("val_features", manifest_path(val_features), out))
    trials = [{k: r[k] for k in ("number", "state", "value", "params", "path", "epochs", "kept_epoch")} for r in rows]
    manifest = new_manifest("sweep", command=command, config={"sweep": asdict(scfg), "base": to_dict(base)},
                            inputs=inputs, outputs={"files": [file_record(out / f, out) for f in files]},
                            environment_=environment(base.device), timings={"seconds": round(seconds, 3)},
                            space=space_json(space), sampler=scfg.sampler, storage=safe_url(url), study=scfg.study,
                            metric=scfg.metric, trials=trials, best=None if best is None else best["number"])
    write_manifest(out / "manifest.json", manifest)
    return report


def best_yaml(cfg: TrainConfig) -> dict[str, Any]:
    """The config file that gives ``cfg`` whatever ``--preset`` it is combined with: every key that differs from
    the defaults, and every key a preset sets (a file is applied after the preset, so it overrides them)."""
    flat = flatten(to_dict(cfg))
    keys = set(flatten(diff_from_defaults(cfg))) | {k for p in PRESETS.values() for k in flatten(p)}
    return nested({k: v for k, v in flat.items() if k in keys and k != "device"})


def write_best_yaml(path: Path, best: dict[str, Any], cfg: TrainConfig, metric: str) -> None:
    import yaml

    header = (f"# The best trial of the sweep ({best['path']}): {metric} {pct(best['value'])} % (the weights eval "
              "uses).\n# What differs from the defaults, and every key a preset sets, so that it trains the same "
              "config with or\n# without --preset: regtok train --features STORE --out RUN --config "
              f"{path.name}\n")
    path.write_text(header + yaml.safe_dump(best_yaml(cfg), sort_keys=False))


def fmt(value: Any) -> str:
    """A table cell: 4 decimals, scientific below 1e-3, an em dash for nothing."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def notes(report: dict[str, Any]) -> list[str]:
    """The sentences a reader needs before the table: validation N and step, ties, disk use."""
    v = report["validation"]
    lines = [f"Validation: {resolution_text(v['n'])} (the mean of both directions moves in half-steps)."]
    warning = tie_warning(v["within_one_step"], report["counts"]["complete"], v["n"])
    if warning:
        lines.append(f"**Warning:** {warning}")
    lines.append(f"Disk: the trials and the study take {report['disk_bytes'] / 2**20:.1f} MiB (--keep "
                 f"{report['keep']}: {KEEP_TEXT.get(report['keep'], report['keep'])}).")
    return lines


KEEP_TEXT = {"best": "each trial keeps the weights eval uses, no resume state",
             "last": "each trial keeps its last weights and resume state", "all": "each trial keeps every file"}


def render_markdown(report: dict[str, Any], out: Path) -> str:
    names = list(report["space"])
    c = report["counts"]
    lines = [f"# Sweep {out.name}", "",
             f"Study `{report['study']}` in `{report['storage']}`; {report['sampler']} sampler, "
             f"pruning {report['pruning'] or 'off'}; trials scored by **{report['metric']}** (%) for the weights "
             "eval uses: the kept epoch (pruned trials: the best epoch before they stopped).", "",
             f"{c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"
             + (f", {c['running']} running" if c["running"] else "") + f"; {report['seconds']:.0f} s.", ""]
    lines += [line for note in notes(report) for line in (note, "")]
    best = report["best"]
    if best is not None:
        lines += [f"Best: trial {best['number']} ({best['path']}), {report['metric']} {pct(best['value'])} %, with "
                  + ", ".join(f"{k}={best['params'][k]}" for k in names) + ". Its config is `best.yaml`.", ""]
    if (out / "sweep.png").is_file():
        lines += ["![the metric against each parameter](sweep.png)", ""]
    if report["groups"]:
        lines += _groups_table(report)
    lines += ["| rank | trial | state | " + report["metric"] + " (%) | kept epoch | last epoch (%) | epochs | s | "
              + " | ".join(names) + " |", "|" + "---|" * (8 + len(names))]
    for i, r in enumerate(report["trials"], 1):
        seconds = f"{r['seconds']:.1f}" if r["seconds"] else "—"
        lines.append(f"| {i} | {r['number']} | {r['state']} | {pct(r['value'])} | {fmt(r['kept_epoch'])} | "
                     f"{pct(r['last_value'])} | {fmt(r['epochs'])} | {seconds} | "
                     + " | ".join(fmt(r["params"].get(k)) for k in names) + " |")
    failed = [r for r in report["trials"] if r["state"] == "fail"]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {r['number']}: {r['error'] or 'no error recorded'}"
                  + (f"; retried as trial {r['retried_as']}" if r["retried_as"] is not None else "") for r in failed]
    return "\n".join(lines) + "\n"


def _groups_table(report: dict[str, Any]) -> list[str]:
    """One row per configuration over its seeds: mean ± std (%), n and the trials."""
    names = [k for k in report["space"] if k != "seed"]
    lines = ["## Over seeds", "", "Complete trials that differ only in `seed`, as one row (sample std).", "",
             "| rank | " + " | ".join(names) + f" | {report['metric']} mean (%) | ± std | n | trials |",
             "|" + "---|" * (len(names) + 5)]
    for i, g in enumerate(report["groups"], 1):
        lines.append(f"| {i} | " + " | ".join(fmt(g["params"].get(k)) for k in names)
                     + f" | {pct(g['mean'])} | {pct(g['std'])} | {g['n']} | {', '.join(map(str, g['trials']))} |")
    return lines + [""]
