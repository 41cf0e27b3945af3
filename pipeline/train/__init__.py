"""Stage 2, `regtok train`: the register modules trained on a feature store → a run directory.

Reads: a feature store (extract/) and optionally a held-out one for validation. Writes: ``RUN/`` with
``checkpoint.safetensors``, ``best.safetensors``, ``buffers.safetensors``, ``start.safetensors``, ``state.pt``,
``config.json``, ``metrics.jsonl``, ``curves.png``, ``tb/`` (``--tensorboard``) and ``manifest.json``.

- ``stage.py``: :func:`train_run`, the entry point (it hands the model and data to :func:`regtok.train.train`).
- ``runs.py`` and ``weights.py``: the run directory's files, written here; ``run_load.py``: :func:`load_run`,
  how eval, sweep, embed and rerun read a run back (they import these names from here).
- ``curves.py``: ``curves.png``; ``tensorboard_log.py``: TensorBoard events of a run and of a sweep.
"""

from regtok.pipeline import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "stage": ("Split", "StoreCache", "build_model", "train_run"),
    "run_load": ("load_run", "recorded_files", "run_input", "training_store_manifest"),
    "runs": ("CONFIG", "MANIFEST", "METRICS", "counted_from_one", "epoch_records", "kept_record", "metrics_lines",
             "saved_train_config", "stopped_after"),
    "weights": ("BEST", "BUFFERS", "CHECKPOINT", "START", "WriteFailed", "read_weights", "weights_file"),
    "curves": ("recall_limits",),
    "tensorboard_log": ("require_tensorboard", "write_sweep_experiment"),
})
