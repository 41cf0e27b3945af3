"""Searching and comparing configurations: `regtok sweep` and `regtok compare`.

Reads: a feature store (extract/) for the sweep; runs, eval reports and sweeps for compare. Writes: ``SWEEP/``
with ``trials/NNNN/`` (one ordinary run each, train/), ``study.db``, ``report.json``, ``report.md``,
``sweep.png``, ``best.yaml``, ``sweep.json`` and ``manifest.json``; compare prints tables and, with ``--out``,
writes ``compare.md`` and ``curves.png``.

- ``stage.py``: :func:`run_sweep`, the entry point; ``space.py``: search spaces; ``study.py``: the Optuna study;
  ``pool.py``: the worker processes; ``worker.py``: one worker's trials.
- ``report.py`` and ``plot.py``: what a sweep reports; ``spread.py``: mean ± std over seeds and the resolution
  of a recall; ``compare.py``: :func:`run_compare`, the entry point of `regtok compare`.
"""

from regtok.pipeline import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "stage": ("KEEP", "METRICS", "PRUNERS", "SAMPLERS", "SweepConfig", "run_sweep"),
    "space": ("parse_grid", "parse_space"),
    "study": ("MAX_GRID_POINTS",),
    "report": ("notes",),
    "spread": ("pct",),
    "compare": ("run_compare",),
})
