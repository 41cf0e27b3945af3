"""Issue 20, sweeps: nothing lost on Ctrl-C or a killed worker, no sweep called complete when it is not, and every
space or storage that cannot work refused before a trial starts. Trials are 1 epoch on a 120-row store.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from click.testing import Result
from conftest import one_line_error, regtok_cli, write_store

BASE = ["--preset", "tiny", "--epochs", "1", "--val-fraction", "0.25", "--batch-size", "32", "--no-prune",
        "model.n_layers=1"]
TWO = ["--grid", "lr=0.001,0.0003"]

pytestmark = pytest.mark.usefixtures("no_figures")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("faults_sweep") / "store", n=120, dim=12)


def sweep(store: Path, out: Path, *args: str) -> Result:
    return regtok_cli("sweep", "--features", store, "--out", out, *args, *BASE)


def trials_of(out: Path) -> dict[int, dict]:
    return {t["number"]: t for t in json.loads((out / "report.json").read_text())["trials"]}


def points(out: Path, state: str = "complete") -> set[tuple]:
    return {tuple(sorted(t["params"].items())) for t in trials_of(out).values() if t["state"] == state}


# ── 3. Ctrl-C: one line, and the interrupted trials run again on resume ───────────────────────────────
# (5, a worker killed with -9, is test_sweep.py's test_two_workers_share_the_study_and_run_each_point_once.)


def test_3_a_trial_interrupted_by_ctrl_c_runs_again_on_resume(store, tmp_path, monkeypatch):
    from regtok.pipeline import train as train_mod

    real, calls = train_mod.train_run, []

    def interrupted(features, out, cfg, **kw):
        calls.append(out)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(features, out, cfg, **kw)

    monkeypatch.setattr(train_mod, "train_run", interrupted)
    result = sweep(store, tmp_path / "s", *TWO)
    assert result.exit_code == 130, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: interrupted") and "run the same command again" in lines[-1]
    assert "Traceback" not in result.stderr
    monkeypatch.setattr(train_mod, "train_run", real)
    result = sweep(store, tmp_path / "s", *TWO)
    assert result.exit_code == 0, result.output
    assert len(points(tmp_path / "s")) == 2  # the interrupted point ran too


@pytest.fixture
def ctrl_c_acted_on():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal. A suite started in the background by a
    script (``cmd &`` in a non-interactive shell: .ci/run's callers) inherits SIGINT ignored, as POSIX has it, and a
    sweep started so ignores Ctrl-C too; that is the caller's choice, not what this test is about."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def test_3_ctrl_c_to_the_sweep_alone_stops_its_workers_at_once(store, tmp_path, hook, ctrl_c_acted_on):
    """SIGINT to the sweep's process only (here, this test's own process) while both workers are in a trial that
    would take two minutes: the workers stop at once, the one error line says how to resume, and the resumed
    sweep runs both points."""
    import threading

    marks, out, returned = hook("hang"), tmp_path / "s", threading.Event()

    def interrupt_once_both_run() -> None:  # never once the sweep has returned: it would stop pytest itself
        while len(list(marks.iterdir())) < 2:
            if returned.wait(0.05):
                return
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_both_run, daemon=True).start()
    t0 = time.perf_counter()
    try:
        result = sweep(store, out, *TWO, "--jobs", "2")
    finally:
        returned.set()
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 130 and "Traceback" not in result.stderr, result.output
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:] and "run the same command again" in lines[-1]
    assert "trial(s) 0, 1 will run again" in lines[-1] and time.perf_counter() - t0 < 100
    result = sweep(store, out, *TWO)
    assert result.exit_code == 0, result.output
    assert len(points(out)) == 2


# ── 4. a sweep stopped while queueing its grid queues the rest on resume ──────────────────────────────


def test_4_a_sweep_stopped_while_queueing_its_grid_resumes_with_the_whole_grid(store, tmp_path, monkeypatch):
    import optuna

    real, added = optuna.Study.add_trial, []

    def add_trial(self, trial):
        added.append(trial)
        if len(added) == 2:  # the second grid point
            raise KeyboardInterrupt
        return real(self, trial)

    monkeypatch.setattr(optuna.Study, "add_trial", add_trial)
    assert sweep(store, tmp_path / "s", *TWO).exit_code != 0
    monkeypatch.setattr(optuna.Study, "add_trial", real)
    result = sweep(store, tmp_path / "s", *TWO)
    assert result.exit_code == 0, result.output
    assert len(points(tmp_path / "s")) == 2


def test_5_two_workers_asking_at_once_never_take_the_same_queued_trial(tmp_path):
    """Found while testing finding 5: SQLite ignores Optuna's SELECT … FOR UPDATE, so two workers could both move
    one waiting trial to running (7 of 30 pops were duplicates before the fix)."""
    import threading

    import optuna

    from regtok.pipeline.sweep.study import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=open_storage(url), study_name="s")
    for i in range(30):
        study.enqueue_trial({"x": i})
    workers = [optuna.load_study(study_name="s", storage=open_storage(url)) for _ in range(3)]
    taken: list[list[int | None]] = [[] for _ in workers]
    start = threading.Barrier(len(workers))

    def ask(i: int) -> None:
        start.wait()
        taken[i].extend(workers[i]._pop_waiting_trial_id() for _ in range(10))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [x for got in taken for x in got]
    assert None not in ids and len(set(ids)) == 30


# ── 6, 7. worker count and grid size are checked ───────────────────────────────────────────────────────


def test_6_jobs_are_capped_at_the_trials_left_and_warned_above_the_cores(store, tmp_path, monkeypatch):
    import multiprocessing.context

    from regtok.pipeline.sweep.pool import worker_count

    def never(*a, **kw):
        raise AssertionError("a worker process was started for a 1-trial sweep")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", never)
    result = sweep(store, tmp_path / "s", "--grid", "lr=0.001", "--jobs", "64")
    assert result.exit_code == 0, result.output
    assert "1 worker" in result.stderr
    jobs, notes = worker_count(64, trials_left=3, cores=2)
    assert jobs == 3 and any("cores" in n for n in notes)


def test_7_a_grid_above_the_limit_is_refused_at_once(store, tmp_path):
    axes = ["lr", "weight_decay", "beta1", "min_lr_ratio", "seed", "warmup_steps"]
    grid = [x for i, key in enumerate(axes) for x in ("--grid", f"{key}=" + ",".join(
        str(j if key in ("seed", "warmup_steps") else round(0.01 * (j + 1), 3)) for j in range(10)))]
    t0 = time.perf_counter()
    message = one_line_error(sweep(store, tmp_path / "s", *grid))
    from regtok.pipeline.sweep.study import MAX_GRID_POINTS

    assert "1,000,000" in message and f"{MAX_GRID_POINTS:,}" in message and time.perf_counter() - t0 < 30
    assert f"{MAX_GRID_POINTS:,}" in " ".join(regtok_cli("sweep", "--help").output.split())


# ── 8. an emptied study.db beside its trials ───────────────────────────────────────────────────────────


def test_8_an_emptied_study_beside_its_trials_is_refused_and_the_report_kept(store, tmp_path):
    out = tmp_path / "s"
    assert sweep(store, out, *TWO).exit_code == 0
    report = (out / "report.json").read_text()
    (out / "study.db").write_bytes(b"")
    message = one_line_error(sweep(store, out, *TWO))
    assert "study.db" in message
    assert (out / "report.json").read_text() == report


# ── 18. space values that cannot work, refused before any trial ───────────────────────────────────────


@pytest.mark.parametrize("space, needle", [
    ("lr: [.nan, 1.0e-3]\n", "lr"), ("lr: [-1, 1.0e-3]\n", "lr"), ("device: [cpu, 'cuda:7']\n", "cuda:7"),
    ("lr: [0.0003, 3.0e-4]\n", "twice"), ("lr: [1.0e-3]\nepochs: [1]\nlr: [1.0e-4]\n", "lr"),
    ("lr: {low: 1.0e-4, high: 1.0e-2, step: -1}\n", "step"),
])
def test_18_space_values_that_cannot_work_are_refused_before_any_trial(store, tmp_path, space, needle):
    (tmp_path / "space.yaml").write_text(space)
    sampler = ["--sampler", "random", "--trials", "2"] if "low" in space else []
    message = one_line_error(sweep(store, tmp_path / "s", "--space", tmp_path / "space.yaml", *sampler))
    assert needle in message
    assert not (tmp_path / "s").exists()  # refused before anything is written


# ── 13, 21. an environment error stops the sweep, and its trial runs again; storages that cannot work ──


def test_13_21_a_read_only_trial_directory_stops_the_sweep_and_the_trial_runs_again(store, tmp_path, monkeypatch):
    """The same path as a full disk (regtok.pipeline.train.weights.WriteFailed, or OSError ENOSPC)."""
    import errno

    from regtok.pipeline import train as train_mod

    real = train_mod.train_run

    def read_only(features, out, cfg, **kw):
        if Path(out).name == "0001":
            raise OSError(errno.EACCES, "Permission denied", str(out))
        return real(features, out, cfg, **kw)

    monkeypatch.setattr(train_mod, "train_run", read_only)
    message = one_line_error(sweep(store, tmp_path / "s", *TWO))
    assert "0001" in message and "Permission denied" in message and "run the same command again" in message
    monkeypatch.setattr(train_mod, "train_run", real)
    assert sweep(store, tmp_path / "s", *TWO).exit_code == 0
    assert len(points(tmp_path / "s")) == 2


def test_21_an_in_memory_storage_is_refused(store, tmp_path):
    message = one_line_error(sweep(store, tmp_path / "s", *TWO, "--storage", "sqlite:///:memory:", "--jobs", "2"))
    assert ":memory:" in message


def test_5_a_sweep_that_ends_with_trials_left_is_an_error_naming_them():
    """A worker killed with -9 on this machine leaves its trial RUNNING: the sweep ends with an error, not exit 0;
    a trial that runs on another machine is a warning to run the command again."""
    import socket

    import optuna

    from regtok.errors import RegtokError
    from regtok.pipeline.sweep.pool import check_finished

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    for value in (0.5, 0.6, 0.7):
        study.tell(study.ask(), value)
    left = study.ask()
    left.set_user_attr("host", socket.gethostname())
    said: list[str] = []
    with pytest.raises(RegtokError, match="the sweep is incomplete: 3 of 4 trials finished"):
        check_finished(study, 4, [], said.append)
    left.set_user_attr("host", "another-machine")
    check_finished(study, 4, [], said.append)
    assert len(said) == 1 and f"trial(s) {left.number} still run on other machines" in said[0]
    with pytest.raises(RegtokError, match=r"3 of 4 trials finished \(worker 1 died"):
        check_finished(study, 4, ["worker 1 died"], said.append)
