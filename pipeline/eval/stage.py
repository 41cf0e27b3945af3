"""The eval stage: a run and a held-out feature store → a report directory.

:func:`run_eval` loads the run and the store and checks they fit (:func:`check_compatible`), evaluates
(:func:`regtok.evaluate.evaluate`, whose probes, reconstruction references and, for a model with a read, linear
baselines are fitted on the run's training rows, :func:`fit_store`), completes the baselines (:func:`fit_baselines`:
the model at its start, and the linear ones for a model without a read), then writes the report files
(:mod:`regtok.pipeline.eval.report`) and the eval manifest.

    REPORT_DIR/report.json     the dict regtok.evaluate.evaluate returns, with baselines, headline and "evaluated"
    REPORT_DIR/report.md       what was evaluated, then markdown tables ready to paste (pipeline/eval/report_md.py)
    REPORT_DIR/prefix.png      retrieval R@1 against k and probe heatmaps (pipeline/eval/plots.py; needs matplotlib)
    REPORT_DIR/embeddings.h5   with save_embeddings: /<modality>/k<k> (N, E) float32 shared embeddings, /keys
    REPORT_DIR/manifest.json   the eval manifest: inputs = the run and features manifests with their sha256
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from regtok.data import row_shape, rows_digest
from regtok.distributed import resolve_device
from regtok.errors import RegtokError
from regtok.evaluate import EvalConfig, evaluate, subset
from regtok.pipeline.embed import EmbeddingWriter
from regtok.pipeline.eval.report import write_report_files
from regtok.pipeline.eval.report_md import headline, print_table
from regtok.pipeline.extract import check_compatible
from regtok.pipeline.manifests.manifest import (
    environment,
    file_record,
    input_ref,
    manifest_path,
    new_manifest,
    read_manifest,
    write_manifest,
)
from regtok.pipeline.runtime.console import stderr_console
from regtok.pipeline.train import run_input, training_store_manifest

# How eval computes what it reports, recorded in report.json as "eval_method" (reports without it are 1), so a rerun
# of an older report says why its numbers differ before listing them.
EVAL_METHODS = {1: "the linear baselines on a PCA fitted in eval, the start rebuilt",
                2: "the linear baselines on the run's read codes, the start from start.safetensors"}
EVAL_METHOD = 2


class StoreColumn:
    """One modality's features of one kind in a store, sliced lazily: ``col[a:b]`` → float16 array."""

    def __init__(self, store: Any, kind: str, modality: str) -> None:
        self.store, self.kind, self.modality = store, kind, modality
        self.shape = (store.n, *row_shape(kind, *store.shape(kind, modality)))

    def __len__(self) -> int:
        return self.store.n

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.store.read(self.kind, self.modality, rows)


def baseline_training_rows(run: Any, store: Any, run_manifest: Path, same_store: bool) -> np.ndarray:
    """The rows of the baselines' training store that the run itself trained on.

    A run validated on a part of its training store (no ``val_features``) trained on the rest: the baselines
    use exactly that rest, so neither side sees the other's validation rows. Another store is used whole.
    """
    from regtok.data import split_rows

    if same_store and run_input(run_manifest, "val_features") is None:
        return split_rows(store.n, run.train_config.val_fraction, run.train_config.split_seed)[0]
    return np.arange(store.n)


