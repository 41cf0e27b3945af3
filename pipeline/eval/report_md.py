"""What a person reads from an eval report: report.md's tables, the headline sentence and the terminal table.

Pure functions of the report dict that :func:`regtok.pipeline.eval.stage.run_eval` builds; no files are read or
written here.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from regtok.pipeline.eval.plots import group_ks, n_shared_of

DIRECTIONS = (("a_to_b", "→"), ("b_to_a", "←"))
METRIC_COLS = ("R@1", "R@5", "R@10", "median_rank", "mean_rank")
SHORT = {"median_rank": "MedR", "mean_rank": "MeanR"}
MIN_PROBE_ROWS = 100  # below this a probe's score is too noisy to read without a warning


BASELINE_LABELS = {"cca": "linear CCA", "weighted_cca": "weighted CCA (ρ^p)", "start": "regtok at its start",
                   "linear_infonce": "linear InfoNCE head", "mlp_infonce": "MLP InfoNCE head"}


def _mean_r1(row: dict[str, Any]) -> float:
    return (row["a_to_b"]["R@1"] + row["b_to_a"]["R@1"]) / 2


def headline(report: dict[str, Any], by_transport: bool) -> dict[str, Any]:
    """regtok's full-prefix R@1 (mean of both directions) against the best baseline, with their ratio.

    A run ``by_transport`` (``ModelConfig.scored_by_transport``: flow_matching) is scored by its transported
    retrieval (the most Euler steps); other runs by the shared embeddings' direct retrieval at the largest shared
    prefix.
    """
    full = max(report["retrieval"], key=lambda r: r["k"])
    label, row = f"k={full['k']}", full
    flows = [f for f in report.get("flow", []) if f["k"] == full["k"]]
    if by_transport and flows:
        row = max(flows, key=lambda f: f["steps"])
        label = f"flow k={row['k']} s={row['steps']}"
    out: dict[str, Any] = {"regtok": _mean_r1(row), "regtok_row": label,
                           "chance": report["baselines"]["chance"]["a_to_b"]["R@1"]}
    linear = {name: v for name, v in report["baselines"].get("linear", {}).items() if name in BASELINE_LABELS}
    if linear:
        best = max(linear, key=lambda name: _mean_r1(linear[name]))
        out.update(best_baseline=best, baseline=_mean_r1(linear[best]))
        out["ratio"] = out["regtok"] / out["baseline"] if out["baseline"] > 0 else None
        out["below_baseline"] = out["regtok"] < out["baseline"]
    return out


def headline_sentence(h: dict[str, Any]) -> str:
    """One line a person reads: regtok's R@1, the best baseline's, their ratio, and a warning when below."""
    text = f"regtok R@1 {h['regtok']:.1%} ({h['regtok_row']}, mean of both directions; chance {h['chance']:.1%})"
    if "baseline" not in h:
        return text + "; no baseline was fitted"
    ratio = f"{h['ratio']:.2f}×" if h.get("ratio") is not None else "n/a"
    name = BASELINE_LABELS[h["best_baseline"]]
    text += f" against {h['baseline']:.1%} for the best baseline ({name}): {ratio}"
    if h["below_baseline"]:
        text += ". regtok is BELOW its best baseline on this data"
    return text


def retrieval_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, {"a_to_b", "b_to_a"}) rows: shared prefixes k, flow steps, baselines, raw pooled, chance."""
    rows = [(f"k={r['k']}", r) for r in report["retrieval"]]
    rows += [(f"flow k={f['k']} s={f['steps']}", f) for f in report.get("flow", [])]
    base = report.get("baselines", {})
    for name, label in BASELINE_LABELS.items():
        if "a_to_b" in base.get("linear", {}).get(name, {}):
            rows.append((label, base["linear"][name]))
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
    lines = [f"# regtok eval: {a} ↔ {b}", "", *_md_evaluated(report.get("evaluated")),
             f"N = {report['n']} paired samples (the whole split is the gallery); "
             f"recalls in %; rows k = shared-register prefix; tie rule: {report.get('tie_rule', '?')}. "
             + resolution_sentence(report["n"]), "",
             "## Retrieval", ""]
    heads = [f"{a}→{b} {SHORT.get(c, c)}" for c in METRIC_COLS] + [f"{b}→{a} {SHORT.get(c, c)}" for c in METRIC_COLS]
    lines += [_md_row(["", *heads]), _md_row(["---"] * (len(heads) + 1))]
    for label, r in retrieval_rows(report):
        lines.append(_md_row([label] + [_fmt(c, r[d][c]) for d, _ in DIRECTIONS for c in METRIC_COLS]))
    raw = report.get("baselines", {}).get("raw_pooled", {})
    if "skipped" in raw:
        lines += ["", f"Raw pooled baseline: skipped ({raw['skipped']})."]
    lines += ["", *_md_baselines(report)]
    lines += ["", *_md_probes(report), "", *_md_reconstruction(report)]
    if report.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in report["notes"]]]
    return "\n".join(lines) + "\n"


