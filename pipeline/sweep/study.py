"""A sweep's Optuna study: its storage, its identity and grid queue, and the trials to run again.

- **storage:** an RDB storage with heartbeats (a trial whose worker on another machine died is retried after the
  grace period); one that only one process can see (``sqlite:///:memory:``) is refused.
- **identity and queue:** the study records what it sweeps (space, base config, metric, sampler, data) before its
  grid is queued, and that the queue is complete after; a sweep stopped while queueing queues the rest when the
  same command runs again, and a grid above :data:`MAX_GRID_POINTS` is refused before anything is queued.
- **trials to run again:** a trial whose worker on this host is gone (killed) and a trial stopped by Ctrl-C or by
  the machine (a full disk, a read-only directory: ``user_attrs["interrupted"]``) are queued again with the same
  parameters (``system_attrs["retry_history"]`` names the trial each retry repeats).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
from collections.abc import Collection
from typing import Any

from regtok.config import TrainConfig, to_dict
from regtok.errors import RegtokError
from regtok.pipeline.sweep.space import Param, space_json

HEARTBEAT_S, GRACE_S = 30, 120  # a trial whose worker stopped beating for GRACE_S is failed and retried
MAX_GRID_POINTS = 5_000  # queueing takes a few ms per point in SQLite; a larger grid wants --sampler tpe/random
MAX_WORKER_RETRIES = 3  # a trial that kills its worker (out of memory …) this often is left failed


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats (dead workers' trials are retried); one error line if unreachable."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    quiet_optuna()
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # workers wait for each other's writes; transactions are begun below
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60, "isolation_level": None}}
    try:
        storage = optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(
                                                 max_retry=MAX_WORKER_RETRIES), **kwargs)
    except Exception as e:  # sqlalchemy's errors, a bad URL, a missing driver: all mean "cannot use this"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RegtokError(f"cannot open the study storage {safe_url(url)}: {first}") from None
    if url.startswith("sqlite"):
        _lock_on_begin(storage.engine)
    return storage


def _lock_on_begin(engine: Any) -> None:
    """Every SQLite transaction takes the write lock when it begins (BEGIN IMMEDIATE).

    Optuna moves a waiting trial to running with SELECT … FOR UPDATE, which SQLite ignores: two workers could
    both read a trial as waiting and both run it (measured: 4 of 20 queued trials taken twice by 2 processes
    asking at once). With the lock taken at BEGIN, the second reads the trial after the first one's update.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listener begin no transaction of their own


def check_storage(url: str) -> None:
    """A storage every worker process sees: an in-memory SQLite database lives in one process only."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:
        return  # open_storage says what is wrong with it
    if parsed.drivername.startswith("sqlite") and parsed.database in (None, "", ":memory:"):
        raise RegtokError(f"--storage {url}: an in-memory database lives in one process, and every sweep worker "
                          "opens the study anew; use a file (sqlite:///PATH) or a database server")


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


def grid_size(space: dict[str, Param]) -> int:
    return math.prod(len(p.values) for p in space.values())  # type: ignore[union-attr]


def check_grid(space: dict[str, Param]) -> None:
    """A grid of more than :data:`MAX_GRID_POINTS` points is refused before anything is queued."""
    size = grid_size(space)
    if size > MAX_GRID_POINTS:
        raise RegtokError(f"the grid has {size:,} points, more than the {MAX_GRID_POINTS:,} a grid sweep queues; "
                          "use --sampler tpe or random with --trials N, or fewer choices")


def check_study_present(storage: Any, study: str, has_trials: bool, where: str) -> None:
    """A sweep directory with trials whose storage has lost the study (an emptied or replaced study.db) is refused:
    a new study would number its trials from 0 again, into the old trials' directories."""
    import optuna

    if has_trials and study not in optuna.study.get_all_study_names(storage):
        raise RegtokError(f"{where} holds the trials of study {study!r}, but its storage has no such study (was "
                          "study.db emptied or replaced?); restore it, or choose another --out")


def open_study(scfg: Any, storage: Any, space: dict[str, Param], base: TrainConfig, data: dict[str, str | None],
               sampler: Any, pruner: Any, total: int, say: Any = None) -> Any:
    """Create the study, or load it when it exists: an existing study must have the same space, base config,
    metric, sampler and data (the stores' manifest hashes). A grid's points are queued once, each a waiting trial
    taken by exactly one worker (sweep_worker.py); an interrupted queueing is completed."""
    import optuna

    identity = {"space": space_json(space), "base": to_dict(base), "metric": scfg.metric, "sampler": scfg.sampler,
                "data": data}
    study = optuna.create_study(storage=storage, study_name=scfg.study, direction="maximize", load_if_exists=True,
                                sampler=sampler, pruner=pruner)
    recorded = study.user_attrs.get("regtok")
    if recorded is None:
        study.set_user_attr("regtok", identity)
    elif recorded != identity:
        what = [k for k in identity if recorded.get(k) != identity[k]]
        raise RegtokError(f"study {scfg.study!r} in {safe_url(scfg.storage or '')} exists with another "
                          f"{' and '.join(what)}; choose another --out (and --study on a shared --storage)")
    if scfg.sampler == "grid" and not study.user_attrs.get("regtok_queued"):
        names = list(space)
        points = itertools.islice(itertools.product(*(space[n].values for n in names)), total)
        queue_grid(study, [dict(zip(names, values, strict=True)) for values in points], say)
        study.set_user_attr("regtok_queued", True)  # recorded last: a stopped queueing is completed next time
    return study


def queue_grid(study: Any, points: list[dict[str, Any]], say: Any = None) -> None:
    """Queue each point that no trial of the study holds yet (read once: Optuna's own check reads every trial for
    every point)."""
    def key(params: dict[str, Any]) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in params.items()))

    queued = {key(t.system_attrs.get("fixed_params", t.params)) for t in study.get_trials(deepcopy=False)}
    todo = [p for p in points if key(p) not in queued]
    if len(todo) > 200 and say is not None:
        say(f"queueing {len(todo):,} grid points")
    for params in todo:
        study.enqueue_trial(params)


def retried_from(trial: Any) -> int | None:
    """The number of the trial that ``trial`` runs again (None: not a retry)."""
    history = trial.system_attrs.get("retry_history") or []
    return history[-1] if history else trial.system_attrs.get("failed_trial")


def recover_interrupted(study: Any, gone: Collection[int] = ()) -> list[int]:
    """Queue again every trial stopped before its end: running on this host under a worker that is gone (killed, or
    one of ``gone``), or failed with ``interrupted`` (Ctrl-C, a full disk); returns their numbers."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    host, retried = socket.gethostname(), []
    trials = study.get_trials(deepcopy=False)
    repeated = {retried_from(t) for t in trials}
    for t in trials:
        if t.number in repeated:
            continue
        if t.state == TrialState.RUNNING:
            pid = int(t.user_attrs.get("pid", -1))
            if t.user_attrs.get("host") != host or (pid not in gone and _alive(pid)):
                continue
            study._storage.set_trial_user_attr(t._trial_id, "error", "interrupted (its worker was killed)")
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
            if len(t.system_attrs.get("retry_history") or []) >= MAX_WORKER_RETRIES:
                continue  # it killed its worker every time: left failed
            RetryHeartbeatStaleTrialCallback(max_retry=None)(study, study._storage.get_trial(t._trial_id))
        elif t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
            RetryHeartbeatStaleTrialCallback(max_retry=None)(study, t)  # a stop of the user's or the machine's
        else:
            continue
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
