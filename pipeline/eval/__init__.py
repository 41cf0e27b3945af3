"""Stage 3, `regtok eval`: a run and a held-out feature store → a report directory.

Reads: a run (train/), a held-out store and the rows the run trained on (extract/), to fit the probes, the
reconstruction references and the baselines. Writes: ``REPORT/report.json``, ``report.md``, ``prefix.png``,
``manifest.json`` and, with ``--save-embeddings``, ``embeddings.h5`` (embed/'s format).

- ``stage.py``: :func:`run_eval`, the entry point (metrics: :func:`regtok.evaluate.evaluate`, baselines:
  :mod:`regtok.baselines`).
- ``report.py``: the report files; ``report_md.py``: report.md's tables, the headline and the terminal table;
  ``plots.py``: ``prefix.png``.
"""

from regtok.pipeline import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "stage": ("EVAL_METHOD", "EVAL_METHODS", "run_eval"),
    "report_md": ("headline_sentence", "parts_line", "reconstruction_line", "retrieval_rows"),
})
