"""The schema compiler of messages.py: a checker per field, built once from each message
type's annotations (int, float, str, bytes, bool, optional values, lists, and lists of the
named rows of rows.py checked column by column), so that decode() checks peer input without
walking type hints per message. Sans-I/O: no asyncio, no sockets.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["Checker", "Invalid", "Schema", "compile_schema"]

Checker = Callable[[Any], Any]  # returns the (possibly converted) value or raises Invalid


class Invalid(Exception):
    """A value that does not match its field's type; the message says what was expected."""


def _check_int(value: Any) -> int:
    if type(value) is not int:
        raise Invalid("an integer")
    return value


def _check_float(value: Any) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise Invalid("a number")


def _simple(kind: type, label: str) -> Checker:
    def check(value: Any) -> Any:
        if type(value) is not kind:
            raise Invalid(label)
        return value

    return check


def _any(value: Any) -> Any:
    return value


def _checker(annotation: Any) -> Checker:
    if annotation is Any:
        return _any
    if annotation is int:
        return _check_int
    if annotation is float:
        return _check_float
    if annotation in (str, bytes, bool, dict):
        return _simple(annotation, f"of type {annotation.__name__}")
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is types.UnionType or origin is typing.Union:
        inner = _checker(next(a for a in args if a is not type(None)))

        def optional(value: Any) -> Any:
            return None if value is None else inner(value)

        return optional
    if origin is dict:
        return _simple(dict, "a map")
    if origin is list and _is_row_type(args[0]):
        return _rows_checker(args[0])
    if origin is list and args[0] in (int, str, bytes):
        return _plain_list_checker(args[0])
    if origin is list:
        item = _checker(args[0])

        def check_list(value: Any) -> list[Any]:
            if type(value) is not list:
                raise Invalid("an array")
            return value if item is _any else [item(v) for v in value]

        return check_list
    raise TypeError(f"no checker for {annotation!r}")


# The batch checkers below run once per job of a frame: they check in place, allocate nothing,
# and convert only an int found where a float belongs.


def _plain_list_checker(kind: type) -> Checker:
    def check_plain_list(value: Any) -> list[Any]:
        if type(value) is not list:
            raise Invalid("an array")
        for item in value:
            if type(item) is not kind:
                raise Invalid(f"an array of {kind.__name__}")
        return value

    return check_plain_list


def _is_row_type(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, tuple) and hasattr(annotation, "_fields")


_SIMPLE_COLUMNS = (int, str, float, bool, bytes)


def _rows_checker(row_type: Any) -> Checker:
    """list[SomeRow]: an array of arrays, each checked column by column against the row's
    NamedTuple (rows.py) and turned into one in place. Columns with a default may be missing
    at the end; columns past the row's are ignored (a later version's)."""
    hints = typing.get_type_hints(row_type)
    fields: tuple[str, ...] = row_type._fields
    defaults: dict[str, Any] = row_type._field_defaults
    size = len(fields)
    minimum = sum(1 for name in fields if name not in defaults)
    if any(name in defaults for name in fields[:minimum]):
        raise TypeError(f"columns with a default must come last: {row_type.__name__}")
    fill = [defaults[name] for name in fields[minimum:]]
    simple: list[tuple[int, type, bool]] = []  # index, kind, may be nil: checked inline
    general: list[tuple[int, Checker]] = []  # the rest (maps, nested arrays)
    for index, name in enumerate(fields):
        annotation = hints[name]
        kind, may_be_nil = annotation, False
        if typing.get_origin(annotation) in (types.UnionType, typing.Union):
            kind = next(a for a in typing.get_args(annotation) if a is not type(None))
            may_be_nil = True
        if kind in _SIMPLE_COLUMNS:
            simple.append((index, kind, may_be_nil))
        else:
            general.append((index, _checker(annotation)))
    shape = f"an array of arrays of at least {minimum}"
    new = tuple.__new__

    def check_rows(value: Any) -> list[Any]:
        if type(value) is not list:
            raise Invalid(shape)
        for position, row in enumerate(value):
            if type(row) is not list or len(row) < minimum:
                raise Invalid(shape)
            length = len(row)
            for index, kind, may_be_nil in simple:
                if index >= length:
                    break
                item = row[index]
                if type(item) is not kind:
                    if kind is float and type(item) is int:
                        row[index] = float(item)
                    elif not (may_be_nil and item is None):
                        raise Invalid(f"{shape} with {kind.__name__} at position {index}")
            for index, check in general:
                if index >= length:
                    break
                try:
                    row[index] = check(row[index])
                except Invalid as exc:
                    raise Invalid(f"{shape} with {exc} at position {index}") from None
            if length != size:
                row = row[:size] if length > size else row + fill[length - minimum :]
            value[position] = new(row_type, row)
        return value

    return check_rows


Schema = tuple[tuple[str, Checker, bool], ...]  # name, checker, required


def compile_schema(cls: type) -> Schema:
    """(name, checker, required) of each field of a message dataclass, in order."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (
            f.name,
            _checker(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    )
