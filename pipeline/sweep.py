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
number of finished trials; ``--jobs J`` starts J workers on this machine, and workers on other machines that
name the same ``--storage`` and ``--study`` join the same study. A trial that was running when its worker died
is failed and queued again (same parameters): at once when the worker ran on this host, else after Optuna's
heartbeat grace period. Pruned trials record the epoch they stopped after. A finished trial keeps the weight
files ``--keep`` names (best: what eval needs; last: what a resume needs; all).
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from regtok.config import TrainConfig, to_dict
from regtok.errors import RegtokError
from regtok.pipeline.space import Choices, Param, check_space, space_json

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("median", "hyperband")
KEEP = ("best", "last", "all")  # the weight files a finished trial keeps (regtok.pipeline.weights.prune_weights)
# What a trial is scored by. val/select is what keep_best ranks epochs by: full-prefix R@1 (mean of both
# directions), after transport for flow_matching runs, so runs of every loss type compare fairly.
METRICS = ("val/select", "val/R@1", "val_r1_full_a_to_b", "val_r1_full_b_to_a", "val_r1_k1_a_to_b",
           "val_r1_k1_b_to_a", "val_r1_flow_a_to_b", "val_r1_flow_b_to_a")
HEARTBEAT_S, GRACE_S = 30, 120  # a trial whose worker stopped beating for GRACE_S is failed and retried


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
    keep: str = "best"  # the weight files a finished trial keeps: best, last or all (pipeline/weights.py)

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


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats (dead workers' trials are retried); one error line if unreachable."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    quiet_optuna()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # workers wait for each other's writes
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                          heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                                          **kwargs)
    except Exception as e:  # sqlalchemy's errors, a bad URL, a missing driver: all mean "cannot use this"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RegtokError(f"cannot open the study storage {safe_url(url)}: {first}") from None


