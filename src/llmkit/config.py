"""Typed dataclass configs <-> YAML, with `key.sub=value` overrides.

Every stage describes its settings as nested dataclasses. `load_config` reads a YAML file into them,
applies command-line overrides, and refuses anything it cannot vouch for *before any work starts*:
an unknown key, a value of the wrong type, or an impossible combination (each dataclass may define
`validate()`, raising `ValueError` whose message names the offending field). Every error names the
dotted key and the file it came from, so a typo in a 200-line recipe is found in seconds.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and the source file."""


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a YAML file plus `key.sub=value` overrides, validating everything.

    Args:
        cls: the top-level config dataclass.
        path: YAML file; None starts from the dataclass defaults.
        overrides: strings like `model.n_layer=4`; the value is parsed as YAML (`true`, `1e-3`, `[a, b]`).
    Raises:
        ConfigError naming the key and the file (or "command line" for overrides).
    """
    raw, source, origins = _read(path, overrides)
    return _build(cls, raw, prefix="", source=source, origins=origins)


def load_config_union(classes: Sequence[type], path: str | Path | None = None, overrides: list[str] | None = None,
                      key: str = "task") -> Any:
    """`load_config` of whichever of `classes` the file describes (e.g. a fine-tuning recipe: SFT or classify).

    Each class declares `key` with its own default (``task: Literal["sft"] = "sft"``); the file's (or an
    override's) value of `key` picks the class. Without the key: the first of `classes` that declares every
    top-level key of the file, else the one with the fewest undeclared keys (its error then names them).
    Raises ConfigError naming the key and the file for a value no class takes."""
    raw, source, origins = _read(path, overrides)
    by_value = {next((f.default for f in dataclasses.fields(c) if f.name == key), None): c for c in classes}
    if key in raw:
        if raw[key] not in by_value:
            raise ConfigError(f"{origins.get(key, source)}: {key}: {raw[key]!r} is not one of "
                              f"{[v for v in by_value if v is not None]}")
        cls = by_value[raw[key]]
    else:
        def undeclared(c: type) -> int:
            return len(set(raw) - {f.name for f in dataclasses.fields(c)})
        cls = min(classes, key=undeclared)  # min keeps the first of equals
    return _build(cls, raw, prefix="", source=source, origins=origins)


def _read(path: str | Path | None, overrides: list[str] | None) -> tuple[dict[str, Any], str, dict[str, str]]:
    """(the YAML mapping with the overrides set in it, the source name, {overridden key: "command line"})."""
    source = str(path) if path is not None else ("command line" if overrides else "<defaults>")
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{source}: cannot read config file: {e}") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded
    origins: dict[str, str] = {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
        origins[key] = "command line"
    return raw, source, origins


def parse_override(item: str) -> tuple[str, Any]:
    """`"train.lr=3e-4"` -> `("train.lr", 0.0003)`; the value is read as YAML."""
    if "=" not in item:
        raise ConfigError(f"command line: override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"command line: override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict of a config dataclass (what gets written to YAML and logged as params).

    A dataclass with a `FAMILY` class attribute (a model config) carries it as a `family` key, so the
    dict loads back into the same class."""
    def plain(value):
        if dataclasses.is_dataclass(value):
            return to_dict(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return copy.deepcopy(value)

    out = {f.name: plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    family = getattr(type(config), "FAMILY", None)
    return {"family": family, **out} if family else out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True), encoding="utf-8")


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"command line: cannot set {key!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type[T], raw: Any, prefix: str, source: str, origins: dict[str, str]) -> T:
    where = prefix.rstrip(".") or "<top level>"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {raw!r}")
    family = getattr(cls, "FAMILY", None)
    if family is not None and "family" in raw:  # written by to_dict; must name this very class
        raw = dict(raw)
        if raw.pop("family") != family:
            raise ConfigError(f"{origins.get(prefix + 'family', source)}: {prefix}family: this section takes "
                              f"{family!r} only")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = prefix + unknown[0]
        src = origins.get(key, source)
        raise ConfigError(f"{src}: unknown key {key!r} (known keys here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in raw.items():
        key = prefix + name
        src = origins.get(key, source)
        kwargs[name] = _coerce(hints[name], value, key, src, origins, source)
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{source}: {where}: {e}") from e
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise ConfigError(f"{source}: {prefix}{e}") from e
    return obj


def _coerce(tp: Any, value: Any, key: str, src: str, origins: dict[str, str], source: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".", source, origins)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        families = {getattr(a, "FAMILY", None): a for a in args if dataclasses.is_dataclass(a)}
        if len(families) > 1 and None not in families:
            # a union of model configs, told apart by a `family` key (default: the first listed)
            if not isinstance(value, dict):
                raise ConfigError(f"{src}: {key} must be a mapping, got {value!r}")
            value = dict(value)
            family = value.pop("family", next(iter(families)))
            if family not in families:
                raise ConfigError(f"{src}: {key}.family: {family!r} is not one of {list(families)}")
            return _coerce(families[family], value, key, src, origins, source)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, src, origins, source)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # `X | None`: X's own message names the exact key and problem
            raise errors[0]
        raise ConfigError(f"{src}: {key}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{src}: {key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (item_tp,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{src}: {key}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]", src, origins, source) for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {key}: expected a mapping, got {value!r}")
        args = get_args(tp)
        if len(args) != 2:
            return dict(value)
        key_tp, value_tp = args
        return {_coerce(key_tp, k, f"{key}.{k}", src, origins, source):
                _coerce(value_tp, v, f"{key}.{k}", src, origins, source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: {key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads `1e-3` without a dot as a string; accept numeric strings, refuse the rest.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{src}: {key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{src}: {key}: unsupported config type {_type_name(tp)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