def _md_baselines(report: dict[str, Any]) -> list[str]:
    """The headline comparison and how each baseline was fitted."""
    linear = report.get("baselines", {}).get("linear")
    if linear is None:  # evaluate() without training rows fits no baseline
        return []
    lines = ["## Against the baselines", ""]
    if "headline" in report:
        lines += [headline_sentence(report["headline"]) + ".", ""]
    if "skipped" in linear:
        return lines + [f"Baselines: skipped ({linear['skipped']})."]
    rows = linear.get("train_rows") or {}
    same = {True: ", exactly the rows the run trained on", False: ", NOT the rows the run trained on"}.get(
        rows.get("same_as_run"), "")
    inputs = (linear.get("cca") or {}).get("fit", {}).get("input", "standardised and PCA-reduced on the training rows")
    lines.append(f"Fitted on `{linear.get('store', '?')}` ({rows.get('n', '?')} training rows{same}), scored on this "
                 f"split; inputs: {inputs}; every choice made on a validation part of them:")
    for name, label in BASELINE_LABELS.items():
        fit = linear.get(name, {}).get("fit", {})
        if fit:
            lines.append(f"- {label}: {_fit_text(name, fit)}")
    return lines


def _fit_text(name: str, fit: dict[str, Any]) -> str:
    """How one baseline was fitted, in a few words."""
    if name == "cca":
        ridges = fit.get("ridges_tried") or [0]
        return (f"ridge {fit.get('ridge'):g} (of {len(ridges)}, {min(ridges):g}–{max(ridges):g}), "
                f"{fit.get('components')} components (of 1–{max(fit.get('components_tried') or [0])}), validation "
                f"R@1 {fit.get('val_r1', 0):.3f} on {fit.get('val_rows')} rows; inputs {fit.get('input_dims')} dims")
    if name == "weighted_cca":
        return (f"{fit.get('directions')} canonical directions weighted by ρ^{fit.get('power', 0):g}, ridge "
                f"{fit.get('ridge', 0):g}, validation R@1 {fit.get('val_r1', 0):.3f}")
    if name == "start":
        source = {"start.safetensors": ", as the run saved it", "rebuilt": ", rebuilt as the trainer built it"}.get(
            fit.get("weights"), "")
        return f"the run's model before any step (its CCA start{source}), full shared prefix k={fit.get('k')}"
    kind = f"MLP (hidden {fit.get('hidden')}, dropout {fit.get('dropout'):g})" if fit.get("hidden") else "linear map"
    return (f"{kind} to {fit.get('embed_dim')}-d per modality, symmetric InfoNCE, lr {fit.get('lr'):g}, weight decay "
            f"{fit.get('weight_decay'):g}, batch {fit.get('batch_size')}, stopped early at epoch {fit.get('epoch')} "
            f"of {fit.get('epochs_run')} (validation R@1 {fit.get('val_r1', 0):.3f})")


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_probes(report: dict[str, Any]) -> list[str]:
    """One table per modality: a row per label (with the part it belongs to), a column per cell: the raw input,
    then each (register group, k) that adds information."""
    split = report.get("probe_split", {})
    n_shared = n_shared_of(report) if report["probes"] else None
    lines = ["## What each part holds", "",
             f"Linear (ridge) probes on {split.get('feature', 'the registers')}; fitted on {split.get('train', '?')} "
             f"rows ({split.get('source', 'a part of this split')}), scored on {split.get('test', '?')} rows of this "
             "split (accuracy in % for categorical labels, R² for continuous; chance = a constant predictor on the "
             "same rows; — = no score). Groups at prefix k, their registers concatenated: shared = registers "
             f"[0, min(k, n_shared)), private = [n_shared, k), all = [0, k), with n_shared = {n_shared}. "
             "A label's part (shared, or one modality's own) is what the store's label schema says.", ""]
    if not report["probes"]:
        return lines + ["No label columns to probe."]
    lines += _md_parts(report)
    warning = small_probe_warning(report)
    if warning:
        lines += [f"> **Warning:** {warning}", ""]
    cols = [(g, k) for g, gks in group_ks(report).items() for k in gks]
    cells = {(p["modality"], p["label"], p["group"], p["k"]): p for p in report["probes"]}
    labels = sorted({p["label"] for p in report["probes"]})
    parts = report.get("label_parts", {})
    heads = ["raw input" if g == "raw" else f"{g} k={k}" for g, k in cols]
    for m in report["modalities"]:
        lines += [f"### {m}", "", _md_row(["label", "part", "chance", *heads]), _md_row(["---"] * (3 + len(cols)))]
        for label in labels:
            found = [p for (pm, pl, _, _), p in cells.items() if pm == m and pl == label]
            metric = found[0]["metric"] if found else "accuracy"
            chance = next((p["chance"] for p in found if p.get("chance") is not None), None)
            values = [cells.get((m, label, g, k), {}).get("value") for g, k in cols]
            unit = "acc %" if metric == "accuracy" else "R²"
            lines.append(_md_row([f"{label} ({unit})", parts.get(label) or "—", _fmt(metric, chance),
                                  *[_fmt(metric, v) for v in values]]))
        lines.append("")
    return lines[:-1]


