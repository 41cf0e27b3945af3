"""Progress bars and messages on stderr (rich); stdout is kept for results."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

OFF_TERMINAL_WIDTH = 1000  # columns: a log file or CI gets whole tables and lines, never cut at 80


def stderr_console() -> Console:
    """A rich console writing to stderr; off a terminal (a file, a pipe, CI) as wide as its longest table."""
    return wide(Console(stderr=True))


def stdout_console() -> Console:
    """A rich console writing to stdout (results), as wide off a terminal as :func:`stderr_console`."""
    return wide(Console())


def wide(console: Console) -> Console:
    """``console`` itself on a terminal; off one, the same stream at :data:`OFF_TERMINAL_WIDTH` columns."""
    if console.is_terminal:
        return console
    return Console(file=console.file, width=OFF_TERMINAL_WIDTH, stderr=console.stderr)


def heading(console: Console, text: str) -> None:
    """A section heading: a rule across a terminal, a short ``── text ──`` line elsewhere."""
    if console.is_terminal:
        console.rule(text)
    else:
        console.print(f"── {text} ──")


def progress(console: Console | None = None, *extra_columns, disable: bool = False) -> Progress:
    """A progress display on stderr: description, bar, n/total, %, elapsed, remaining, plus ``extra_columns``.

    Use ``TextColumn("{task.fields[rate]}")``-style extra columns for samples/s, skipped counts or losses.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *extra_columns,
        console=console or stderr_console(),
        disable=disable,
        transient=False,
    )


@contextmanager
def extract_progress(total: int | None, enabled: bool, console=None,
                     shards: int = 0) -> Iterator[Callable[[int, int, bool], None]]:
    """Progress on stderr (samples, samples/s, skipped); yields the ``on_batch(samples, skipped, shard_done)``
    callback. A rich bar on a terminal; otherwise (a log file, nohup, CI) one plain line every few of the
    ``shards`` this rank reads, and after the last."""
    if not enabled:
        yield lambda samples, skipped, done=False: None
        return
    console = console or stderr_console()
    t0, seen = time.perf_counter(), [0, 0, 0]  # samples, skipped, shards finished

    def count(samples: int, skipped: int, done: bool) -> float:
        seen[0] += samples
        seen[1] += skipped
        seen[2] += bool(done)
        return seen[0] / max(time.perf_counter() - t0, 1e-9)

    if not console.is_terminal:
        every = max(1, shards // 10)

        def on_line(samples: int, skipped: int, done: bool = False) -> None:
            rate = count(samples, skipped, done)
            if done and (seen[2] % every == 0 or seen[2] == shards):
                console.print(f"extract: {seen[2]}/{shards} shards, {seen[0]} samples, skipped {seen[1]}, "
                              f"{rate:.1f} samples/s, {time.perf_counter() - t0:.1f} s", markup=False,
                              highlight=False, soft_wrap=True)

        yield on_line
        return
    bar = progress(console, TextColumn("{task.fields[rate]} samples/s"), TextColumn("skipped {task.fields[skipped]}"))
    with bar:
        task = bar.add_task("extract", total=total, rate="-", skipped=0)

        def on_batch(samples: int, skipped: int, done: bool = False) -> None:
            rate = count(samples, skipped, done)
            bar.update(task, advance=samples + skipped, rate=f"{rate:.1f}", skipped=seen[1])

        yield on_batch


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """One complete progress line for an epoch's metrics record: every loss term, then validation R@1 (%)."""
    from regtok.train import full_r1

    skip = ("type", "step", "epoch", "seconds", "samples_per_s")
    terms = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in skip and not k.startswith("val"))
    r1 = full_r1(record)
    val = f" val R@1 {100 * r1:.1f}%" if r1 is not None else ""
    if r1 is not None and "val_r1_flow_a_to_b" in record:
        val += f" (select {100 * record['val_select']:.1f}%)"
    return (f"epoch {record['epoch']}/{epochs} step {record['step']}: {terms}{val} "
            f"({record.get('seconds', 0):.1f} s, {record.get('samples_per_s', 0):.0f} samples/s)")


@contextmanager
def train_progress(console, disable: bool) -> Iterator[Callable[[int, int, dict], None]]:
    """A rich progress bar on stderr; yields the trainer's ``on_step(step, total, record)`` callback."""
    with progress(console, TextColumn("{task.fields[info]}"), disable=disable) as bar:
        task = bar.add_task("train", total=None, info="")

        def on_step(step: int, total: int, record: dict) -> None:
            skip = ("samples_per_s", "epoch", "lr", "grad_norm", "logit_scale", "loss")
            terms = " ".join(f"{k[:5]} {v:.3f}" for k, v in record.items() if "/" not in k and k not in skip)
            bar.update(task, completed=step, total=total, description=f"epoch {record['epoch']}",
                       info=f"loss {record['loss']:.3f} ({terms}) {record['samples_per_s']:.0f}/s")

        yield on_step
