"""How far apart scores are, as `regtok sweep` and `regtok compare` report it.

Runs that differ only in their ``seed`` are one configuration measured several times: they make one row with
the mean ± sample standard deviation and their number n, the way Stage-2 methods are compared. A recall over N
validation queries moves in steps of 1/N (the mean of both directions in half-steps), so two scores less than
a step apart are not told apart by that validation set: :func:`within_one_step` names them.

Recalls are fractions (0–1) in JSON files and percentages in what a person reads (tables, Markdown, figures).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

# Config keys that never change what a run learns or how it is scored: a seed group ignores them too.
NOT_A_METHOD = ("seed", "device", "compile", "log_every", "checkpoint_every", "max_memory_fraction")


def pct(value: float | None, digits: int = 1) -> str:
    """A recall as a percentage for a person: 0.8333 → "83.3"; None → "—"."""
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:.{digits}f}"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def spread_text(values: Sequence[float], percent: bool = True, n: int | None = None) -> str:
    """"83.3 ± 1.2" for several values (with " (n=2)" when fewer than the row's ``n``; "± 0.0" when they are all
    equal, so a row of several seeds never reads as one), the value itself for one; recalls as percentages when
    ``percent``."""
    if not values:
        return "—"
    mean, std = mean_std(values)
    if len(values) == 1:
        return pct(values[0]) if percent else f"{values[0]:.4g}"
    text = f"{pct(mean)} ± {pct(std)}" if percent else f"{mean:.4g} ± {std:.2g}"
    return text + (f" (n={len(values)})" if n is None or len(values) != n else "")


def seed_groups(items: Iterable[T], config: Callable[[T], dict[str, Any]],
                ignore: Sequence[str] = NOT_A_METHOD) -> list[list[T]]:
    """``items`` grouped by their (flat) config without the keys in ``ignore``, in order of first appearance."""
    groups: dict[str, list[T]] = {}
    for item in items:
        key = json.dumps({k: v for k, v in config(item).items() if k.split(".")[-1] not in ignore},
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def resolution(n: int | None) -> float | None:
    """The step of a recall over ``n`` queries (1/n), None when n is unknown."""
    return 1.0 / n if n else None


def resolution_text(n: int | None, rows: str = "validation rows") -> str:
    """"N = 28 validation rows: a recall moves in steps of 1/N = 3.6 %"."""
    if not n:
        return f"N ({rows}) unknown"
    return f"N = {n} {rows}: a recall moves in steps of 1/N = {100 / n:.2g} %"


def within_one_step(values: dict[Any, float], n: int | None) -> list[Any]:
    """The names whose value is within one step (1/n) of the best, the best included; [] when n is unknown."""
    step = resolution(n)
    if step is None or not values:
        return []
    best = max(values.values())
    return [name for name, v in values.items() if best - v <= step + 1e-12]


VALIDATE_MORE = "Validate on more rows (--val-fraction, --val-features) or compare means over seeds."
EVALUATE_MORE = "Evaluate on a larger held-out split or compare means over seeds."


def tie_warning(names: list[Any], total: int, n: int | None, what: str = "trials", data: str = "validation set",
                advice: str = VALIDATE_MORE) -> str | None:
    """A sentence when more than one of ``total`` entries is within one step of the best, else None."""
    if len(names) < 2 or not n:
        return None
    return (f"{len(names)} of {total} {what} ({', '.join(map(str, names[:8]))}{' …' if len(names) > 8 else ''}) "
            f"are within one step (1/N = {100 / n:.2g} %, N = {n}) of the best: this {data} cannot tell them apart. "
            + advice)