def quiet_optuna() -> None:
    """Optuna's own logging and its experimental-feature warnings stay off the sweep's display."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def safe_url(url: str) -> str:
    """The storage URL with any password hidden (it goes into manifests and messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


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


def open_study(scfg: SweepConfig, storage: Any, space: dict[str, Param], base: TrainConfig,
               data: dict[str, str | None]) -> Any:
    """Create the study (queueing every grid point once), or load it when it exists; an existing study must have
    the same space, base config, metric, sampler and data (the stores' manifest hashes)."""
    import itertools

    import optuna

    identity = {"space": space_json(space), "base": to_dict(base), "metric": scfg.metric, "sampler": scfg.sampler,
                "data": data}
    study = optuna.create_study(storage=storage, study_name=scfg.study, direction="maximize", load_if_exists=True,
                                sampler=make_sampler(scfg, space), pruner=make_pruner(scfg, base.epochs))
    recorded = study.user_attrs.get("regtok")
    if recorded is None:
        study.set_user_attr("regtok", identity)
        if scfg.sampler == "grid":  # each point a waiting trial, taken by exactly one worker (sweep_worker.py)
            names = list(space)
            points = list(itertools.product(*(space[n].values for n in names)))[:n_trials(scfg, space)]
            for values in points:
                study.enqueue_trial(dict(zip(names, values, strict=True)), skip_if_exists=True)
    elif recorded != identity:
        what = [k for k in identity if recorded.get(k) != identity[k]]
        raise RegtokError(f"study {scfg.study!r} in {safe_url(scfg.storage or '')} exists with another "
                          f"{' and '.join(what)}; choose another --out (and --study on a shared --storage)")
    return study


def recover_interrupted(study: Any) -> list[int]:
    """Fail and queue again every running trial whose worker on this host is gone (a killed sweep)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    host, retried = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _alive(int(t.user_attrs.get("pid", -1))):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (its worker was killed)")
        if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
            RetryHeartbeatStaleTrialCallback(max_retry=3)(study, study._storage.get_trial(t._trial_id))
            retried.append(t.number)
    return retried


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ── the sweep ───────────────────────────────────────────────────────────────────────────────────────


def run_sweep(features: str | os.PathLike, out: str | os.PathLike, scfg: SweepConfig, space: dict[str, Param],
              base: TrainConfig, *, val_features: str | os.PathLike | None = None, command: list[str] | None = None,
              console: Any = None, show_progress: bool = True) -> dict[str, Any]:
    """The whole `regtok sweep` stage; returns the report dict after writing every file."""
    from regtok.pipeline.manifest import manifest_path, sha256_file
    from regtok.pipeline.store import open_store
    from regtok.pipeline.sweep_report import write_outputs
    from regtok.pipeline.sweep_worker import WorkerSpec

    out = Path(out).absolute()
    t0 = time.perf_counter()
    check_space(space, base, scfg.sampler, "search space")
    _check_metric(scfg.metric, space, base)
    if val_features is None and base.val_fraction <= 0:
        raise RegtokError("a sweep scores trials on validation data: pass --val-features or --val-fraction > 0")
    data = {}
    for role, path in (("features", features), ("val_features", val_features)):
        if path is not None:
            open_store(path)  # a clear error now rather than one per trial
            data[role] = sha256_file(manifest_path(path))
    url = scfg.storage or default_storage(out)
    _claim(out, scfg.study, safe_url(url))
    study = open_study(SweepConfig(**{**asdict(scfg), "storage": url}), open_storage(url), space, base, data)
    if scfg.tensorboard:
        from regtok.pipeline.tensorboard_log import write_sweep_experiment

        write_sweep_experiment(out, {k: list(p.values) if isinstance(p, Choices) else None for k, p in space.items()},
                               scfg.metric)
    retried = recover_interrupted(study)
    if retried and console is not None:
        console.print(f"trial(s) {', '.join(map(str, retried))} were running when the sweep stopped: queued again")
    total = n_trials(scfg, space)
    spec = WorkerSpec(str(out), url, str(Path(features).absolute()),
                      str(Path(val_features).absolute()) if val_features else None, space_json(space), to_dict(base),
                      asdict(scfg), total)
    _run_workers(spec, scfg.jobs, study, total, console, show_progress)
    return write_outputs(out, study, scfg, space, base, url, features=features, val_features=val_features,
                         command=command, seconds=time.perf_counter() - t0)


SWEEP_FILES = {"study.db", "study.db-journal", "study.db-wal", "study.db-shm", "trials", "report.json", "report.md",
               "sweep.png", "best.yaml", "manifest.json", "sweep.json", "tb"}


def _claim(out: Path, study: str, storage: str) -> None:
    """A sweep writes into an empty directory or its own earlier one (to continue it), nowhere else.

    ``OUT/sweep.json`` names the study and storage the directory belongs to: the trial directories of two
    studies would have the same names.
    """
    from regtok.pipeline.manifest import read_manifest

    if out.exists() and not out.is_dir():
        raise RegtokError(f"--out {out} is a file, not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in SWEEP_FILES and not p.name.startswith("."))
        if foreign:
            raise RegtokError(f"--out {out} holds files that are not a sweep's ({', '.join(foreign[:3])}); "
                              "choose another --out")
        if (out / "manifest.json").is_file():
            read_manifest(out, kind="sweep")  # another stage's directory is refused
        owner = json.loads((out / "sweep.json").read_text()) if (out / "sweep.json").is_file() else None
        if owner is not None and owner != {"study": study, "storage": storage}:
            raise RegtokError(f"--out {out} belongs to study {owner['study']!r} in {owner['storage']}; "
                              "choose another --out")
        if owner is None and (out / "trials").is_dir() and any((out / "trials").iterdir()):
            raise RegtokError(f"--out {out} holds trials of an unknown study; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"study": study, "storage": storage}) + "\n")


def _check_metric(metric: str, space: dict[str, Param], base: TrainConfig) -> None:
    """Flow metrics exist only for runs with a flow head: every loss type the sweep can train must have one."""
    if not metric.startswith("val_r1_flow"):
        return
    param = space.get("model.loss_type")
    losses = set(param.values) if isinstance(param, Choices) else {base.model.loss_type}
    if not all(replace(base.model, loss_type=loss).uses_flow for loss in losses):
        raise RegtokError(f"--metric {metric} needs a flow head, which contrastive runs lack; use val/select")


def _run_workers(spec: Any, jobs: int, study: Any, total: int, console: Any, show_progress: bool) -> None:
    """One worker in this process, or ``jobs`` worker processes, with a progress display of the study."""
    import multiprocessing as mp

    from regtok.pipeline.console import progress

    bar = progress(console, _status_column(), disable=not show_progress)
    task = bar.add_task("trials", total=total, status="")
    printed: set[int] = set()

    def refresh() -> None:
        done, status, finished = _status(study)
        bar.update(task, completed=min(done, total), status=status)
        if console is not None and not console.is_terminal:  # logs and batch jobs: one plain line per trial
            for line in [line for n, line in finished if n not in printed]:
                console.print(line, markup=False, highlight=False, soft_wrap=True)  # never wrapped mid-JSON
            printed.update(n for n, _ in finished)

    from regtok.pipeline.sweep_worker import WorkerSpec, run_worker, spawn_worker

    with bar:
        if jobs == 1:
            run_worker(spec, on_trial=refresh)
        else:
            threads = max(1, (os.cpu_count() or 1) // jobs)
            ctx = mp.get_context("spawn")  # torch and sqlite connections do not survive fork
            procs = [ctx.Process(target=spawn_worker, args=(WorkerSpec(**{**asdict(spec), "index": i,
                                                                           "threads": threads,
                                                                           "parent_pid": os.getpid()}),))
                     for i in range(jobs)]
            for p in procs:
                p.start()
            try:
                while any(p.is_alive() for p in procs):
                    refresh()
                    time.sleep(0.5)
            finally:
                for p in procs:
                    p.join()
            failed = [p.exitcode for p in procs if p.exitcode]
            if failed and all(p.exitcode for p in procs):
                raise RegtokError(f"every sweep worker failed (exit status {failed[0]}); see the lines above")
        refresh()


def _status_column() -> Any:
    from rich.progress import TextColumn

    return TextColumn("{task.fields[status]}")


def _status(study: Any) -> tuple[int, str, list[tuple[int, str]]]:
    """(finished count, one status line, [(number, line) per finished trial]), from the report's trial rows."""
    from regtok.pipeline.spread import pct
    from regtok.pipeline.sweep_report import trial_rows

    rows = trial_rows(study)  # best complete trial first
    count = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    best = next((f"best {pct(r['value'])} % (trial {r['number']})" for r in rows
                 if r["state"] == "complete" and r["value"] is not None), "best —")
    status = f"{count['running']} running, {count['pruned']} pruned, {count['fail']} failed; {best}"
    finished = [(r["number"], f"trial {r['number']}: {r['state']} {pct(r['value'])} % {json.dumps(r['params'])}"
                 + (f" ({r['error']})" if r["state"] == "fail" and r["error"] else ""))
                for r in sorted(rows, key=lambda r: r["number"]) if r["state"] != "running"]
    return count["complete"] + count["pruned"], status, finished
