"""Adapter options: the dataclass an adapter declares in ``AdapterInfo.options``, filled from
``--set KEY=VALUE`` (strings) or ``blockquant.quantize(KEY=VALUE)`` (Python values).

Fields must have defaults and one of the types bool, int, float, str, ``X | None`` of those, or a
``Literal[...]`` of strings; ``field(metadata={"help": "..."})`` documents a field.  Unknown names and
values of the wrong type are ``UsageError``s naming the option and the adapter.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from ..errors import UsageError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (strings from the command line are parsed); ValueError when it is not one."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except ValueError:
                pass
        raise ValueError(f"expected {describe_type(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(map(str, choices))}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError("expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError("expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError("expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError("expected a string")
    raise TypeError(f"{where}: option type {tp!r} is not supported (use bool, int, float, str or Literal)")


def describe_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))


def parse_options(cls: type | None, raw: dict[str, Any], adapter: str) -> Any:
    """An instance of the adapter's options class from ``raw`` (name -> value); None when the adapter has none."""
    names = {f.name for f in dataclasses.fields(cls)} if cls is not None else set()
    unknown = sorted(set(raw) - names)
    if unknown:
        known = ", ".join(sorted(names)) if names else "none"
        raise UsageError(f"unknown option '{unknown[0]}' for adapter '{adapter}': it is neither a blockquant setting "
                         f"nor an option of the adapter (its options: {known}; `quant adapters --options {adapter}` "
                         "describes them)")
    if cls is None:
        return None
    hints = _field_types(cls)
    values = {}
    for name, value in raw.items():
        try:
            values[name] = _convert(value, hints[name], f"{cls.__name__}.{name}")
        except ValueError as e:
            raise UsageError(f"option '{name}' of adapter '{adapter}': {value!r} is invalid ({e})") from None
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:   # the dataclass's own __post_init__ checks
        raise UsageError(f"options of adapter '{adapter}': {e}") from None


def options_dict(options: Any) -> dict:
    """The options as plain values (for the resume identity and the report)."""
    return dataclasses.asdict(options) if options is not None else {}


def describe_options(cls: type | None) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) for each option of ``cls``."""
    if cls is None:
        return []
    hints = _field_types(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((f.name, describe_type(hints[f.name]), str(default), f.metadata.get("help", "")))
    return rows


def check_options_class(cls: Any, adapter: str) -> None:
    """Raise TypeError when an adapter declares options that cannot be parsed (no default, unknown type)."""
    if cls is None:
        return
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"adapter '{adapter}': AdapterInfo.options must be a dataclass type")
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"adapter '{adapter}': option '{f.name}' needs a default")
        _check_type(hints[f.name], f"adapter '{adapter}': option '{f.name}'")


def _check_type(tp: Any, where: str) -> None:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None):
                _check_type(arg, where)
    elif origin is Literal or tp in (bool, int, float, str):
        return
    else:
        raise TypeError(f"{where} has type {tp!r}; use bool, int, float, str, Literal[...] or X | None")
