"""Stage 3, the I/O half: load a run and a feature store, check they fit, evaluate, and write the report.

    REPORT_DIR/report.json     the dict regtok.evaluate.evaluate returns (layout in issue 6 / the README)
    REPORT_DIR/report.md       markdown tables, ready to paste into a paper draft
    REPORT_DIR/prefix.png      recall and probe scores against k (needs matplotlib; skipped with a notice)
    REPORT_DIR/embeddings.h5   with save_embeddings: /<modality>/k<k> (N, E) float32 shared embeddings, /keys
    REPORT_DIR/manifest.json   the eval manifest: inputs = the run and features manifests with their sha256
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.manifest import (
    environment,
    file_record,
    input_ref,
    manifest_path,
    new_manifest,
    read_manifest,
    resolve_path,
    write_json_atomic,
    write_manifest,
)
from regtok.distributed import resolve_device
from regtok.errors import RegtokError
from regtok.evaluate import EvalConfig, evaluate

DIRECTIONS = (("a_to_b", "→"), ("b_to_a", "←"))
METRIC_COLS = ("R@1", "R@5", "R@10", "median_rank", "mean_rank")
SHORT = {"median_rank": "MedR", "mean_rank": "MeanR"}


class StoreColumn:
    """One modality's features of one kind in a store, sliced lazily: ``col[a:b]`` → float16 array."""

    def __init__(self, store: Any, kind: str, modality: str) -> None:
        self.store, self.kind, self.modality = store, kind, modality
        t, d = store.shape(kind, modality)
        self.shape = (store.n, d) if kind == "pooled" else (store.n, t, d)

    def __len__(self) -> int:
        return self.store.n

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.store.read(self.kind, self.modality, rows)


def check_compatible(run: Any, store: Any, run_manifest: Path | None = None) -> None:
    """RegtokError unless the store has the run's modalities, feature kind, dims and encoder specs.

    Encoder specs are compared with the features manifest the run was trained on, found through the run
    manifest (``run_manifest``) when that file and its input are still readable.
    """
    mods = tuple(run.model.modalities)
    if set(mods) != set(store.modalities):
        raise RegtokError(f"features hold modalities {list(store.modalities)}, the run was trained on {list(mods)}")
    if not store.has(run.feature_kind):
        raise RegtokError(f"the run uses {run.feature_kind} features, the store holds only "
                          f"{store.manifest.get('feature_kinds')}")
    for m in mods:
        expected, got = tuple(run.model.inputs[m]), tuple(store.shape(run.feature_kind, m))
        if expected != got:
            raise RegtokError(f"{m} {run.feature_kind} features are {got} (tokens, dim) here, "
                              f"the run expects {expected}")
    trained = _train_features_manifest(run_manifest) if run_manifest is not None else None
    if trained is None:
        return
    for m in mods:
        spec_run = (trained.get("encoders") or {}).get(m, {}).get("spec")
        spec_eval = (store.manifest.get("encoders") or {}).get(m, {}).get("spec")
        if spec_run is not None and spec_run != spec_eval:
            raise RegtokError(f"{m} encoder differs: the run was trained on {spec_run!r}, these features are "
                              f"from {spec_eval!r}")


def _train_features_manifest(run_manifest: Path) -> dict | None:
    """The features manifest the run was trained on, when the run manifest points at a readable one."""
    if not run_manifest.is_file():
        return None
    for ref in read_manifest(run_manifest, kind="run").get("inputs", []):
        path = resolve_path(run_manifest, ref["path"])
        if ref.get("role") == "features" and path.is_file():
            return read_manifest(path, kind="features")
    return None


class EmbeddingWriter:
    """Receives (modality, k, (N, E)) from evaluate and writes embeddings.h5 under a temporary name."""

    def __init__(self, path: Path, keys: list[str]) -> None:
        import h5py

        self.path, self.tmp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.file = h5py.File(self.tmp, "w")
        self.file.create_dataset("keys", data=np.array(keys, dtype=object), dtype=h5py.string_dtype("utf-8"))

    def __call__(self, modality: str, k: int, emb: np.ndarray) -> None:
        self.file.create_dataset(f"{modality}/k{k}", data=np.asarray(emb, dtype=np.float32))

    def close(self) -> Path:
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path


