"""What a sweep reports: report.json, report.md, sweep.png, best.yaml and the sweep manifest."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from regtok.config import TrainConfig, to_dict
from regtok.pipeline.space import Choices, Param, Range, diff_from_defaults, space_json, trial_config


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial (not the surplus ones a worker declined), best metric first; pruned ones by their last metric."""
    from optuna.trial import TrialState

    from regtok.pipeline.sweep_study import retried_from

    rows = []
    retried_as = {retried_from(t): t.number for t in study.get_trials(deepcopy=False)
                  if retried_from(t) is not None}
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus") or t.state == TrialState.WAITING:
            continue
        value = t.value if t.state == TrialState.COMPLETE else t.user_attrs.get("last_value")
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        rows.append({"number": t.number, "state": t.state.name.lower(), "value": value, "params": dict(t.params),
                     "epochs": t.user_attrs.get("epochs", len(t.intermediate_values) or None),
                     "seconds": t.user_attrs.get("seconds"), "path": t.user_attrs.get("path"),
                     "error": t.user_attrs.get("error"), "retry_of": retried_from(t),
                     "retried_as": retried_as.get(t.number)})
    rank = {"complete": 0, "pruned": 1, "running": 2, "fail": 3}
    rows.sort(key=lambda r: (rank.get(r["state"], 4), -(r["value"] if r["value"] is not None else -math.inf),
                             r["number"]))
    return rows


