"""Stage configs from outside the code: YAML files holding what differs from the defaults, and ``key=value``
overrides from the command line. Both give nested dicts for :func:`regtok.config.resolve`.
"""

from __future__ import annotations

import typing
from typing import Any

from regtok.errors import RegtokError


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """``["model.n_layers=2", "lr=1e-3"]`` → nested dict; values parsed as YAML scalars."""
    import yaml

    from regtok.config import nested

    flat: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RegtokError(f"override {item!r} is not of the form key=value")
        flat[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
    return nested(flat)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config diff (a mapping of only what differs from the defaults)."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise RegtokError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise RegtokError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegtokError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data