def run_eval(run_dir: str | os.PathLike, features: str | os.PathLike, out_dir: str | os.PathLike, cfg: EvalConfig,
             *, save_embeddings: bool = False, command: list[str] | None = None,
             console: Console | None = None) -> dict[str, Any]:
    """The whole `regtok eval` stage; returns the report dict after writing every file."""
    from pipeline.runs import load_run
    from pipeline.store import open_store

    t0 = time.perf_counter()
    console = console or Console(stderr=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir)
    run_mpath = manifest_path(Path(run_dir))
    store = open_store(features)
    check_compatible(run, store, run_mpath)
    kind = run.feature_kind
    cols = {m: StoreColumn(store, kind, m) for m in run.model.modalities}
    pooled = cols if kind == "pooled" else {m: StoreColumn(store, "pooled", m) for m in run.model.modalities}
    sink = EmbeddingWriter(out / "embeddings.h5", store.keys()) if save_embeddings else None
    with console.status("evaluating") as status:
        report = evaluate(run.model, cols, store.labels(), store.manifest.get("labels") or {}, cfg, pooled=pooled,
                          embeddings_sink=sink, log=lambda msg: status.update(f"evaluating: {msg}"))
    report["feature_kind"] = kind
    written = write_report_files(report, out, console)
    if sink is not None:
        written.append(sink.close())
    print_table(report, console)
    inputs = [input_ref("features", manifest_path(features), out)]
    inputs.insert(0, input_ref("run", run_mpath, out) if run_mpath.is_file() else
                  input_ref("run_config", Path(run_dir) / "config.json", out))
    device = str(resolve_device(cfg.device))
    manifest = new_manifest(
        "eval", command=command, config=dataclasses.asdict(cfg), inputs=inputs,
        outputs={"files": [file_record(p, out) for p in written]}, environment_=environment(device),
        timings={"seconds": round(time.perf_counter() - t0, 3)}, samples=report["n"],
        modalities=report["modalities"], feature_kind=kind, run_step=getattr(run, "step", None))
    write_manifest(out / "manifest.json", manifest)
    return report


def write_report_files(report: dict[str, Any], out: Path, console: Console | None = None) -> list[Path]:
    """report.json, report.md and (with matplotlib) prefix.png; returns the paths written."""
    paths = [out / "report.json", out / "report.md"]
    write_json_atomic(paths[0], report)
    paths[1].write_text(render_markdown(report))
    png = plot_prefix(report, out / "prefix.png")
    if png is None:
        (console or Console(stderr=True)).print("[yellow]matplotlib is not installed: prefix.png skipped "
                                                "(pip install 'regtok[plot]')")
    else:
        paths.append(png)
    return paths


def retrieval_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, {"a_to_b", "b_to_a"}) rows: one per shared prefix k, per flow step count, raw pooled, chance."""
    rows = [(f"k={r['k']}", r) for r in report["retrieval"]]
    rows += [(f"flow k={f['k']} s={f['steps']}", f) for f in report.get("flow", [])]
    base = report.get("baselines", {})
    if "a_to_b" in base.get("raw_pooled", {}):
        rows.append(("raw pooled", base["raw_pooled"]))
    if "chance" in base:
        rows.append(("chance", base["chance"]))
    return rows


def _fmt(metric: str, value: Any) -> str:
    if value is None:
        return "—"
    if metric.startswith("R@") or metric == "accuracy":
        return f"{100 * value:.1f}"
    if metric.endswith("_rank"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def render_markdown(report: dict[str, Any]) -> str:
    """The report's tables in GitHub markdown."""
    a, b = report["modalities"]
    lines = [f"# regtok eval: {a} ↔ {b}", "", f"N = {report['n']} paired samples (the whole split is the gallery); "
             f"recalls in %; rows k = shared-register prefix; tie rule: {report.get('tie_rule', '?')}.", "",
             "## Retrieval", ""]
    heads = [f"{a}→{b} {SHORT.get(c, c)}" for c in METRIC_COLS] + [f"{b}→{a} {SHORT.get(c, c)}" for c in METRIC_COLS]
    lines += [_md_row(["", *heads]), _md_row(["---"] * (len(heads) + 1))]
    for label, r in retrieval_rows(report):
        lines.append(_md_row([label] + [_fmt(c, r[d][c]) for d, _ in DIRECTIONS for c in METRIC_COLS]))
    raw = report.get("baselines", {}).get("raw_pooled", {})
    if "skipped" in raw:
        lines += ["", f"Raw pooled baseline: skipped ({raw['skipped']})."]
    lines += ["", *_md_probes(report), "", *_md_reconstruction(report)]
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_probes(report: dict[str, Any]) -> list[str]:
    split = report.get("probe_split", {})
    ks = report.get("prefixes", {}).get("probes") or sorted({p["k"] for p in report["probes"]})
    lines = ["## Prefix probes", "", f"Linear (ridge) probes on {split.get('feature', 'register means')}; fit on "
             f"{split.get('train', '?')} rows, scored on {split.get('test', '?')} held-out rows of this split "
             "(accuracy in % for categorical labels, R² for continuous; — = empty group).", ""]
    if not report["probes"]:
        return lines + ["No label columns to probe."]
    lines += [_md_row(["label", "metric", "modality", "group", *[f"k={k}" for k in ks]]),
              _md_row(["---"] * (4 + len(ks)))]
    cells: dict[tuple, dict[int, Any]] = {}
    for p in report["probes"]:
        cells.setdefault((p["label"], p["metric"], p["modality"], p["group"]), {})[p["k"]] = p["value"]
    for (label, metric, m, g), by_k in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][2])):
        lines.append(_md_row([label, metric, m, g, *[_fmt(metric, by_k.get(k)) for k in ks]]))
    chance = {p["label"]: _fmt(p["metric"], p["chance"]) for p in report["probes"] if p.get("chance") is not None}
    if chance:
        lines += ["", "Constant predictor (train-part majority class or mean) on the same rows: "
                  + ", ".join(f"{label} {v}" for label, v in sorted(chance.items())) + "."]
    return lines


