"""Settings declared once: dataclass fields that carry their help, allowed values and bounds.

A setting is a field of a frozen dataclass made with `setting(default, help, ...)`. Everything
else is generated from those fields, so no front end can disagree with what a run uses:

* `from_mapping(cls, d, where)` builds the dataclass from JSON or command-line text, converting
  each value by the field's type ("True" -> True, "8" -> 8) and refusing an unknown key or a bad
  value with a one-line `ConfigError` that names the key;
* `add_arguments(parser, cls)` adds one `--flag` per field, its help ending in the default;
* `set_flags(namespace, cls)` reads back only the flags given on the command line, so that they
  override a config file and leave the rest to it.

A dataclass calls `check_fields(self)` from `__post_init__`: values set from Python are held to
the same types, choices and bounds as values parsed from text.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import typing
from typing import Any, Mapping, Optional


MAX_JSON_BYTES = 64 << 20  # a settings file or a checkpoint's config.json is kilobytes


class ConfigError(ValueError):
    """A setting that cannot be used; the message is one line that names the key."""


def setting(default: Any, help: str, *, choices: Optional[tuple] = None, minimum: Optional[float] = None,
            maximum: Optional[float] = None, aliases: Optional[Mapping] = None,
            flag_const: Optional[str] = None) -> Any:
    """A dataclass field with its one-line help, allowed values and numeric bounds.

    `aliases` map other spellings of a choice to it (lower-case text, or True/False for a field
    that used to be a boolean); `flag_const` is the value of the bare `--flag`."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "minimum": minimum,
            "maximum": maximum, "aliases": dict(aliases or {}), "flag_const": flag_const}
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not settings: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def fields_of(cls) -> list[dataclasses.Field]:
    """The settings of a dataclass (fields made with `setting`), in declaration order."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


@functools.lru_cache(maxsize=None)
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _hint(cls, name: str):
    return _hints(cls)[name]


@functools.lru_cache(maxsize=None)
def _rules(cls) -> tuple:
    """(name, kinds, optional, choices, minimum, maximum, aliases) per setting of `cls`, worked out once:
    check_fields runs at every construction (a request's SamplingParams included)."""
    out = []
    for f in fields_of(cls):
        kinds, optional = _kinds(_hint(cls, f.name))
        out.append((f.name, frozenset(kinds), optional, f.metadata["choices"], f.metadata["minimum"],
                    f.metadata["maximum"], f.metadata.get("aliases") or {}))
    return tuple(out)


def _kinds(hint) -> tuple[set, bool]:
    """({"bool" | "int" | "float" | "str" | "strs" | "ints"}, optional) of a type hint."""
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        kinds, optional = set(), type(None) in args
        for a in args:
            if a is not type(None):
                kinds |= _kinds(a)[0]
        return kinds, optional
    if origin is tuple:
        return ({"ints"} if args and args[0] is int else {"strs"}), False
    return {{bool: "bool", int: "int", float: "float", str: "str"}[hint]}, False


_KIND_WORDS = {"bool": "true or false", "int": "an integer", "float": "a finite number", "str": "text",
               "strs": "a list of strings", "ints": "a list of integers"}
_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def _convert(kind: str, value: Any) -> Any:
    """`value` as `kind`, converting text and JSON spellings; raises ValueError(reason)."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"must be true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise ValueError(f"must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value.strip())
        raise ValueError(f"must be an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, bool):
            raise ValueError(f"must be a number, got {value!r}")
        try:
            out = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            out = None
        if out is None or not math.isfinite(out):
            raise ValueError(f"must be a finite number, got {value!r}")
        return out
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"must be text, got {value!r}")
    if kind in ("strs", "ints"):
        items = [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"must be a list, got {value!r}")
        return tuple(_convert(kind[:-1] if kind == "ints" else "str", v) for v in items)
    raise AssertionError(kind)


def _is(kind: str, value: Any) -> bool:
    """Whether `value` already has `kind` (no conversion)."""
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "strs":
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if kind == "ints":
        return isinstance(value, tuple) and all(_is("int", v) for v in value)
    raise AssertionError(kind)


def parse_value(cls, name: str, value: Any) -> Any:
    """Convert one value for field `name` of `cls` (text, JSON or Python); ConfigError if bad."""
    f = {f.name: f for f in fields_of(cls)}[name]
    kinds, optional = _kinds(_hint(cls, name))
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name}: must be set, got null")
    choices = f.metadata["choices"] or ()
    alias = _alias(f.metadata.get("aliases"), value)
    if alias is not None:
        return alias
    if "str" in kinds and isinstance(value, str) and value.strip().lower() in [str(c) for c in choices]:
        return value.strip().lower()  # a named choice of a mixed field ("auto" for int | str)
    errors = []
    for kind in sorted(kinds, key=lambda k: k == "str"):  # numbers before text for int | str
        try:
            out = _convert(kind, value)
        except ValueError as e:
            errors.append(str(e))
            continue
        if choices and isinstance(out, str) and out not in choices:
            raise ConfigError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return out
    raise ConfigError(f"{name}: {errors[0]}")


def _alias(aliases: Optional[Mapping], value: Any) -> Any:
    """The choice `value` is another spelling of, or None."""
    if not aliases:
        return None
    if isinstance(value, bool):
        return aliases.get(value)
    if isinstance(value, str):
        return aliases.get(value.strip().lower())
    return None


def check_fields(obj) -> None:
    """Hold every setting of a dataclass instance to its type, choices and bounds (an alias is
    replaced by the choice it spells)."""
    for name, kinds, optional, choices, lo, hi, aliases in _rules(type(obj)):
        value = getattr(obj, name)
        alias = _alias(aliases, value)
        if alias is not None:
            object.__setattr__(obj, name, alias)
            value = alias
        if value is None:
            if optional:
                continue
            raise ConfigError(f"{name}: must be set, got None")
        if choices and "str" in kinds and isinstance(value, str):
            if value not in choices:
                raise ConfigError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
            continue
        if not any(_is(k, value) for k in kinds):
            raise ConfigError(f"{name}: must be {' or '.join(_KIND_WORDS[k] for k in sorted(kinds))}, "
                              f"got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if lo is not None and value < lo:
                raise ConfigError(f"{name}: must be >= {lo}, got {value!r}")
            if hi is not None and value > hi:
                raise ConfigError(f"{name}: must be <= {hi}, got {value!r}")


def read_json_object(path: str, error: type = ConfigError, max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The JSON object in `path`; `error(<path>: <what is wrong>)` if unreadable, larger than
    `max_bytes` (checked before reading: the file may come from anyone), not JSON or not an object."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    if size > max_bytes or len(raw) > max_bytes:
        raise error(f"{path}: {max(size, len(raw))} bytes, more than the {max_bytes} a JSON settings or "
                    "config file may hold")
    try:
        d = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: must hold a JSON object, got {type(d).__name__}")
    return d


def unknown_key(where: str, key: str, known) -> ConfigError:
    """The error for a key no setting has: the closest known key, or the list of them."""
    import difflib
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}"
    return ConfigError(f"{where + ': ' if where else ''}unknown key {key!r} ({hint})")


def from_mapping(cls, d: Mapping, where: str = "", base=None):
    """`cls` built from `d` (JSON or flag text) over `base` (default: the defaults).

    Unknown keys and bad values raise ConfigError naming `where` and the key."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where or cls.__name__}: must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in fields_of(cls)}
    unknown = sorted(set(d) - known)
    prefix = f"{where}: " if where else ""
    if unknown:
        raise unknown_key(where, unknown[0], known)
    try:
        values = {k: parse_value(cls, k, v) for k, v in d.items()}
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except ConfigError as e:
        if not prefix:
            raise
        raise type(e)(f"{prefix}{e}") from None


def to_mapping(obj) -> dict:
    """The settings of `obj` as JSON-ready values (tuples become lists)."""
    return {f.name: (list(v) if isinstance(v, tuple) else v)
            for f in fields_of(type(obj)) for v in [getattr(obj, f.name)]}


def shown_value(value) -> str:
    """A value as help texts print it."""
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]" if value else "none"
    return str(value)


