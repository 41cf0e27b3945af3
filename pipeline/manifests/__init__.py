"""Shared by every stage: the records it writes and the directories it writes them into.

- ``manifest.py``: one manifest schema (dataset, features, run, eval, sweep): hashes, inputs, environment, atomic
  JSON writes; every stage writes one and reads the one before it.
- ``labels.py``: the ``labels`` block of dataset and features manifests (schemas, groups).
- ``outdir.py``: a stage writes only into an empty directory or its own earlier output (``--overwrite`` else).

Imports nothing from a stage.
"""
