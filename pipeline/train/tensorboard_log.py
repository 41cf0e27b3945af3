"""TensorBoard event files: a run's (``RUN_DIR/tb/``) and a sweep's HParams experiment (``SWEEP_DIR/tb/``).

A run's events, against the optimizer step (recalls as fractions 0–1, as in ``metrics.jsonl``):

    train/<term>    every loss term, lr, grad_norm and samples_per_s at each logged step and at the last step of
                    every epoch (so a run shorter than log_every still has them)
    epoch/<term>    the epoch means of the loss terms
    val/<name>      validation before training and after each epoch: val/r1_full_a_to_b, val/r1_k1_b_to_a,
                    val/r1_flow_* (flow runs), val/select (what keep_best ranks epochs by), val/R@1 (full
                    prefix, mean of both directions)
    kept/<name>     once, at the end: the validation of the epoch whose weights eval uses, and kept/epoch
    final/<name>    once, at the end: the last epoch's validation
    config          (text) the resolved config as YAML
    HParams         the run as a session: every config key (dotted) as a hyper-parameter

The HParams dashboard's table and parallel-coordinates views then compare runs under one ``--logdir``. A sweep
also writes the experiment: the swept keys with their choices, and the metrics ``kept/select``, ``kept/R@1``,
``kept/epoch`` and ``final/select``, so its view shows exactly what the sweep varied.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from regtok.config import flatten
from regtok.errors import RegtokError
from regtok.train import full_r1

TENSORBOARD_MISSING = "--tensorboard needs the tensorboard package: pip install -e '.[tb]'"
SWEEP_METRICS = ("kept/select", "kept/R@1", "kept/epoch", "final/select", "final/R@1")


def require_tensorboard() -> None:
    """One error line, before any work, when the tensorboard package is missing."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise RegtokError(TENSORBOARD_MISSING)


def _writer(logdir: Path, purge_step: int | None = None) -> Any:
    """An event writer into ``logdir``, checked first to be a directory this process can write into (the writer's
    own thread would fail later, with a traceback)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RegtokError(TENSORBOARD_MISSING) from None
    if logdir.exists() and not logdir.is_dir():
        raise RegtokError(f"{logdir} is a file, not a directory; --tensorboard writes its event files there")
    logdir.mkdir(parents=True, exist_ok=True)
    probe = logdir / f".probe.{os.getpid()}.tmp"
    with open(probe, "w"):
        pass
    probe.unlink()
    return SummaryWriter(str(logdir), purge_step=purge_step)


def tag(group: str, key: str) -> str:
    """``val_r1_full_a_to_b`` → ``val/r1_full_a_to_b``, ``val_select`` → ``val/select``: no repeated prefix."""
    return f"{group}/{key.removeprefix(group + '_')}"


def hparam_values(config: dict[str, Any]) -> dict[str, Any]:
    """A nested config as HParams values: dotted keys; booleans as "true"/"false" (the plugin has no bool type
    in torch's writer); numbers and text as they are."""
    out = {}
    for key, value in flatten(config).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, int | float | str):
            out[key] = value
    return out


class TensorBoardLog:
    """A run's event files (see the module docstring)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], purge_step: int | None = None):
        import yaml
        from torch.utils.tensorboard.summary import hparams

        self.writer = _writer(run_dir / "tb", purge_step)
        text = yaml.safe_dump(config, sort_keys=False).rstrip()
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()), 0)  # a code block
        _, start, self._end = hparams(hparam_values(config), {})
        self.writer.file_writer.add_summary(start)

    def log(self, record: dict[str, Any]) -> None:
        kind, step = record.get("type"), int(record.get("step", 0))
        for key, value in record.items():
            if key in ("type", "step", "epoch") or not isinstance(value, int | float):
                continue
            group = "val" if key.startswith("val_") else ("train" if kind == "step" else "epoch")
            self.writer.add_scalar(tag(group, key), value, step)
        r1 = full_r1(record)
        if r1 is not None:
            self.writer.add_scalar("val/R@1", r1, step)

    def finish(self, kept: dict[str, Any] | None, last: dict[str, Any] | None) -> None:
        """The run's results for the HParams views: ``kept/*`` (the weights eval uses) and ``final/*``."""
        for group, record in (("kept", kept), ("final", last)):
            if record is None:
                continue
            values = {tag(group, k.removeprefix("val_")): v for k, v in record.items() if k.startswith("val_")}
            values[f"{group}/epoch"] = record["epoch"]
            if full_r1(record) is not None:
                values[f"{group}/R@1"] = full_r1(record)
            for name, value in values.items():
                self.writer.add_scalar(name, value, int(last["step"] if last else record["step"]))
        self.writer.file_writer.add_summary(self._end)

    def close(self) -> None:
        self.writer.close()


def write_sweep_experiment(sweep_dir: Path, space: dict[str, list[Any] | None], metric: str = "val/select") -> Path:
    """``SWEEP_DIR/tb/``: the HParams experiment of a sweep (``space``: each swept key with its choices, or None
    for a range), so TensorBoard shows the swept keys and the sweep's metrics across the trials' sessions."""
    from torch.utils.tensorboard.summary import hparams

    values, domains = {}, {}
    for key, choices in space.items():
        shown = [hparam_values({key: c})[key] for c in choices] if choices else [0.0]  # a range: a number axis
        values[key] = shown[0]
        if choices and len({type(v) for v in shown}) == 1:
            domains[key] = shown
    chosen = tag("kept", metric.replace("val/", "val_").removeprefix("val_"))  # the sweep's --metric, kept
    experiment, _, _ = hparams(values, dict.fromkeys([*SWEEP_METRICS, chosen], 0.0), domains)
    writer = _writer(sweep_dir / "tb")
    writer.file_writer.add_summary(experiment)
    writer.close()
    return sweep_dir / "tb"
