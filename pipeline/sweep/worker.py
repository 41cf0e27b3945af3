"""A sweep worker: trials of one Optuna study, run one after another in this process on one cached store.

How each trial runs exactly once, with any number of workers on any number of machines:

- **grid:** the sweep queues every grid point once, as a waiting trial (``enqueue_trial``). Optuna's move of a
  waiting trial to running is atomic in the storage, so each point is taken by one worker. A trial Optuna
  creates because the queue is empty is *surplus*: it is failed at once, marked ``surplus`` (reports leave it
  out), and its worker stops.
- **tpe / random:** a new trial is surplus when the trials numbered below it (settled, running or queued)
  already reach the total, so two workers asking at the same time never both decline or both run the last one.
- **retries:** a trial whose worker died is failed and queued again with the same parameters
  (``RetryHeartbeatStaleTrialCallback``); a retry is never surplus. Settled = complete, pruned, or failed and
  not retried; a failed trial counts, so a sweep of trials that all fail still ends.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regtok.config import TrainConfig
from regtok.data import derive_seed
from regtok.errors import RegtokError
from regtok.pipeline.sweep.space import Param, as_overrides, diff_from_defaults, parse_space, trial_config


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs (plain data: it crosses a process boundary)."""

    sweep_dir: str
    storage: str
    features: str
    val_features: str | None
    space: dict[str, Any]  # space_json
    base: dict[str, Any]  # to_dict(TrainConfig)
    sweep: dict[str, Any]  # asdict(SweepConfig)
    total: int
    index: int = 0
    threads: int | None = None  # torch threads in this worker (CPU: cores / jobs)
    parent_pid: int | None = None  # stop when the sweep that started this worker is gone


class Surplus(Exception):
    """The study already has its trials; this one is not run (see the module docstring)."""


class SweepStopped(KeyboardInterrupt):
    """The machine stopped a trial (a full disk, a read-only directory): the sweep stops with one line and the
    trial runs again when the same command runs again. A KeyboardInterrupt, so that Optuna marks the trial failed
    and re-raises it rather than going on to the next trial, which would fail the same way."""


def run_worker(spec: WorkerSpec, on_trial: Any = None) -> None:
    """Run trials until the study has ``spec.total`` settled ones (or the grid's queue is empty)."""
    import optuna

    from regtok.pipeline.sweep.stage import SweepConfig, make_pruner, make_sampler
    from regtok.pipeline.sweep.study import open_storage, quiet_optuna
    from regtok.pipeline.train import StoreCache

    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    quiet_optuna()
    scfg = SweepConfig(**spec.sweep)
    space = parse_space(spec.space, "space")
    base = trial_config(spec.base, {})
    storage = open_storage(spec.storage)
    started = len(optuna.load_study(study_name=scfg.study, storage=storage).trials)
    # A resumed or second worker must not replay the proposals of the first: its seed depends on where it joins.
    seed = derive_seed(scfg.seed, "sampler", spec.index, started, socket.gethostname() if scfg.storage else "")
    study = optuna.load_study(study_name=scfg.study, storage=storage, pruner=make_pruner(scfg, base.epochs),
                              sampler=make_sampler(scfg, space, seed % 2**31))
    cache = StoreCache()  # the store is read once per worker, not once per trial

    def objective(trial: Any) -> float:
        return run_trial(trial, spec, scfg, space, base, cache)

    def after(study: Any, trial: Any) -> None:
        if on_trial is not None:
            on_trial()
        if settled(study) >= spec.total or trial.user_attrs.get("surplus"):
            study.stop()
        if spec.parent_pid is not None and os.getppid() != spec.parent_pid:
            study.stop()  # the sweep was killed: do not run on as an orphan

    try:
        study.optimize(objective, callbacks=[after], catch=(Exception,), gc_after_trial=False)
    except SweepStopped as e:
        raise RegtokError(str(e)) from None
    except Exception as e:  # not a trial's (Optuna catches those): the storage failed, e.g. on a full disk
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RegtokError(f"the study storage failed ({type(e).__name__}{': ' + first if first else ''}); run the "
                          "same command again to continue the sweep") from None


def settled(study: Any) -> int:
    """Trials that are done: complete, pruned, or failed and not queued again (surplus ones excluded)."""
    from optuna.trial import TrialState

    return _count(study.get_trials(deepcopy=False), (TrialState.COMPLETE, TrialState.PRUNED))


def _count(trials: list, live: tuple, below: int | None = None) -> int:
    """Trials in a ``live`` state or failed without a retry, not surplus (and numbered below ``below``)."""
    from optuna.trial import TrialState

    from regtok.pipeline.sweep.study import retried_from

    retried = {retried_from(t) for t in trials}
    return sum((below is None or t.number < below) and not t.user_attrs.get("surplus") and
               (t.state in live or (t.state == TrialState.FAIL and t.number not in retried)) for t in trials)


