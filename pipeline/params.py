"""Typed, frozen views of params.yaml: the only place that reads it.

Each stage declares its section as a frozen dataclass and calls
`load_section("ngram", NgramParams)`. Unknown keys, missing keys and values of
the wrong type are rejected with a message naming the full key (`ngram.orders`),
so a typo in params.yaml fails loudly instead of silently using a default.
Defaults live in params.yaml only: the dataclasses have none.

A leaf: it imports no other pipeline module but `errors`, so every stage can depend on
it without depending on the presets (whose `show` command lives in pipeline/presets.py).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from pipeline.errors import UserError

PARAMS_FILE = Path("params.yaml")
# the top-level keys of params.yaml: the corpus list, then one section per stage
SECTIONS = ("corpora", "download", "prepare", "ngram", "leaderboard", "train", "analyse",
            "sample")
T = TypeVar("T")


class ParamsError(UserError, ValueError):
    """A params.yaml value that does not fit its declared type."""


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    if not path.exists():
        raise ParamsError(f"{path} not found (run stages from the repository root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ParamsError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") \
            from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path} must hold a mapping of sections")
    unknown = sorted(set(data) - set(SECTIONS), key=str)
    if unknown:
        raise ParamsError(f"{path}: unknown section {unknown[0]!r} (known: "
                          f"{', '.join(SECTIONS)})")
    return data


def load_section(section: str, cls: type[T], path: Path = PARAMS_FILE) -> T:
    data = read_params(path)
    if section not in data:
        raise ParamsError(f"{path} has no section {section!r}")
    return build(cls, data[section], section)


def build(cls: type[T], raw: Any, key: str) -> T:
    """Validate the mapping `raw` against dataclass `cls`; `key` names it in errors."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{key}: expected a mapping, got {type(raw).__name__} {raw!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ParamsError(
            f"unknown key {key}.{unknown[0]} (known keys of {key}: {', '.join(names)})"
        )
    missing = [n for n in names if n not in raw]
    if missing:
        raise ParamsError(f"missing key {key}.{missing[0]}")
    values = {n: _coerce(hints[n], raw[n], f"{key}.{n}") for n in names}
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(key)
    return obj


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin is Literal:
        if value not in get_args(tp):
            allowed = ", ".join(repr(a) for a in get_args(tp))
            raise ParamsError(f"{key}: {value!r} is not one of {allowed}")
        return value
    if tp is dict or origin is dict:
        # free-form mappings (e.g. presets) are validated by their owner, key by key
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = get_args(tp)
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is float:
        # YAML reads 1e-3 as a string and 1 as an int; accept both as floats.
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ParamsError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise ParamsError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan slips past every `x < 0` refusal: refused here
            raise ParamsError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported parameter type {tp}")  # a bug in a dataclass


def require(condition: bool, key: str, message: str) -> None:
    """For `validate` hooks: raise ParamsError naming `key` unless `condition`."""
    if not condition:
        raise ParamsError(f"{key}: {message}")
