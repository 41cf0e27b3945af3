"""Search spaces for `regtok sweep`: a YAML mapping of config keys to choices or ranges, checked against the config.

    model.n_shared: [4, 8]                      # choices: a grid axis (every sampler)
    model.loss_type: [contrastive, combined]
    lr: {low: 1.0e-4, high: 1.0e-3, log: true}  # a range: tpe and random samplers only
    model:                                      # nested mappings are the same as dotted keys
      n_layers: [1, 2]

Keys are :class:`regtok.config.TrainConfig` fields (``model.…`` for the model). Every choice is resolved against
the sweep's base config up front, so a bad key or value is one error before any trial starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any

from regtok.config import TrainConfig, flatten, from_dict, merge, nested, to_dict
from regtok.errors import RegtokError


@dataclass(frozen=True)
class Choices:
    values: tuple[Any, ...]

    def suggest(self, trial: Any, name: str) -> Any:
        return trial.suggest_categorical(name, list(self.values))

    def to_json(self) -> Any:
        return list(self.values)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False
    step: float | None = None
    integer: bool = False  # set from the config field's type

    def suggest(self, trial: Any, name: str) -> Any:
        if self.integer:
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)

    def to_json(self) -> Any:
        out = {"low": self.low, "high": self.high, "log": self.log}
        return out if self.step is None else {**out, "step": self.step}


Param = Choices | Range


def config_keys(cls: type = TrainConfig, prefix: str = "") -> dict[str, type]:
    """Every leaf key of a config dataclass, dotted (``model.n_shared``), with its annotated type."""
    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(config_keys(tp, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = tp
    return out


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"n_layers": [1, 2]}} → {"model.n_layers": [1, 2]}; a mapping with ``low`` is a range, a leaf."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and "low" not in value and "high" not in value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def parse_space(data: Any, where: str) -> dict[str, Param]:
    """A space from parsed YAML (or ``--grid``): choices lists and ``{low, high[, log, step]}`` ranges."""
    if not isinstance(data, dict) or not data:
        raise RegtokError(f"{where}: a search space is a non-empty mapping of config keys to choices or ranges")
    keys = config_keys()
    space: dict[str, Param] = {}
    for name, value in _flatten(data).items():
        if name not in keys:
            close = difflib.get_close_matches(name, list(keys), n=1) or [
                k for k in keys if k.endswith(f".{name}")]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise RegtokError(f"{where}: unknown config key {name!r}{hint}")
        tp = keys[name]
        if isinstance(value, list | tuple):
            space[name] = _choices(value, tp, name, where)
        elif isinstance(value, dict):
            space[name] = _range(value, tp, name, where)
        else:
            raise RegtokError(f"{where}: {name} must be a list of choices or a {{low, high}} range, got {value!r}")
    return space


def _choices(values: list | tuple, tp: type, name: str, where: str) -> Choices:
    """A list of choices; a value listed twice (``[0.0003, 3e-4]``) would run the same point twice."""
    if not values:
        raise RegtokError(f"{where}: {name} has an empty list of choices")
    out: list[Any] = []
    for v in (_number(v, tp) for v in values):
        if any(v == u and isinstance(v, bool) == isinstance(u, bool) for u in out):
            raise RegtokError(f"{where}: {name} lists {v!r} twice")
        out.append(v)
    return Choices(tuple(out))


def _range(value: dict, tp: type, name: str, where: str) -> Range:
    """A ``{low, high[, log, step]}`` range of an int or float key, as Optuna can sample it."""
    if tp not in (int, float):
        raise RegtokError(f"{where}: {name} is a {tp.__name__} key; give it a list of choices, not a range")
    extra = sorted(set(value) - {"low", "high", "log", "step"})
    if extra or "low" not in value or "high" not in value:
        raise RegtokError(f"{where}: the range of {name} needs low and high (and optionally log, step), "
                          f"got {sorted(value)}")
    try:
        low, high = float(value["low"]), float(value["high"])
        step = None if value.get("step") is None else float(value["step"])
    except (TypeError, ValueError):
        raise RegtokError(f"{where}: the range of {name} must have numeric low/high/step") from None
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise RegtokError(f"{where}: the range of {name} has log {log!r}; use true or false")
    if not (math.isfinite(low) and math.isfinite(high) and low < high) or (log and low <= 0):
        raise RegtokError(f"{where}: the range of {name} needs low < high, both finite (and low > 0 with log)")
    if step is not None and (not math.isfinite(step) or step <= 0 or log):
        raise RegtokError(f"{where}: the range of {name} has step {value['step']!r}; a step must be a number > 0 "
                          "and cannot be combined with log")
    if tp is int and any(v is not None and v != int(v) for v in (low, high, step)):
        raise RegtokError(f"{where}: {name} is an int key; its range needs whole-number low, high and step")
    return Range(low, high, log, step, integer=tp is int)


def _number(value: Any, tp: type) -> Any:
    """``"1e-3"`` (YAML 1.1 reads it as text) → 0.001 for a float key; other values unchanged."""
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def parse_grid(items: typing.Iterable[str]) -> dict[str, Any]:
    """``["model.n_shared=4,8,16"]`` → {"model.n_shared": [4, 8, 16]} (values parsed as YAML scalars)."""
    from regtok.pipeline.runtime.config_io import yaml_value

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RegtokError(f"--grid {item!r} is not of the form key=v1,v2,…")
        if key.strip() in out:
            raise RegtokError(f"--grid {key.strip()} is given twice; list every value in one --grid")
        out[key.strip()] = [yaml_value(v, f"--grid {item!r}") for v in raw.split(",") if v.strip()]
    return out


def check_space(space: dict[str, Param], base: TrainConfig, sampler: str, where: str) -> None:
    """Each choice (and each range end) must resolve against ``base`` on its own; a grid needs choices only."""
    for name, param in space.items():
        if sampler == "grid" and isinstance(param, Range):
            raise RegtokError(f"{where}: the grid sampler needs a list of choices for every key, {name} is a range "
                              "(use --sampler tpe or random)")
        values = param.values if isinstance(param, Choices) else (param.low, param.high)
        for v in values:
            if isinstance(param, Range) and param.integer:
                v = int(v)
            try:
                merge(base, nested({name: v}))
            except RegtokError as e:
                raise RegtokError(f"{where}: {name}={v!r}: {e}") from None
    device = space.get("device")
    for name in dict.fromkeys([base.device, *(device.values if isinstance(device, Choices) else ())]):
        from regtok.distributed import resolve_device

        try:
            resolve_device(str(name))
        except RegtokError as e:
            raise RegtokError(f"{where}: {e}") from None


def space_json(space: dict[str, Param]) -> dict[str, Any]:
    return {name: param.to_json() for name, param in space.items()}


def diff_from_defaults(cfg: TrainConfig) -> dict[str, Any]:
    """The nested keys of ``cfg`` that differ from :class:`TrainConfig`'s defaults (a config file's content)."""
    def diff(now: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in now.items():
            if isinstance(value, dict):
                sub = diff(value, ref[key])
                if sub:
                    out[key] = sub
            elif value != ref[key]:
                out[key] = value
        return out

    return diff(to_dict(cfg), to_dict(TrainConfig()))


def as_overrides(diff: dict[str, Any]) -> list[str]:
    """A nested diff as ``key=value`` command-line overrides."""
    return [f"{key}={'true' if value is True else 'false' if value is False else value}"
            for key, value in flatten(diff).items()]


def trial_config(base: TrainConfig | dict[str, Any], params: dict[str, Any]) -> TrainConfig:
    base = base if isinstance(base, TrainConfig) else from_dict(TrainConfig, base)
    return merge(base, nested(params))
