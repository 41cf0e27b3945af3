"""Progress bars and messages on stderr (rich); stdout is kept for results."""

from __future__ import annotations

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


def stderr_console() -> Console:
    """A rich console writing to stderr."""
    return Console(stderr=True)


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
