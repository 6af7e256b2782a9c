"""Checks shared by the configuration Structs: types (msgspec checks them only when decoding) and ranges,
each failure a `ConfigError` naming the field."""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import msgspec

from treasure_engine._core import ConfigError

__all__ = ["_check", "_check_types"]


def _check_types(struct: msgspec.Struct) -> None:
    """msgspec checks types when decoding, not on direct construction: do it here, naming the field."""
    for f in msgspec.structs.fields(struct):
        value = getattr(struct, f.name)
        if not _matches(value, f.type):
            raise ConfigError(
                f"invalid configuration: {f.name}: expected {_describe(f.type)}, got {type(value).__name__} {value!r}"
            )


def _matches(value: object, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin is Literal:
        return value in get_args(tp)
    if origin in (Union, UnionType):
        return any(_matches(value, t) for t in get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, UnionType):
        return " or ".join(_describe(t) for t in get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _check(field: str, ok: bool, requirement: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"invalid configuration: {field}: {requirement} (got {value!r})")
