"""Shared by every stage: where and how it runs.

- ``console.py``: progress and messages on stderr (rich); stdout is kept for results.
- ``config_io.py``: YAML config diffs and ``key=value`` overrides from outside the code.
- ``figures.py``: matplotlib with a file backend, when it is installed.
- ``distributed.py``: the torchrun rank, the process group, the memory a stage may fill.
- ``startup.py``: the garbage collector while libraries load, and malloc (imports nothing heavy).

Imports nothing from a stage.
"""
