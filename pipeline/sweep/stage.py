"""`regtok sweep`: a hyper-parameter search over training configs on one cached feature store, run by Optuna.

    SWEEP_DIR/study.db               the Optuna study (SQLite unless --storage names another database)
    SWEEP_DIR/trials/NNNN/           one ordinary run directory per trial (checkpoint, metrics.jsonl, manifest)
    SWEEP_DIR/report.json, .md       every trial sorted by the metric; sweep.png: the metric against each parameter
    SWEEP_DIR/best.yaml              the best trial's config: what differs from the defaults and every key a
                                     preset sets, so it trains the same with or without --preset
    SWEEP_DIR/sweep.json             which study (name and storage) the directory belongs to
    SWEEP_DIR/tb/                    with --tensorboard: the HParams experiment (the swept keys, the metrics)
    SWEEP_DIR/manifest.json          kind "sweep": space, sampler, storage and every trial with its state and metric

A worker opens the study, reads the feature store into memory once and runs trials until the study has its
number of finished trials; ``--jobs J`` starts J workers on this machine (never more than the trials left), and
workers on other machines that name the same ``--storage`` and ``--study`` join the same study. A trial that was
running when its worker died is failed and queued again (same parameters): at once when the worker ran on this
host (the sweep starts workers again for it), else after Optuna's heartbeat grace period. Ctrl-C stops every
worker at once and queues the trials they were running again; so does a full disk or a read-only trial
directory, which stops the sweep with one line. A sweep that ends with trials left says so and exits non-zero.
Pruned trials record the epoch they stopped after. A finished trial keeps the weight files ``--keep`` names
(best: what eval needs; last: what a resume needs; all). The study itself (storage, identity, grid queue,
retries): :mod:`regtok.pipeline.sweep.study`; the workers and their display: :mod:`regtok.pipeline.sweep.pool`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from regtok.config import TrainConfig, to_dict
from regtok.errors import Interrupted, RegtokError
from regtok.pipeline.sweep.space import Choices, Param, check_space, space_json
from regtok.pipeline.sweep.study import (
    check_grid,
    check_storage,
    check_study_present,
    open_storage,
    open_study,
    recover_interrupted,
    safe_url,
)

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "hyperband")
KEEP = ("best", "last", "all")  # the weight files a finished trial keeps (regtok.pipeline.train.weights.prune_weights)
# What a trial is scored by. val/select is what keep_best ranks epochs by: full-prefix R@1 (mean of both
# directions), after transport for flow_matching runs, so runs of every loss type compare fairly.
METRICS = ("val/select", "val/R@1", "val_r1_full_a_to_b", "val_r1_full_b_to_a", "val_r1_k1_a_to_b",
           "val_r1_k1_b_to_a", "val_r1_flow_a_to_b", "val_r1_flow_b_to_a")


@dataclass(frozen=True)
class SweepConfig:
    sampler: str = "grid"
    trials: int | None = None  # finished trials to reach (grid: at most the grid's size; else default 20)
    jobs: int = 1  # worker processes on this machine
    storage: str | None = None  # an Optuna storage URL; default sqlite:///SWEEP_DIR/study.db
    study: str = "regtok"
    metric: str = "val/select"
    prune: bool = True
    pruner: str = "median"
    seed: int = 0  # of the sampler
    tensorboard: bool = False
    keep: str = "best"  # the weight files a finished trial keeps: best, last or all (pipeline/train/weights.py)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise RegtokError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.pruner not in PRUNERS:
            raise RegtokError(f"--pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.metric not in METRICS:
            raise RegtokError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.keep not in KEEP:
            raise RegtokError(f"--keep must be one of {', '.join(KEEP)}, got {self.keep!r}")
        if self.jobs < 1 or (self.trials is not None and self.trials < 1):
            raise RegtokError("--jobs and --trials must be at least 1")


def metric_value(record: dict[str, Any], metric: str) -> float:
    """``metric`` of an epoch record (or a run's final metrics)."""
    from regtok.train import full_r1

    if metric == "val/select":
        return float(record["val_select"])
    value = full_r1(record) if metric == "val/R@1" else record.get(metric)
    if value is None:
        raise RegtokError(f"metric {metric!r} is not in the run's validation record (flow metrics need flow runs)")
    return float(value)


def default_storage(sweep_dir: Path) -> str:
    return f"sqlite:///{sweep_dir.resolve() / 'study.db'}"


def make_sampler(scfg: SweepConfig, space: dict[str, Param], seed: int | None = None) -> Any:
    """The Optuna sampler; workers pass their own ``seed`` so that they do not propose the same points."""
    import optuna

    seed = scfg.seed if seed is None else seed
    if scfg.sampler == "grid":
        return optuna.samplers.GridSampler({k: list(p.values) for k, p in space.items()}, seed=seed)
    if scfg.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(scfg: SweepConfig, epochs: int) -> Any:
    import optuna

    if not scfg.prune:
        return optuna.pruners.NopPruner()
    if scfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, epochs))
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)


def n_trials(scfg: SweepConfig, space: dict[str, Param]) -> int:
    if scfg.sampler == "grid":
        size = 1
        for p in space.values():
            size *= len(p.values)  # type: ignore[union-attr]
        return min(size, scfg.trials or size)
    return scfg.trials or 20


# ── the sweep ───────────────────────────────────────────────────────────────────────────────────────