def write_outputs(out: Path, study: Any, scfg: Any, space: dict[str, Param], base: TrainConfig, url: str, *,
                  features: str | os.PathLike, val_features: str | os.PathLike | None, command: list[str] | None,
                  seconds: float) -> dict[str, Any]:
    """Write report.json, report.md, sweep.png (with matplotlib), best.yaml and manifest.json; the report."""
    from regtok.pipeline.manifest import (
        environment,
        file_record,
        input_ref,
        manifest_path,
        new_manifest,
        write_manifest,
    )
    from regtok.pipeline.sweep_study import safe_url

    rows = trial_rows(study)
    complete = [r for r in rows if r["state"] == "complete" and r["value"] is not None]
    best = complete[0] if complete else None
    report = {"study": scfg.study, "storage": safe_url(url), "sampler": scfg.sampler, "metric": scfg.metric,
              "pruning": scfg.pruner if scfg.prune else None, "space": space_json(space),
              "counts": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")},
              "trials": rows, "best": best, "seconds": round(seconds, 3)}
    files = ["report.json", "report.md"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if best is not None:
        best_cfg = trial_config(base, best["params"])  # not the trial's files: it may have run on another machine
        report["best"]["config"] = diff_from_defaults(best_cfg)
        _write_best_yaml(out / "best.yaml", best, best_cfg, scfg.metric)
        files.append("best.yaml")
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(render_markdown(report, out))
    if plot_sweep(report, space, out / "sweep.png"):
        files.append("sweep.png")
    inputs = [input_ref("features", manifest_path(features), out)]
    if val_features is not None:
        inputs.append(input_ref("val_features", manifest_path(val_features), out))
    trials = [{k: r[k] for k in ("number", "state", "value", "params", "path", "epochs")} for r in rows]
    manifest = new_manifest("sweep", command=command, config={"sweep": asdict(scfg), "base": to_dict(base)},
                            inputs=inputs, outputs={"files": [file_record(out / f, out) for f in files]},
                            environment_=environment(base.device), timings={"seconds": round(seconds, 3)},
                            space=space_json(space), sampler=scfg.sampler, storage=safe_url(url), study=scfg.study,
                            metric=scfg.metric, trials=trials, best=None if best is None else best["number"])
    write_manifest(out / "manifest.json", manifest)
    return report


def _write_best_yaml(path: Path, best: dict[str, Any], cfg: TrainConfig, metric: str) -> None:
    import yaml

    diff = {k: v for k, v in diff_from_defaults(cfg).items() if k != "device"}
    header = (f"# The best trial of the sweep ({best['path']}): {metric} {best['value']:.4f}.\n"
              f"# Only what differs from the defaults: regtok train --features STORE --out RUN --config {path.name}\n")
    path.write_text(header + yaml.safe_dump(diff, sort_keys=False))


def fmt(value: Any) -> str:
    """A table cell: 4 decimals, scientific below 1e-3, an em dash for nothing."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def render_markdown(report: dict[str, Any], out: Path) -> str:
    names = list(report["space"])
    c = report["counts"]
    lines = [f"# Sweep {out.name}", "",
             f"Study `{report['study']}` in `{report['storage']}`; {report['sampler']} sampler, "
             f"pruning {report['pruning'] or 'off'}; trials scored by **{report['metric']}** on the validation "
             f"data after their last epoch (pruned trials: after the epoch they stopped).", "",
             f"{c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed"
             + (f", {c['running']} running" if c["running"] else "") + f"; {report['seconds']:.0f} s.", ""]
    best = report["best"]
    if best is not None:
        lines += [f"Best: trial {best['number']} ({best['path']}), {report['metric']} {best['value']:.4f}, with "
                  + ", ".join(f"{k}={best['params'][k]}" for k in names) + ". Its config is `best.yaml`.", ""]
    if (out / "sweep.png").is_file():
        lines += ["![the metric against each parameter](sweep.png)", ""]
    lines += ["| rank | trial | state | " + report["metric"] + " | epochs | s | " + " | ".join(names) + " |",
              "|" + "---|" * (6 + len(names))]
    for i, r in enumerate(report["trials"], 1):
        seconds = f"{r['seconds']:.1f}" if r["seconds"] else "—"
        lines.append(f"| {i} | {r['number']} | {r['state']} | {fmt(r['value'])} | {fmt(r['epochs'])} | {seconds} | "
                     + " | ".join(fmt(r["params"].get(k)) for k in names) + " |")
    failed = [r for r in report["trials"] if r["state"] == "fail"]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- trial {r['number']}: {r['error'] or 'no error recorded'}"
                  + (f"; retried as trial {r['retried_as']}" if r["retried_as"] is not None else "") for r in failed]
    return "\n".join(lines) + "\n"


def plot_sweep(report: dict[str, Any], space: dict[str, Param], path: Path) -> bool:
    """The metric against each swept parameter, one small panel per parameter; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    names = list(space)
    cols = min(3, len(names))
    rows_n = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.6 * cols, 2.9 * rows_n), squeeze=False, sharey=True)
    scored = [r for r in report["trials"] if r["value"] is not None and r["state"] in ("complete", "pruned")]
    rng = np.random.default_rng(0)
    for ax, name in zip(axes.flat, names, strict=False):
        param = space[name]
        for state, style in (("complete", {"color": "C0"}), ("pruned", {"facecolors": "none", "edgecolors": "C1"})):
            pts = [r for r in scored if r["state"] == state and name in r["params"]]
            if not pts:
                continue
            ys = [r["value"] for r in pts]
            if isinstance(param, Choices):
                xs = [list(map(str, param.values)).index(str(r["params"][name])) + rng.uniform(-0.12, 0.12)
                      for r in pts]
            else:
                xs = [r["params"][name] for r in pts]
            ax.scatter(xs, ys, s=22, label=state, **style)
        if isinstance(param, Choices):
            ax.set_xticks(range(len(param.values)), [str(v) for v in param.values], fontsize=8,
                          rotation=20 if max(len(str(v)) for v in param.values) > 8 else 0)
            ax.set_xlim(-0.5, len(param.values) - 0.5)
        elif isinstance(param, Range) and param.log:
            ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(report["metric"], fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper right", fontsize=8, frameon=False)
    best = report["best"]
    fig.suptitle(f"{report['metric']} per trial" + (f"; best {best['value']:.3f} (trial {best['number']})"
                                                    if best else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
