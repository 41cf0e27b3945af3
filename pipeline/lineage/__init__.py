"""The whole pipeline and its records: `regtok demo`, `show`, `verify` and `rerun`.

Reads: any manifest (dataset, features, run, eval, sweep) and the files it records; the demo reads nothing.
Writes: nothing for show and verify; rerun writes the stage it reruns into a new directory; the demo writes every
stage's directory under ``OUT`` (shards, features, run, eval).

- ``chain.py``: :func:`lineage` (a manifest's inputs back to the shards, `regtok show`) and :func:`verify`
  (recorded hashes against the files, `regtok verify`).
- ``rerun.py``: :func:`rerun_stage`, a stage re-executed from its manifest alone, through that stage's entry point.
- ``demo.py``: :func:`run_demo`, synth → extract → train → eval on the embedded synthetic set.
"""

from regtok.pipeline import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "chain": ("lineage", "summary_line", "verify"),
    "rerun": ("rerun_stage",),
    "demo": ("run_demo",),
})