def _md_reconstruction(report: dict[str, Any]) -> list[str]:
    ks = sorted({r["k"] for r in report["reconstruction"]})
    lines = ["## Reconstruction cosine of the input feature from the k-prefix", "",
             _md_row(["modality", *[f"k={k}" for k in ks]]), _md_row(["---"] * (1 + len(ks)))]
    for m in report["modalities"]:
        by_k = {r["k"]: r["cosine"] for r in report["reconstruction"] if r["modality"] == m}
        lines.append(_md_row([m, *[f"{by_k[k]:.3f}" if k in by_k else "—" for k in ks]]))
    return lines


def print_table(report: dict[str, Any], console: Console) -> None:
    """The retrieval table (and a compact reconstruction line) with rich, on the given (stderr) console."""
    a, b = report["modalities"]
    table = Table(title=f"retrieval {a} → {b} and ←, N = {report['n']} (recall %)")
    table.add_column("shared", no_wrap=True)
    for _, arrow in DIRECTIONS:
        for c in ("R@1", "R@5", "R@10", "median_rank"):
            table.add_column(f"{arrow}{SHORT.get(c, c)}", justify="right", no_wrap=True)
    for label, r in retrieval_rows(report):
        table.add_row(label, *[_fmt(c, r[d][c]) for d, _ in DIRECTIONS for c in ("R@1", "R@5", "R@10", "median_rank")])
    console.print(table)
    rec = ", ".join(f"{r['modality']} k={r['k']}: {r['cosine']:.3f}" for r in report["reconstruction"])
    console.print(f"reconstruction cosine: {rec}")


def plot_prefix(report: dict[str, Any], path: Path) -> Path | None:
    """prefix.png: R@1 per direction against k, and each label's probe score per (modality, group) against k."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = sorted({p["label"] for p in report["probes"]})
    fig, axes = plt.subplots(1, 1 + len(labels), figsize=(4.5 * (1 + len(labels)), 3.6), squeeze=False)
    ax = axes[0, 0]
    ks = [r["k"] for r in report["retrieval"]]
    for d, arrow in DIRECTIONS:
        ax.plot(ks, [r[d]["R@1"] for r in report["retrieval"]], marker="o", label=f"{arrow} R@1")
    ax.axhline(report["baselines"]["chance"]["a_to_b"]["R@1"], ls="--", c="gray", label="chance")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="shared prefix k", ylabel="R@1", title="retrieval")
    ax.legend(fontsize=7)
    for ax, label in zip(axes[0, 1:], labels, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        metric = ""
        for p in report["probes"]:
            if p["label"] == label and p["value"] is not None:
                series.setdefault(f"{p['modality']}/{p['group']}", []).append((p["k"], p["value"]))
                metric = p["metric"]
        for name, pts in series.items():
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="prefix k", ylabel=metric, title=f"probe: {label}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def demo_summary(console: Console, root: Path) -> None:
    """Print the headline numbers of ``regtok demo``'s report and the path of every manifest under ``root``."""
    import json

    report = json.loads((root / "eval" / "report.json").read_text())
    rows = {r["k"]: r for r in report["retrieval"]}
    k_full, k_one = max(rows), min(rows)
    r1 = {k: (rows[k]["a_to_b"]["R@1"] + rows[k]["b_to_a"]["R@1"]) / 2 for k in (k_one, k_full)}
    chance = 1 / report["n"]
    console.rule("[bold]demo summary")
    console.print(f"cross-modal R@1 (mean of both directions, N = {report['n']}): "
                  f"{r1[k_full]:.1%} with {k_full} shared registers, {r1[k_one]:.1%} with {k_one}; chance {chance:.1%}")
    material = [p for p in report["probes"] if p["label"] == "material" and p["group"] == "shared"
                and p["k"] == k_full and p["value"] is not None]
    for p in material:
        console.print(f"material class from {p['modality']}'s {k_full} shared registers: {p['value']:.1%} accuracy "
                      f"(chance {p.get('chance', float('nan')):.1%})")
    console.print("manifests (regtok show / verify / rerun take any of them):")
    for stage in ("shards-train/dataset.json", "shards-test/dataset.json", "features-train/manifest.json",
                  "features-test/manifest.json", "run/manifest.json", "eval/manifest.json"):
        console.print(f"  {root / stage}")
    console.print(f"report: {root / 'eval' / 'report.md'}")