def default_help(f: dataclasses.Field, default: Any) -> str:
    """A field's help line as the front ends print it, ending in its default."""
    return f"{f.metadata['help']} (default: {shown_value(default)})"


def parse_bool(value: Any) -> bool:
    """A boolean from text or JSON ("True", "0", "yes", ...); ValueError if it is none."""
    return _convert("bool", value)


def add_arguments(parser, cls, *, defaults: Optional[Mapping] = None, skip: tuple = (),
                  only: Optional[tuple] = None, title: Optional[str] = None) -> None:
    """One `--name` flag per setting of `cls` (less `skip`), help ending in its default.

    `defaults` replaces some defaults for this front end (a benchmark's own shape, say); the help
    shows the one the run will use. Flags keep their text: `set_flags` reads back the given ones
    and `from_mapping` converts and checks them, so flags and files fail with the same message."""
    defaults = dict(defaults or {})
    group = parser.add_argument_group(title) if title else parser
    for f in fields_of(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        kinds, _ = _kinds(_hint(cls, f.name))
        kwargs: dict[str, Any] = dict(dest=f.name, default=None,
                                      help=default_help(f, defaults.get(f.name, f.default)).replace("%", "%%"))
        if f.metadata["choices"]:
            kwargs["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}" + (
                "|N" if "int" in kinds else "")
        if kinds == {"bool"}:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif f.metadata.get("flag_const") is not None:
            kwargs.update(nargs="?", const=f.metadata["flag_const"])
        elif kinds & {"strs", "ints"}:
            kwargs.update(action="append")
        group.add_argument(f"--{f.name}", **kwargs)


def set_flags(namespace, cls, *, defaults: Optional[Mapping] = None) -> dict:
    """{name: value} of the flags of `cls` given on the command line, over front-end `defaults`."""
    out = {k: v for k, v in (defaults or {}).items()}
    for f in fields_of(cls):
        value = getattr(namespace, f.name, None)
        if value is not None:
            out[f.name] = value
    return out


def flag_help_defaults(parser: argparse.ArgumentParser) -> dict:
    """{flag dest: the default its help text states}, for checking help against the dataclasses."""
    out = {}
    for action in parser._actions:
        text = action.help or ""
        if "(default: " in text:
            out[action.dest] = text.rsplit("(default: ", 1)[1][:-1]
    return out
