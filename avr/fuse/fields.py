"""Option values converted to the types of a config dataclass's fields.

Options arrive as text (``--opt key=value``), as TOML values, or from a run's config.json;
each is converted to the type its field declares, or refused with the source, the key, the
value and the type expected (nanoGPT's configurator checks overrides against the defaults the
same way). An int is taken where a float is expected; a tuple of numbers takes a list, one
number, or text such as ``1+2+4`` or ``1,2,4``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from avr.errors import AvrError

TYPE_NAMES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
PLURAL_NAMES = {int: "whole numbers", float: "numbers", str: "texts"}


def typed_fields(config_class: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """``values`` converted to the field types of the dataclass ``config_class``. Keys that are
    not fields are left as they are, for the config's own check to name."""
    hints = typing.get_type_hints(config_class)
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    return {key: convert(value, hints[key], f"{source}: {key} = {value!r}", defaults[key])
            if key in hints else value for key, value in values.items()}


def convert(value: Any, kind: Any, where: str, default: Any = dataclasses.MISSING) -> Any:
    """``value`` as type ``kind`` (bool, int, float, str, tuple[T, ...], optional of these);
    other kinds pass through."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        kind = next(arg for arg in args if arg is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _tuple_of(value, args[0], where, default)
    if kind not in TYPE_NAMES:
        return value
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        shown = "" if default is dataclasses.MISSING else f" (its default is {default!r})"
        raise AvrError(f"{where} must be {TYPE_NAMES[kind]}{shown}")
    return value


def _tuple_of(value: Any, item: type, where: str, default: Any) -> tuple:
    if isinstance(value, str):
        value = [part for part in value.replace("+", ",").split(",") if part.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    try:
        return tuple(item(part) if isinstance(part, str) else convert(part, item, where)
                     for part in value)
    except (ValueError, AvrError):
        shown = "" if default is dataclasses.MISSING else f" (its default is {default!r})"
        raise AvrError(f"{where} must be {PLURAL_NAMES.get(item, item.__name__)} separated by "
                       f"+ or ,{shown}") from None
