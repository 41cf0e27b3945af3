"""The worker processes of one sweep on this machine: how many, started again when one died with its trial,
stopped at once by Ctrl-C, and whether the study has all its trials when they are done.

``--jobs J`` workers (never more than the trials left) run in spawned processes, one in this process when J is 1.
Ctrl-C (to the sweep alone or to its process group) sends each worker one SIGINT: the worker marks its trial to
run again and exits, and the trials are queued again before the sweep exits with one line.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from regtok.errors import RegtokError
from regtok.pipeline.sweep.study import recover_interrupted

MAX_ROUNDS = 3  # worker starts per sweep: again after a worker died with its trial, not forever


def worker_count(jobs: int, trials_left: int, cores: int) -> tuple[int, list[str]]:
    """``jobs`` capped at the trials left to run (each worker loads torch and the store), and notes for the user:
    the cap, and more workers than CPU cores (they compete for the cores and for memory)."""
    n, notes = max(1, min(jobs, trials_left)), []
    if n < jobs:
        notes.append(f"--jobs {jobs}: {trials_left} trial(s) left to run, so {n} worker{'s' if n > 1 else ''}")
    if n > cores:
        notes.append(f"warning: {n} workers on {cores} CPU cores compete for them and for memory; fewer --jobs "
                     "is usually faster")
    return n, notes


def run_rounds(spec: Any, jobs: int, study: Any, total: int, console: Any, show_progress: bool) -> list[str]:
    """Start workers until the study has its trials, again when a worker died with its trial (at most
    :data:`MAX_ROUNDS` times); returns why workers stopped early (a worker's error), if any."""
    from regtok.pipeline.sweep.stage import say_to
    from regtok.pipeline.sweep.worker import settled

    say = say_to(console)
    for round_ in range(MAX_ROUNDS):
        left = total - settled(study)
        if left <= 0:
            return []
        n, notes = worker_count(jobs, left, os.cpu_count() or 1)
        for note in notes if round_ == 0 else []:
            say(note)
        gone, errors = _run_workers(spec, n, study, total, console, show_progress)
        retried = recover_interrupted(study, gone)
        if errors or not retried:
            return errors
        say(f"trial(s) {', '.join(map(str, retried))} lost their worker: queued again")
    return []


def _run_workers(spec: Any, jobs: int, study: Any, total: int, console: Any,
                 show_progress: bool) -> tuple[list[int], list[str]]:
    """One worker in this process, or ``jobs`` worker processes, with a progress display of the study; returns
    the pids of the workers (all gone now) and the exit statuses of those that stopped on an error."""
    import multiprocessing as mp
    from dataclasses import replace as with_

    from regtok.pipeline.runtime.console import progress
    from regtok.pipeline.sweep.worker import run_worker, spawn_worker

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

    with bar:
        if jobs == 1:
            run_worker(spec, on_trial=refresh)
            refresh()
            return [os.getpid()], []
        threads = max(1, (os.cpu_count() or 1) // jobs)
        ctx = mp.get_context("spawn")  # torch and sqlite connections do not survive fork
        procs = [ctx.Process(target=spawn_worker, args=(with_(spec, index=i, threads=threads,
                                                               parent_pid=os.getpid()),)) for i in range(jobs)]
        for p in procs:
            p.start()
        killed: set[int] = set()
        try:
            while any(p.is_alive() for p in procs):
                refresh()
                _requeue_killed(procs, killed, study, console)
                time.sleep(0.5)
        except KeyboardInterrupt:
            _stop_workers(procs)
            raise
        finally:
            for p in procs:
                p.join()
        refresh()
    errors = [f"a worker stopped (exit status {p.exitcode})" for p in procs if p.exitcode and p.exitcode > 0]
    if len(errors) == len(procs):
        raise RegtokError(f"every sweep worker stopped on an error ({errors[0]}); see the lines above")
    return [p.pid for p in procs], errors


def _requeue_killed(procs: list, killed: set[int], study: Any, console: Any) -> None:
    """A worker killed by a signal (out of memory, kill -9) while others run: its trial is queued again at once,
    for a worker still running to take."""
    from regtok.pipeline.sweep.stage import say_to

    dead = [p.pid for p in procs if p.exitcode is not None and p.exitcode < 0 and p.pid not in killed]
    if dead:
        killed.update(dead)
        retried = recover_interrupted(study, gone=dead)
        if retried:
            say_to(console)(f"trial(s) {', '.join(map(str, retried))} lost their worker: queued again")


def _stop_workers(procs: list, wait_s: float = 30.0) -> None:
    """Ctrl-C: each worker gets one SIGINT (its trial is marked to run again) and a while to stop, then SIGKILL.
    A second Ctrl-C meanwhile is ignored, so the stop is not cut short into a traceback."""
    import signal

    with _sigint_ignored():
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        deadline = time.monotonic() + wait_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()


def requeue(study: Any) -> str:
    """After Ctrl-C: queue the stopped trials again now (workers of this process are gone), and say which."""
    with _sigint_ignored():
        try:
            retried = recover_interrupted(study, gone=[os.getpid()])
        except Exception:  # the storage itself was interrupted: the next run queues them
            return "the trials that were running will run again"
    return f"trial(s) {', '.join(map(str, retried))} will run again" if retried else "no trial was running"


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ctrl-C ignored while the sweep stops (only the main thread may change it; elsewhere nothing changes)."""
    import signal

    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_finished(study: Any, total: int, errors: list[str], say: Any) -> None:
    """A sweep that ends with trials left is an error naming them, unless they run on other machines."""
    import socket

    from optuna.trial import TrialState

    from regtok.pipeline.sweep.worker import settled

    done = settled(study)
    if done >= total and not errors:
        return
    trials = study.get_trials(deepcopy=False)
    elsewhere = [t.number for t in trials if t.state == TrialState.RUNNING
                 and t.user_attrs.get("host") != socket.gethostname()]
    if elsewhere and not errors:
        say(f"warning: trial(s) {', '.join(map(str, elsewhere))} still run on other machines; run the command "
            "again once they finish to update the report")
        return
    why = f" ({errors[0]}; see the lines above)" if errors else ""
    raise RegtokError(f"the sweep is incomplete: {done} of {total} trials finished{why}; run the same command "
                      "again to continue")


def _status_column() -> Any:
    from rich.progress import TextColumn

    return TextColumn("{task.fields[status]}")


def _status(study: Any) -> tuple[int, str, list[tuple[int, str]]]:
    """(finished count, one status line, [(number, line) per finished trial]), from the report's trial rows."""
    from regtok.pipeline.sweep.report import trial_rows
    from regtok.pipeline.sweep.spread import pct

    rows = trial_rows(study)  # best complete trial first
    count = {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "running")}
    best = next((f"best {pct(r['value'])} % (trial {r['number']})" for r in rows
                 if r["state"] == "complete" and r["value"] is not None), "best —")
    status = f"{count['running']} running, {count['pruned']} pruned, {count['fail']} failed; {best}"
    finished = [(r["number"], f"trial {r['number']}: {r['state']} {pct(r['value'])} % {json.dumps(r['params'])}"
                 + (f" ({r['error']})" if r["state"] == "fail" and r["error"] else ""))
                for r in sorted(rows, key=lambda r: r["number"]) if r["state"] != "running"]
    return count["complete"] + count["pruned"], status, finished