def _is_surplus(trial: Any, grid: bool, total: int) -> bool:
    from optuna.trial import TrialState

    attrs = trial.study._storage.get_trial_system_attrs(trial._trial_id)
    if "failed_trial" in attrs:
        return False  # a retry of a trial whose worker died
    if grid:
        return "fixed_params" not in attrs  # not one of the queued grid points
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return _count(trial.study.get_trials(deepcopy=False), live, below=trial.number) >= total


def run_trial(trial: Any, spec: WorkerSpec, scfg: Any, space: dict[str, Param], base: TrainConfig,
              cache: Any) -> float:
    """One trial: an ordinary run in ``SWEEP/trials/NNNN``. Its value is ``scfg.metric`` of the weights eval will
    use (the kept best epoch, or the last one with ``--keep last`` or without keep_best)."""
    import optuna

    from regtok.pipeline.sweep.stage import metric_value
    from regtok.pipeline.train import train_run

    if _is_surplus(trial, scfg.sampler == "grid", spec.total):
        trial.set_user_attr("surplus", True)
        raise Surplus("the study has all its trials")
    for key, value in (("host", socket.gethostname()), ("pid", os.getpid()), ("error", None), ("interrupted", None)):
        trial.set_user_attr(key, value)  # a retry inherits its original's attributes
    out = Path(spec.sweep_dir) / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("path", str(out.relative_to(spec.sweep_dir)))
    t0 = time.perf_counter()
    try:
        params = {name: param.suggest(trial, name) for name, param in space.items()}
        cfg = trial_config(base, params)

        def stop(record: dict[str, Any]) -> str | None:
            epoch = record["epoch"]  # epochs done (counted from 1): Optuna's step, and Hyperband's resource
            trial.report(metric_value(record, scfg.metric), epoch)
            trial.set_user_attr("epochs", epoch)
            return f"pruned by the {scfg.pruner} pruner after epoch {epoch}" if trial.should_prune() else None

        path, result = train_run(spec.features, out, cfg, val_features=spec.val_features,
                                 command=trial_command(spec, out, cfg), stop=stop, cache=cache,
                                 tensorboard=scfg.tensorboard, keep=scfg.keep)
        value = _record_result(trial, path, result, scfg.metric)
    except KeyboardInterrupt:
        _note(trial, error="interrupted (Ctrl-C)", interrupted=True)
        raise
    except Exception as e:
        if not stopped_by_machine(e):
            trial.set_user_attr("error", str(e) if isinstance(e, RegtokError) else f"{type(e).__name__}: {e}")
            raise
        reason = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        _note(trial, error=f"stopped: {reason}", interrupted=True)
        raise SweepStopped(f"trial {trial.number} ({out}) stopped: {reason}; run the same command again once that "
                           "is fixed: the trial runs again") from None
    finally:
        _note(trial, seconds=time.perf_counter() - t0)
    if result.status == "stopped":
        raise optuna.TrialPruned(result.message)
    trial.set_user_attr("epochs", cfg.epochs)
    return value


def _record_result(trial: Any, manifest: Path, result: Any, metric: str) -> float:
    """The trial's value (``metric`` of the kept epoch) and what the report shows beside it: the kept epoch, the
    last epoch's value, the validation N."""
    from regtok.pipeline.manifests.manifest import read_manifest
    from regtok.pipeline.sweep.stage import metric_value
    from regtok.pipeline.train import kept_record

    kept = kept_record(manifest.parent)
    value = metric_value(kept if kept is not None else result.metrics, metric)
    m = read_manifest(manifest, kind="run")
    for key, v in (("last_value", metric_value(result.metrics, metric)), ("value", value),
                   ("kept_epoch", kept["epoch"] if kept else None), ("val_n", m.get("val_samples"))):
        trial.set_user_attr(key, v)
    return value


def stopped_by_machine(e: BaseException) -> bool:
    """An error of the machine rather than of the trial's config: a full disk, a read-only or forbidden path."""
    from regtok.errors import ENVIRONMENT_ERRNOS
    from regtok.pipeline.train import WriteFailed

    return isinstance(e, WriteFailed) or isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS


def _note(trial: Any, **attrs: Any) -> None:
    """Record user attributes of a trial that is stopping; a storage that cannot be written then is left alone
    (the trial stays running under a gone worker, which the next run queues again)."""
    try:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
    except Exception:
        pass


def trial_command(spec: WorkerSpec, out: Path, cfg: TrainConfig) -> list[str]:
    """The `regtok train` command that makes the same run (what its manifest records)."""
    val = ["--val-features", spec.val_features] if spec.val_features else []
    return ["regtok", "train", "--features", spec.features, *val, "--out", str(out),
            *as_overrides(diff_from_defaults(cfg))]


def spawn_worker(spec: WorkerSpec) -> None:
    """The target of a worker process: an error is one line on stderr and exit status 2; Ctrl-C (to the process
    group, or forwarded by the sweep) stops the trial, which is marked to run again, and exits 130 quietly."""
    import signal
    import sys

    def interrupt(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one interrupt: the group's and the sweep's are the same
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    try:
        run_worker(spec)
    except RegtokError as e:
        print(f"sweep worker {spec.index} stopped: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