def _md_parts(report: dict[str, Any]) -> list[str]:
    """Leakage, complementarity and what the shared part keeps, per modality, with the labels they are over."""
    parts = report.get("parts")
    if not parts:
        return []
    lines = [f"Leakage: a modality's own factors read from its shared part (k = {parts['k_shared']}), as a share of "
             f"what the raw input gives (0 = none leaks). Complementarity: the same factors from the private part "
             f"(k = {parts['k_private']}; 1 = all kept). Shared kept: the shared factors from the shared part. "
             "Each is Σ max(0, part score) / Σ raw score over the labels the raw input decodes (score = R², or "
             f"accuracy above chance as a share of the way to 1; labels with a raw score under "
             f"{parts['min_raw_score']} are left out).", "",
             _md_row(["modality", "leakage ↓", "complementarity ↑", "shared kept ↑", "over"]),
             _md_row(["---"] * 5)]
    for m in report["modalities"]:
        used = parts["labels"].get(m, {})
        over = "; ".join(f"{key}: {', '.join(v)}" for key, v in used.items() if v) or "no labels with a part"
        lines.append(_md_row([m, *[_ratio(parts[key].get(m)) for key in ("leakage", "complementarity",
                                                                           "shared_kept")], over]))
    return lines + [""]


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def small_probe_warning(report: dict[str, Any]) -> str | None:
    """A sentence naming the labels whose probes were fitted on fewer than MIN_PROBE_ROWS rows, else None."""
    rows: dict[str, int] = {}
    for p in report["probes"]:
        if p.get("n_train") is not None:
            rows[p["label"]] = min(rows.get(p["label"], p["n_train"]), p["n_train"])
    if not rows and report.get("probe_split", {}).get("train") is not None and report["probes"]:
        rows = {p["label"]: report["probe_split"]["train"] for p in report["probes"]}
    small = {label: n for label, n in sorted(rows.items()) if n < MIN_PROBE_ROWS}
    if not small:
        return None
    listed = ", ".join(f"{label} ({n})" for label, n in small.items())
    split = report.get("probe_split", {})
    capped = (split.get("rows") is not None and split["rows"] < report.get("n", 0)) or \
        split.get("train_available", 0) > split.get("train", 0)  # a subset: more rows exist
    more = "raise --probe-max-samples (the probes used a subset of this split)" if capped else \
        "evaluate on a larger split (the probes already use all of this one)"
    return f"probes fitted on fewer than {MIN_PROBE_ROWS} rows: {listed}. Their scores are noisy; {more}."


def _md_evaluated(ev: dict[str, Any] | None) -> list[str]:
    """What was evaluated: the run, its loss, preset and key config, the encoders, the stores and their N."""
    if not ev:
        return []
    diff = ", ".join(f"{k}={v}" for k, v in ev.get("differs_from_preset", {}).items()) or "nothing else"
    key = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in ev.get("key_config", {}).items())
    lines = ["## What was evaluated", "",
             f"- Run: `{ev['run']}`, weights `{ev.get('weights', '?')}` ({kept_weights_text(ev)})"
             + (f", trained by `{ev['command']}`" if ev.get("command") else ""),
             f"- Loss: **{ev.get('loss_type', '?')}** on {ev.get('feature_kind', '?')} features",
             f"- Config: preset `{ev.get('preset', '?')}` with {diff}; {key}"]
    enc = ", ".join(f"{m} `{e.get('spec', '?')}` (pooled {e.get('pooled_dim', '?')}"
                    + (f", tokens {'×'.join(map(str, e['token_shape']))}" if e.get("token_shape") else "") + ")"
                    for m, e in ev.get("encoders", {}).items())
    lines.append(f"- Encoders: {enc or 'not recorded'}")
    for role, title in (("train_store", "Training store"), ("val_store", "Validation store"),
                        ("eval_store", "Evaluation store")):
        st = ev.get(role)
        if st:
            used = _split_text(st)
            lines.append(f"- {title}: `{st.get('path') or 'not readable'}`, N = {st.get('n', '?')}{used}")
    return lines + [""]


