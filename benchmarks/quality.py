"""Learning quality: regtok against every baseline, on unseen surfaces, with random and trained encoders, over seeds.

    python benchmarks/quality.py [--work DIR] [--quick] [--seeds 0,1,2] [--encoders random,trained]
                                 [--kinds pooled,tokens] [--losses contrastive,flow_matching,combined]

Stores: 2,000 training pairs of six material families (synth seed 41; 10 % of them validate), and two test splits
of 1,000 pairs: ``same`` (a fresh draw of those families, seed 42) and ``unseen`` (weave and gravel, which no
training split holds, seed 43). Each split is extracted with two encoder pairs:

- ``random``: the tiny random-init encoders (``tiny:0``, ``tiny:1``), whose cross-modal structure is linear;
- ``trained``: small Stage-1 encoders trained by ``benchmarks/stage1.py`` on a disjoint split (``timm:test_vit``).

Per encoder pair, feature kind, loss type and seed (the run's seed and the evaluation's), it trains the ``tiny``
preset (plus ``default`` on pooled features with the contrastive loss) and evaluates on both test splits with
every baseline (linear CCA, weighted CCA, the model at its start, linear and MLP InfoNCE heads; fitted once per
encoder pair, kind and seed, on the run's training rows). Each cell reports mean ± std over the seeds of:
regtok's full-prefix R@1 (transported for flow_matching) and each baseline's; whether R@1 and reconstruction are
non-decreasing in k; leakage, complementarity and the shared part's material accuracy against the raw input's;
reconstruction at the full prefix beside its ridge readout and per-position mean references. Then, per encoder
pair and kind, whether the testbed discriminates: CCA below 0.8, and the MLP head, CCA and regtok apart by more than
their seed spread. ``--quick``: contrastive only, two seeds. Tables go to stdout and WORK/quality.md, numbers to
WORK/quality.json.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # stage1.py beside this file

TRAIN_FAMILIES = ("grating", "knurl", "dots", "fractal", "scratched", "perforated")
UNSEEN_FAMILIES = ("weave", "gravel")
TESTS = ("same", "unseen")
BASELINES = ("cca", "weighted_cca", "start", "linear_infonce", "mlp_infonce")


def make_stores(work: Path, train_n: int, test_n: int, encoders: dict[str, dict[str, str]], log) -> dict:
    """Synthesise the three splits once and extract each with every encoder pair (kept when WORK has them)."""
    from regtok.pipeline.data.synth import synthesize
    from regtok.pipeline.extract.stage import ExtractConfig, run_extract

    splits = {"train": (train_n, 41, TRAIN_FAMILIES), "same": (test_n, 42, TRAIN_FAMILIES),
              "unseen": (test_n, 43, UNSEEN_FAMILIES)}
    stores: dict = {}
    for name, (n, seed, families) in splits.items():
        shards = work / f"shards-{name}"
        if not (shards / "dataset.json").is_file():
            log(f"synth {name}: {n} pairs, seed {seed}, families {', '.join(families)}")
            synthesize(shards, n, max(1, n // 500), seed, 64, families=families, overwrite=True)
        for enc, specs in encoders.items():
            store = work / f"features-{enc}-{name}"
            if not (store / "manifest.json").is_file():
                log(f"extract {name} with the {enc} encoders")
                cfg = ExtractConfig.from_dict({"shards": str(shards / "dataset.json"), "out": str(store),
                                               "encoders": specs, "tokens": True, "batch_size": 128})
                run_extract(cfg, command=["benchmarks/quality.py"], show_progress=False, overwrite=True)
            stores.setdefault(enc, {})[name] = store
    return stores


def r1(row: dict) -> float:
    return (row["a_to_b"]["R@1"] + row["b_to_a"]["R@1"]) / 2


def measure(report: dict, loss: str) -> dict:
    """The numbers a cell keeps from one eval report."""
    per_k = {r["k"]: r1(r) for r in report["retrieval"]}
    flows = [f for f in report.get("flow", []) if f["steps"] == max(f["steps"] for f in report["flow"])]
    if loss == "flow_matching" and flows:
        per_k.update({f["k"]: r1(f) for f in flows})  # transported retrieval where the report has it
    ks = sorted(per_k)
    recon = {m: sorted((r["k"], r["cosine"], r["ridge_reference"], r["mean_reference"])
                       for r in report["reconstruction"] if r["modality"] == m) for m in report["modalities"]}
    parts = report.get("parts", {})
    probes = {(p["modality"], p["group"], p["k"], p["label"]): p["value"] for p in report["probes"]}
    out = {"regtok": per_k[ks[-1]], "per_k": per_k,
           "monotone": all(per_k[a] <= per_k[b] for a, b in zip(ks, ks[1:], strict=False)),
           "recon_monotone": all(x[1] <= y[1] + 1e-3 for rows in recon.values()  # up to held-out noise
                                 for x, y in zip(rows, rows[1:], strict=False))}
    for m, rows in recon.items():
        out[f"recon/{m}"], out[f"ridge/{m}"], out[f"mean_ref/{m}"] = rows[-1][1], rows[-1][2], rows[-1][3]
        out[f"recon_over_mean/{m}"] = min(x[1] - x[3] for x in rows)  # > 0: above the per-position mean at every k
        for key in ("leakage", "complementarity"):
            if parts.get(key, {}).get(m) is not None:
                out[f"{key}/{m}"] = parts[key][m]
        shared, raw = probes.get((m, "shared", parts.get("k_shared"), "material")), probes.get((m, "raw", None,
                                                                                              "material"))
        if shared is not None and raw is not None:
            out[f"material_shared/{m}"], out[f"material_raw/{m}"] = shared, raw
    for name, row in report["baselines"].get("linear", {}).items():
        if name in BASELINES and "a_to_b" in row:
            out[f"baseline/{name}"] = r1(row)
    return out


def run_cell(stores: dict, work: Path, enc: str, kind: str, loss: str, preset: str, seed: int, baselines: dict,
             log, cached_only: bool = False) -> dict | None:
    """Train one run and evaluate it on both test splits; the baselines are fitted once per (enc, kind, seed).
    A run and a report that WORK already holds are read, not made again; with ``cached_only`` a cell that WORK
    does not hold whole is skipped (None)."""
    from rich.console import Console

    from regtok.config import EvalConfig, TrainConfig, resolve
    from regtok.pipeline.eval.stage import run_eval
    from regtok.pipeline.train.stage import train_run

    name = f"{enc}-{preset}-{kind}-{loss}-s{seed}"
    run_dir = work / "runs" / name
    saved = {test: work / "reports" / name / test / "report.json" for test in TESTS}
    if cached_only and not all(f.is_file() for f in saved.values()):
        return None
    if not (run_dir / "manifest.json").is_file():
        cfg = resolve(TrainConfig, preset, {"feature_kind": kind, "seed": seed, "model": {"loss_type": loss}})
        train_run(stores[enc]["train"], run_dir, cfg, command=["benchmarks/quality.py", name])
    out = {}
    for test in TESTS:
        key = (enc, kind, seed, test)
        prefixes = (1, 2, 4, 8) if preset == "tiny" else (1, 2, 4, 8, 16, 32)
        ecfg = EvalConfig(prefixes=prefixes, flow_steps=(16,), probe_max_samples=2000, seed=seed,
                          baselines=key not in baselines)
        if saved[test].is_file():
            report = json.loads(saved[test].read_text())
        else:
            report = run_eval(run_dir, stores[enc][test], work / "reports" / name / test, ecfg,
                              console=Console(file=io.StringIO()), command=["benchmarks/quality.py", name, test],
                              overwrite=True)
        if key not in baselines:
            baselines[key] = report["baselines"]["linear"]
        report["baselines"]["linear"] = baselines[key]
        out[test] = measure(report, loss)
        best = max((v, n) for n, v in out[test].items() if n.startswith("baseline/"))
        log(f"{name:44s} {test:6s} regtok {out[test]['regtok']:.3f}  best baseline {best[0]:.3f} "
            f"({best[1].split('/')[1]})  leakage {out[test].get('leakage/vision', float('nan')):.2f}/"
            f"{out[test].get('leakage/tactile', float('nan')):.2f}")
    return out


def summarise(cells: list[dict]) -> dict:
    """{metric: (mean, std, n)} over the seeds' cells (booleans: the fraction true)."""
    keys = sorted({k for c in cells for k, v in c.items() if isinstance(v, bool | float | int)})
    out = {}
    for k in keys:
        vals = [float(c[k]) for c in cells if k in c]
        out[k] = (statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
    return out


def fmt(s: dict, key: str, digits: int = 3) -> str:
    if key not in s:
        return "—"
    mean, std, n = s[key]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def tables(results: dict) -> str:
    """Two markdown tables: retrieval against every baseline, and what each part holds."""
    head = ["| encoders | preset | features | loss | test | regtok R@1 | " + " | ".join(BASELINES)
            + " | R@1 ↑ in k |", "|" + " --- |" * (6 + len(BASELINES) + 1)]
    parts = ["| encoders | preset | features | loss | test | leakage v / t ↓ | complementarity v / t ↑ | "
             "material shared / raw (v) | material shared / raw (t) | recon v (ridge, mean) | "
             "recon t (ridge, mean) | recon ↑ in k, ≥ mean |", "|" + " --- |" * 12]
    for name, tests in results.items():
        enc, preset, kind, loss = name.split("|")
        for test, s in tests.items():
            cells = [enc, preset, kind, loss, test]
            head.append("| " + " | ".join([*cells, fmt(s, "regtok"), *[fmt(s, f"baseline/{b}") for b in BASELINES],
                                           fmt(s, "monotone", 2)]) + " |")
            recon = [f"{fmt(s, f'recon/{m}')} ({fmt(s, f'ridge/{m}')}, {fmt(s, f'mean_ref/{m}')})"
                     for m in ("vision", "tactile")]
            ok = "yes" if s.get("recon_monotone", (0,))[0] == 1 and min(
                s.get("recon_over_mean/vision", (-1,))[0], s.get("recon_over_mean/tactile", (-1,))[0]) > 0 else "NO"
            parts.append("| " + " | ".join([*cells, f"{fmt(s, 'leakage/vision', 2)} / {fmt(s, 'leakage/tactile', 2)}",
                                            f"{fmt(s, 'complementarity/vision', 2)} / "
                                            f"{fmt(s, 'complementarity/tactile', 2)}",
                                            f"{fmt(s, 'material_shared/vision')} / {fmt(s, 'material_raw/vision')}",
                                            f"{fmt(s, 'material_shared/tactile')} / {fmt(s, 'material_raw/tactile')}",
                                            *recon, ok]) + " |")
    return "\n".join(["### Retrieval: R@1, mean of both directions (± std over seeds)", "", *head, "",
                      "### What each part holds, and reconstruction at the full prefix", "", *parts])


def discrimination(results: dict) -> list[str]:
    """Per encoder pair, kind and test: CCA below 0.8, and MLP head, CCA and regtok apart beyond their spread."""
    lines = []
    for name, tests in results.items():
        enc, preset, kind, loss = name.split("|")
        if preset != "tiny" or loss != "contrastive":
            continue
        for test, s in tests.items():
            vals = {k: s[k] for k in ("regtok", "baseline/cca", "baseline/mlp_infonce") if k in s}
            pairs = [(a, b) for a in vals for b in vals if a < b]
            apart = all(abs(vals[a][0] - vals[b][0]) > vals[a][1] + vals[b][1] for a, b in pairs)
            cca = vals.get("baseline/cca", (float("nan"),))[0]
            lines.append(f"- {enc} encoders, {kind}, {test}: CCA {cca:.3f} ({'below' if cca < 0.8 else 'NOT below'} "
                         f"0.8); regtok, CCA and the MLP head {'apart' if apart else 'NOT apart'} beyond their "
                         f"seed spread (" + ", ".join(f"{k.split('/')[-1]} {v[0]:.3f} ± {v[1]:.3f}"
                                                      for k, v in vals.items()) + ")")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=None, help="Working directory [default: a new temporary one]")
    p.add_argument("--quick", action="store_true", help="Contrastive only, seeds 0 and 1.")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--encoders", default="random,trained")
    p.add_argument("--kinds", default="pooled,tokens")
    p.add_argument("--losses", default="contrastive,flow_matching,combined")
    p.add_argument("--no-default", action="store_true", help="Skip the default preset's cells.")
    p.add_argument("--presets", default="tiny,default", help="tiny (every kind, loss), default (pooled, contrastive)")
    p.add_argument("--train-samples", type=int, default=2000)
    p.add_argument("--test-samples", type=int, default=1000)
    p.add_argument("--from-cache", action="store_true",
                   help="Only the tables of the cells WORK holds (the runs and reports of an earlier, stopped run)")
    args = p.parse_args()
    from regtok.config import LOSS_TYPES, PRESETS

    known = {"--encoders": ("random", "trained"), "--kinds": ("pooled", "tokens"), "--presets": tuple(PRESETS),
             "--losses": tuple(LOSS_TYPES)}
    for flag, names in known.items():
        unknown = sorted(set(getattr(args, flag[2:]).split(",")) - set(names))
        if unknown:
            p.error(f"{flag}: unknown {', '.join(unknown)} (known: {', '.join(names)})")
    seeds = [0, 1] if args.quick else [int(s) for s in args.seeds.split(",")]
    losses = ["contrastive"] if args.quick else args.losses.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="regtok-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)  # noqa: E731
    encoders = {"random": {"vision": "tiny:0", "tactile": "tiny:1"}}
    if "trained" in args.encoders:
        import stage1

        specs = stage1.ensure(work / "stage1", log)
        encoders["trained"] = specs
    encoders = {e: s for e, s in encoders.items() if e in args.encoders.split(",")}
    stores = make_stores(work, args.train_samples, args.test_samples, encoders, log)
    presets = args.presets.split(",")
    plan = [(enc, "tiny", kind, loss) for enc in encoders for kind in args.kinds.split(",") for loss in losses
            if "tiny" in presets]
    if not args.quick and not args.no_default and "pooled" in args.kinds and "default" in presets:
        plan += [(enc, "default", "pooled", "contrastive") for enc in encoders]
    results: dict = {}
    baselines: dict = {}
    for enc, preset, kind, loss in plan:
        runs = [run_cell(stores, work, enc, kind, loss, preset, seed, baselines, log, args.from_cache)
                for seed in seeds]
        runs = [r for r in runs if r is not None]
        if runs:
            results["|".join((enc, preset, kind, loss))] = {t: summarise([r[t] for r in runs]) for t in TESTS}
    md = tables(results) + "\n\n### Does the testbed discriminate?\n\n" + "\n".join(discrimination(results))
    summary = f"{len(plan)} cells × {len(seeds)} seeds × {len(TESTS)} test splits; {time.perf_counter() - t0:.0f} s"
    (work / "quality.md").write_text(md + "\n\n" + summary + "\n")
    (work / "quality.json").write_text(json.dumps(results, indent=1))
    print(md)
    print(summary)
    print(f"written: {work / 'quality.md'}, {work / 'quality.json'}")


if __name__ == "__main__":
    main()