class RowsColumn(StoreColumn):
    """One modality's features of one kind at given rows of a store: ``col[a:b]`` → rows[a:b] as float16."""

    def __init__(self, store: Any, kind: str, modality: str, rows: np.ndarray) -> None:
        super().__init__(store, kind, modality)
        self.rows = rows
        self.shape = (len(rows), *self.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.store.read(self.kind, self.modality, self.rows[rows])


@dataclass
class FitStore:
    """The store and rows the baselines, probes and reconstruction references are fitted on."""

    store: Any
    rows: np.ndarray
    path: Path
    source: str
    rows_record: dict[str, Any]  # n, sha256 and whether they are the rows the run recorded training on


def fit_store(run: Any, eval_store: Any, train_store_dir: Path | None, run_manifest: Path) -> FitStore | str:
    """The run's training rows (or the whole of ``train_store_dir``); a sentence saying why not when unreadable."""
    from regtok.pipeline.extract import open_store

    found = run_input(run_manifest, "features")
    if train_store_dir is None:
        if found is None:
            return "the run manifest names no readable training store; pass --fit-features"
        train_store_dir = found.parent
    same_store = found is not None and found.parent.resolve() == Path(train_store_dir).resolve()
    store = open_store(train_store_dir)
    kind, mods = run.feature_kind, tuple(run.model.modalities)
    if set(mods) != set(store.modalities) or not store.has(kind) or any(
            tuple(store.shape(kind, m)) != tuple(eval_store.shape(kind, m)) for m in mods):
        raise RegtokError(f"fit features {train_store_dir} do not match the evaluated store (modalities, "
                          f"{kind} features and dims must be the same)")
    rows = baseline_training_rows(run, store, run_manifest, same_store)
    recorded = ((run.manifest or {}).get("split") or {}).get("train_rows_sha256")
    rows_record = {"n": len(rows), "sha256": rows_digest(rows), "same_as_run": recorded == rows_digest(rows)
                   if recorded and same_store else None}
    source = "the run's training rows" if same_store else "the named store"
    return FitStore(store, rows, Path(train_store_dir), f"{source} ({len(rows)} of {train_store_dir})", rows_record)


def fit_rows(run: Any, fit: FitStore) -> Any:
    """The FitRows of ``fit`` for regtok.evaluate: lazy feature columns and the rows' labels."""
    from regtok.evaluate import FitRows

    labels = {name: col[fit.rows] for name, col in fit.store.labels().items()}
    cols = {m: RowsColumn(fit.store, run.feature_kind, m, fit.rows) for m in run.model.modalities}
    return FitRows(cols, labels, fit.source)


def fit_baselines(run: Any, eval_store: Any, fit: FitStore, cfg: EvalConfig, log: Any,
                  fitted: dict[str, Any] | None = None) -> dict[str, Any]:
    """The baselines fitted on ``fit``'s rows (a seeded subset of at most baseline_max_rows) and scored here:
    ``fitted`` when :func:`regtok.evaluate.evaluate` fitted them on the run's read codes, else fitted here on the
    features reduced by :class:`regtok.reduce.Reducer` (a model without a read); and the model at its start."""
    from regtok.baselines import BaselineConfig, fit_and_score

    kind, mods = run.feature_kind, tuple(run.model.modalities)
    test = {m: StoreColumn(eval_store, kind, m) for m in mods}
    out = fitted
    if out is None:
        rows = fit.rows[subset(len(fit.rows), cfg.baseline_max_rows, cfg.seed).numpy()]  # as evaluate's
        train = {m: RowsColumn(fit.store, kind, m, rows) for m in mods}  # read chunk by chunk (regtok/reduce.py)
        bcfg = BaselineConfig(embed_dim=run.model.cfg.embed_dim, seed=cfg.seed)
        out = fit_and_score(train, test, mods, bcfg, cfg.chunk_size, log=log)
        for row in out.values():
            row["fit"]["input"] = "the features, standardised and reduced by a PCA fitted here on the fit rows"
    log("baseline: the model at its start")
    out["start"] = start_retrieval(run, fit, test, cfg)
    out["store"], out["train_rows"] = str(fit.path), fit.rows_record
    return out


def start_retrieval(run: Any, fit: FitStore, test: dict[str, Any], cfg: EvalConfig) -> dict[str, Any]:
    """Retrieval of the run's model at its start, before any step, at the full shared prefix: the weights the run
    saved (start.safetensors; a recorded one that is gone or changed is an error), or, for a run trained before
    regtok saved them or pruned with --keep last, the start rebuilt as the trainer built it (same seed, statistics,
    read basis and CCA start) from ``fit``'s rows."""
    import torch

    from regtok.pipeline.train import START, load_run, recorded_files
    from regtok.reduce import as_tensor
    from regtok.retrieval import retrieval_metrics

    saved = run.run_dir is not None and ((run.run_dir / START).is_file() or START in recorded_files(run.manifest))
    if saved:
        model, how = load_run(run.run_dir, weights="start").model, {"weights": START}
    else:
        model, how = _rebuilt_start(run, fit), {"weights": "rebuilt", "rows": len(fit.rows)}
    k = model.cfg.n_shared
    with torch.no_grad():  # the shared embedding alone: the heads' decoding is not needed here
        emb = {m: torch.cat([_shared(model.encoders[m], as_tensor(test[m][i:i + cfg.batch_size]), k)
                             for i in range(0, len(test[m]), cfg.batch_size)]) for m in model.modalities}
    a, b = model.modalities
    return {**retrieval_metrics(emb[a], emb[b], cfg.chunk_size), "fit": {"k": k, **how}}


def _rebuilt_start(run: Any, fit: FitStore) -> Any:
    """The run's start fitted again on ``fit``'s rows, in eval mode (the decoders' fit left out)."""
    import torch

    from regtok.data import make_batches
    from regtok.pipeline.train import Split, build_model

    tc = run.train_config
    # Streamed: the start reads its statistics in one pass and a sample of rows; a copy of the store in memory would
    # cost a read of all of it and its size in memory (at ViT-L-14's tokens, 1 GB per 1,000 rows).
    data = make_batches(fit.store, run.feature_kind, fit.rows, tc.batch_size, tc.seed, torch.device("cpu"), 0)
    split = Split(fit.store, fit.store, run.feature_kind, fit.rows, np.arange(0), data, None)
    model, _ = build_model(split, tc, Path(), resume=False, notify=lambda _m: None, decoders=False)
    return model.eval()


def _shared(enc: Any, x: Any, k: int) -> Any:
    """The shared embedding (B, E) of the first ``k`` <= n_shared registers, as ``enc(x, keep=k).shared``."""
    import torch

    return enc.embed_shared(enc.registers_of(x), torch.full((len(x),), k, dtype=torch.long))


KEY_CONFIG = ("model.n_registers", "model.n_shared", "model.n_layers", "model.hidden_dim", "model.embed_dim",
              "epochs", "batch_size", "lr")


def describe_evaluated(run: Any, run_dir: Path, run_manifest: Path, store: Any, features: Path) -> dict[str, Any]:
    """report["evaluated"]: the run, loss, closest preset and what differs, key config, encoders, stores with N."""
    from regtok.config import closest_preset, to_dict
    from regtok.pipeline.train import weights_file

    cfg = to_dict(run.train_config)
    preset, diff = closest_preset(cfg)
    rm = run.manifest or {}
    encoders = {m: {"spec": e.get("spec"), "pooled_dim": e.get("pooled_dim"),
                    "token_shape": e.get("token_shape") if store.has("tokens") else None}
                for m, e in (store.manifest.get("encoders") or {}).items()}
    out: dict[str, Any] = {
        "run": str(run_dir.resolve()), "weights": weights_file(run_dir), "step": run.step, "epoch": run.epoch,
        "command": " ".join(["regtok", *rm["command"][1:]]) if rm.get("command") else None,
        "loss_type": cfg["model"]["loss_type"], "feature_kind": run.feature_kind, "preset": preset,
        "differs_from_preset": diff, "key_config": {k: _dotted(cfg, k) for k in KEY_CONFIG}, "encoders": encoders,
        "eval_store": {"path": str((features.parent if features.is_file() else features).resolve()), "n": store.n}}
    for role, key in (("features", "train_store"), ("val_features", "val_store")):
        path = run_input(run_manifest, role)
        if path is not None:
            out[key] = {"path": str(path.parent.resolve()), "n": read_manifest(path, kind="features").get("samples")}
    if "train_store" in out and "val_store" not in out:
        out["train_store"].update(train_rows=rm.get("train_samples"), val_rows=rm.get("val_samples"),
                                  split=rm.get("split"))
    return out


def _dotted(cfg: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
    return cfg if cfg != {} else None


def _inputs(run_dir: Path, features: str | os.PathLike, fit: Any, out: Path) -> list[dict[str, Any]]:
    """The eval manifest's inputs: the run (its manifest, else its config), the features, the fit store if any."""
    run_mpath = manifest_path(run_dir)
    inputs = [input_ref("run", run_mpath, out) if run_mpath.is_file() else
              input_ref("run_config", run_dir / "config.json", out),
              input_ref("features", manifest_path(features), out)]
    if isinstance(fit, FitStore):
        inputs.append(input_ref("fit_features", manifest_path(fit.path), out))
    return inputs


def _claim_report_dir(out: Path, overwrite: bool) -> bool:
    """``out`` must be empty, or ``overwrite`` given (:func:`regtok.pipeline.manifests.outdir.report_foreign`); returns
    whether it holds an earlier eval report, whose files this one replaces."""
    from regtok.pipeline.manifests.manifest import ManifestError
    from regtok.pipeline.manifests.outdir import claim, report_foreign

    claim(out, report_foreign(out, overwrite), "eval", overwrite)
    try:
        return bool(read_manifest(out / "manifest.json", kind="eval"))
    except ManifestError:
        return False


def _remove_stale(out: Path, written: list[Path]) -> None:
    """An earlier report's files that this one did not write again (embeddings.h5 …): they would be stale."""
    from regtok.pipeline.manifests.outdir import REPORT_FILES

    for name in REPORT_FILES - {p.name for p in written} - {"manifest.json"}:
        (out / name).unlink(missing_ok=True)


def run_eval(run_dir: str | os.PathLike, features: str | os.PathLike, out_dir: str | os.PathLike, cfg: EvalConfig,
             *, save_embeddings: bool = False, command: list[str] | None = None,
             console: Console | None = None, fit_features: str | os.PathLike | None = None,
             overwrite: bool = False) -> dict[str, Any]:
    """The whole `regtok eval` stage; returns the report dict after writing every file.

    The baselines (with ``cfg.baselines``), the probes and the reconstruction references are fitted on the run's
    training rows (found through the run manifest) or on the store ``fit_features``, and scored on ``features``.
    ``out_dir`` must be empty, or ``overwrite`` given (an earlier report there is then replaced, its stale files
    removed).
    """
    from regtok.pipeline.extract import open_store
    from regtok.pipeline.train import load_run

    t0 = time.perf_counter()
    console = console or stderr_console()
    out = Path(out_dir)
    earlier = _claim_report_dir(out, overwrite)
    run = load_run(run_dir)
    run_dir = run.run_dir  # --run may name a file of the run (its manifest.json)
    run_mpath = manifest_path(run_dir)
    store = open_store(features)
    check_compatible(store, run.feature_kind, run.model.inputs, what="the features", expected_by="the run",
                     trained_on=training_store_manifest(run_mpath))
    out.mkdir(parents=True, exist_ok=True)
    kind = run.feature_kind
    cols = {m: StoreColumn(store, kind, m) for m in run.model.modalities}
    pooled = cols if kind == "pooled" else {m: StoreColumn(store, "pooled", m) for m in run.model.modalities}
    sink = EmbeddingWriter(out / "embeddings.h5", store.keys()) if save_embeddings else None
    fit = fit_store(run, store, Path(fit_features) if fit_features else None, run_mpath)
    with console.status("evaluating") as status:
        log = lambda msg: status.update(f"evaluating: {msg}")  # noqa: E731
        report = evaluate(run.model, cols, store.labels(), store.manifest.get("labels") or {}, cfg, pooled=pooled,
                          embeddings_sink=sink, log=log, fit=fit_rows(run, fit) if isinstance(fit, FitStore) else None)
        fitted = report["baselines"].pop("linear", None)  # evaluate's, on the run's read codes; completed here
        linear = {"skipped": "--no-baselines"}
        if cfg.baselines:
            linear = fit_baselines(run, store, fit, cfg, log, fitted) if isinstance(fit, FitStore) else \
                {"skipped": fit}
    report["baselines"]["linear"] = linear
    report["headline"] = headline(report, run.model.cfg.scored_by_transport)
    report["feature_kind"], report["eval_method"] = kind, EVAL_METHOD
    report["evaluated"] = describe_evaluated(run, run_dir, run_mpath, store, Path(features))
    if isinstance(fit, FitStore):
        report["fit_store"] = str(fit.path.resolve())
    written = write_report_files(report, out, console)
    if sink is not None:
        written.append(sink.close())
    print_table(report, console)
    device = str(resolve_device(cfg.device))
    manifest = new_manifest(
        "eval", command=command, config=dataclasses.asdict(cfg), inputs=_inputs(run_dir, features, fit, out),
        outputs={"files": [file_record(p, out) for p in written]}, environment_=environment(device),
        timings={"seconds": round(time.perf_counter() - t0, 3)}, samples=report["n"],
        modalities=report["modalities"], feature_kind=kind, run_step=getattr(run, "step", None))
    write_manifest(out / "manifest.json", manifest)
    if earlier:
        _remove_stale(out, written)
    return report