def run_sweep(features: str | os.PathLike, out: str | os.PathLike, scfg: SweepConfig, space: dict[str, Param],
              base: TrainConfig, *, val_features: str | os.PathLike | None = None, command: list[str] | None = None,
              console: Any = None, show_progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """The whole `regtok sweep` stage; returns the report dict after writing every file.

    Everything that can be checked before a trial runs is checked first (space, grid size, storage, data, --out).
    """
    from regtok.pipeline.sweep.pool import check_finished, requeue, run_rounds
    from regtok.pipeline.sweep.report import write_outputs
    from regtok.pipeline.sweep.worker import WorkerSpec

    out = Path(out).absolute()
    t0 = time.perf_counter()
    url = scfg.storage or default_storage(out)
    data = _check_inputs(features, val_features, scfg, space, base, url)
    _claim(out, scfg.study, safe_url(url), overwrite)
    out.mkdir(parents=True, exist_ok=True)
    storage = open_storage(url)
    check_study_present(storage, scfg.study, (out / "trials").is_dir() and any((out / "trials").iterdir()),
                        f"--out {out}")
    (out / "sweep.json").write_text(json.dumps({"study": scfg.study, "storage": safe_url(url)}) + "\n")
    total = n_trials(scfg, space)
    say = say_to(console)
    study = open_study(SweepConfig(**{**asdict(scfg), "storage": url}), storage, space, base, data,
                       make_sampler(scfg, space), make_pruner(scfg, base.epochs), total, say)
    if scfg.tensorboard:
        from regtok.pipeline.train import write_sweep_experiment

        write_sweep_experiment(out, {k: list(p.values) if isinstance(p, Choices) else None for k, p in space.items()},
                               scfg.metric)
    retried = recover_interrupted(study)
    if retried:
        say(f"trial(s) {', '.join(map(str, retried))} were running when the sweep stopped: queued again")
    spec = WorkerSpec(str(out), url, str(Path(features).absolute()),
                      str(Path(val_features).absolute()) if val_features else None, space_json(space), to_dict(base),
                      asdict(scfg), total)
    try:
        stopped = run_rounds(spec, scfg.jobs, study, total, console, show_progress)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; run the same command again to continue the sweep ({requeue(study)})") \
            from None
    report = write_outputs(out, study, scfg, space, base, url, features=features, val_features=val_features,
                           command=command, seconds=time.perf_counter() - t0)
    check_finished(study, total, stopped, say)
    return report


def _check_inputs(features: str | os.PathLike, val_features: str | os.PathLike | None, scfg: SweepConfig,
                  space: dict[str, Param], base: TrainConfig, url: str) -> dict[str, str]:
    """Every check that needs no study: space, grid size, metric, storage kind, validation data, the stores (their
    manifests' hashes, returned)."""
    from regtok.pipeline.extract import open_store
    from regtok.pipeline.manifests.manifest import manifest_path, sha256_file

    check_space(space, base, scfg.sampler, "search space")
    if scfg.sampler == "grid":
        check_grid(space)
    _check_metric(scfg.metric, space, base)
    check_storage(url)
    if val_features is None and base.val_fraction <= 0:
        raise RegtokError("a sweep scores trials on validation data: pass --val-features or --val-fraction > 0")
    data = {}
    for role, path in (("features", features), ("val_features", val_features)):
        if path is not None:
            open_store(path)  # a clear error now rather than one per trial
            data[role] = sha256_file(manifest_path(path))
    return data


def say_to(console: Any) -> Any:
    return (lambda msg: console.print(msg, markup=False, highlight=False)) if console is not None else \
        (lambda msg: None)


SWEEP_FILES = {"study.db", "study.db-journal", "study.db-wal", "study.db-shm", "trials", "report.json", "report.md",
               "sweep.png", "best.yaml", "manifest.json", "sweep.json", "tb"}


def _claim(out: Path, study: str, storage: str, overwrite: bool) -> None:
    """A sweep writes into an empty directory or its own earlier one (to continue it); anywhere else only with
    ``overwrite`` (outdir.claim's rule).

    ``OUT/sweep.json`` names the study and storage the directory belongs to: the trial directories of two
    studies would have the same names, so ``overwrite`` never lifts that.
    """
    from regtok.pipeline.manifests.manifest import ManifestError, read_manifest
    from regtok.pipeline.manifests.outdir import claim

    if out.exists() and not out.is_dir():
        raise RegtokError(f"--out {out} is a file, not a directory")
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in SWEEP_FILES and not p.name.startswith("."))
    if (out / "manifest.json").is_file():
        try:
            read_manifest(out / "manifest.json", kind="sweep")
        except ManifestError:
            foreign.insert(0, "manifest.json")  # another stage's directory
    claim(out, foreign, "sweep", overwrite)
    owner = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else None
    if owner is not None and owner != {"study": study, "storage": storage}:
        raise RegtokError(f"--out {out} belongs to study {owner['study']!r} in {owner['storage']}; "
                          "choose another --out")
    if owner is None and (out / "trials").is_dir() and any((out / "trials").iterdir()):
        raise RegtokError(f"--out {out} holds trials of an unknown study; choose another --out")


def _check_metric(metric: str, space: dict[str, Param], base: TrainConfig) -> None:
    """Flow metrics exist only for runs with a flow head: every loss type the sweep can train must have one."""
    if not metric.startswith("val_r1_flow"):
        return
    param = space.get("model.loss_type")
    losses = set(param.values) if isinstance(param, Choices) else {base.model.loss_type}
    if not all(replace(base.model, loss_type=loss).uses_flow for loss in losses):
        raise RegtokError(f"--metric {metric} needs a flow head, which contrastive runs lack; use val/select")

