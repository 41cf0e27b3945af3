"""Stage configs from outside the code: YAML files holding what differs from the defaults, and ``key=value``
overrides from the command line. Both give nested dicts for :func:`regtok.config.resolve`.

YAML is read safely (no tags that build objects) and strictly: a key written twice in one mapping is an error
(plain YAML keeps the last one silently), and so is a value a tag cannot build (``!!int x``).
"""

from __future__ import annotations

import typing
from typing import Any

import yaml

from regtok.errors import RegtokError


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line)
            except TypeError:  # an unhashable key: the base class says so
                continue
            if first != key_node.start_mark.line:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is written twice (first on "
                                                        f"line {first + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError) as e:  # a tag that cannot build its value: !!int x
            raise yaml.constructor.ConstructorError(None, None, str(e), node.start_mark) from None


def yaml_problem(e: Exception, text: str | None = None) -> str:
    """One line saying what is wrong in a YAML text, and where (with the line itself when ``text`` is given)."""
    if not isinstance(e, yaml.MarkedYAMLError):
        first = str(e).strip().splitlines()
        return first[0] if first else type(e).__name__
    problem, mark = e.problem or e.context or type(e).__name__, e.problem_mark
    if mark is None or text is None:
        return problem
    lines = text.splitlines()
    line = f": {lines[mark.line].strip()}" if mark.line < len(lines) else ""
    return f"{problem}, at line {mark.line + 1}{line}"


def yaml_value(text: str, where: str) -> Any:
    """``text`` parsed as a YAML value; RegtokError naming ``where`` when it is not valid YAML."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise RegtokError(f"{where}: not a valid YAML value ({yaml_problem(e)})") from None


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """``["model.n_layers=2", "lr=1e-3"]`` → nested dict; values parsed as YAML scalars."""
    from regtok.config import nested

    flat: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RegtokError(f"override {item!r} is not of the form key=value")
        flat[key.strip()] = yaml_value(raw, f"override {item!r}") if raw.strip() else raw
    return nested(flat)


def load_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config diff (a mapping of only what differs from the defaults)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RegtokError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RegtokError(f"config file {path} is not UTF-8 text") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, ValueError, TypeError) as e:
        raise RegtokError(f"config file {path} is not valid YAML: {yaml_problem(e, text)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RegtokError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data