def resolution_sentence(n: int) -> str:
    """How finely N queries resolve a recall: one query moves it by 1/N."""
    return f"With N = {n}, one query moves a recall by 1/N = {100 / n:.2g} %; differences below that are noise."


def kept_weights_text(ev: dict[str, Any]) -> str:
    """"kept after epoch 2 of 5, step 6": which epoch's weights were evaluated (epochs counted from 1)."""
    epoch, epochs = ev.get("epoch"), (ev.get("key_config") or {}).get("epochs")
    where = f"after epoch {epoch}" + (f" of {epochs}" if epochs else "") if epoch is not None else "epoch unknown"
    return f"{'kept' if ev.get('weights') == 'best.safetensors' else 'last'}, {where}, step {ev.get('step', '?')}"


def _split_text(st: dict[str, Any]) -> str:
    """" (180 rows trained on, 20 validated on: split seed 0, validation rows 3f2a…)" for a run that validated
    on part of its training store."""
    if st.get("train_rows") is None or st.get("val_rows") is None:
        return ""
    split = st.get("split") or {}
    which = (f": split seed {split.get('split_seed')}, validation rows {split['val_rows_sha256']}"
             if split.get("val_rows_sha256") else "")
    return f" ({st['train_rows']} rows trained on, {st['val_rows']} validated on{which})"


def _md_reconstruction(report: dict[str, Any]) -> list[str]:
    """The decoder's cosine per k beside its references: the per-position training mean and a ridge readout from the
    same k registers (fitted on the same rows as the probes)."""
    ks = sorted({r["k"] for r in report["reconstruction"]})
    lines = ["## Reconstruction of the input feature from the k-prefix", "",
             "Cosine between the standardised input (per token) and its reconstruction, on the probe rows of this "
             "split. References: the per-position mean of the training rows, and a ridge readout into the decoder's "
             "code space from the same k registers.", "",
             _md_row(["modality", "", *[f"k={k}" for k in ks]]), _md_row(["---"] * (2 + len(ks)))]
    names = (("cosine", "decoder"), ("mean_reference", "per-position mean"), ("ridge_reference", "ridge readout"))
    for m in report["modalities"]:
        by_k = {r["k"]: r for r in report["reconstruction"] if r["modality"] == m}
        for key, name in names:
            if any(key in r for r in by_k.values()):
                lines.append(_md_row([m, name, *[f"{by_k[k][key]:.3f}" if k in by_k else "—" for k in ks]]))
    return lines


def print_table(report: dict[str, Any], console: Console) -> None:
    """The retrieval table (and a compact reconstruction line) with rich, on the given (stderr) console."""
    a, b = report["modalities"]
    step = f"one query = {100 / report['n']:.2g} %"
    table = Table(title=f"retrieval {a} → {b} and ←, N = {report['n']} (recall %; {step})")
    table.add_column("shared", no_wrap=True)
    for _, arrow in DIRECTIONS:
        for c in ("R@1", "R@5", "R@10", "median_rank"):
            table.add_column(f"{arrow}{SHORT.get(c, c)}", justify="right", no_wrap=True)
    for label, r in retrieval_rows(report):
        table.add_row(label, *[_fmt(c, r[d][c]) for d, _ in DIRECTIONS for c in ("R@1", "R@5", "R@10", "median_rank")])
    console.print(table)
    if "headline" in report:
        style = "bold red" if report["headline"].get("below_baseline") else "bold"
        console.print(headline_sentence(report["headline"]), style=style)
    warning = small_probe_warning(report) if report["probes"] else None
    if warning:
        console.print(f"warning: {warning}", style="yellow")
    console.print(reconstruction_line(report))
    parts = report.get("parts")
    if parts:
        console.print(parts_line(report))


def reconstruction_line(report: dict[str, Any]) -> str:
    """The reconstruction cosine at the full prefix per modality, beside its two references."""
    rows = {r["modality"]: r for r in sorted(report["reconstruction"], key=lambda r: r["k"])}  # the largest k
    text = ", ".join(f"{m} {r['cosine']:.3f}" + (f" (ridge readout {r['ridge_reference']:.3f}, per-position mean "
                                                 f"{r['mean_reference']:.3f})" if "ridge_reference" in r else "")
                     for m, r in rows.items())
    k = max(r["k"] for r in report["reconstruction"])
    return f"reconstruction cosine at k={k}: {text}"


def parts_line(report: dict[str, Any]) -> str:
    """Leakage and complementarity per modality in one line."""
    parts = report["parts"]
    return "; ".join(f"{m}: leakage {_ratio(parts['leakage'].get(m))}, complementarity "
                     f"{_ratio(parts['complementarity'].get(m))}, shared kept {_ratio(parts['shared_kept'].get(m))}"
                     for m in report["modalities"])
