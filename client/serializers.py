"""How payloads and results become bytes, and back.

The broker holds payloads and results as opaque bytes (docs/protocol.md, "Payloads and
results"): the client's serializer makes them, the worker's reads them. By default both use
PlainMsgpack: a value packed as msgpack (dicts, lists, str, int, float, bool, None, bytes; a
tuple arrives as a list), what the CLI and clients in other languages read and write. Give
both sides the same other `serializer` to send other types.

    serializer = MsgpackSerializer()  # datetime, date, time, timedelta, UUID, Decimal, tuple, set
    Client(serializer=serializer); Worker(..., serializer=serializer)
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import uuid
from collections.abc import Callable
from typing import Any, Protocol, cast

import msgpack

__all__ = ["MsgpackSerializer", "PlainMsgpack", "Serializer"]


class Serializer(Protocol):
    """Turns a payload or result into bytes and back. Both sides must use the same one."""

    def dumps(self, value: Any) -> bytes:
        """Raises TypeError (or ValueError) for a value it cannot encode."""
        ...

    def loads(self, data: bytes) -> Any: ...


class PlainMsgpack:
    """The default: a value as msgpack, no extension types (what other languages read).

    One packer per instance (msgpack.packb makes one per call, which costs more than packing
    a small payload): an instance is for one thread; each Client and Worker makes its own."""

    __slots__ = ("_packer",)

    def __init__(self) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)

    def dumps(self, value: Any) -> bytes:
        try:
            return self._packer.pack(value)
        except BaseException:
            self._packer.reset()  # a failed pack may leave part of the value in the buffer
            raise

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)


# Extension type codes of MsgpackSerializer; 64 to 127 are left to the application's hooks.
_DATETIME, _DATE, _TIME, _TIMEDELTA, _UUID, _DECIMAL, _TUPLE, _SET, _FROZENSET = range(1, 10)
FIRST_USER_CODE = 64


class MsgpackSerializer:
    """msgpack with the standard types it lacks, as extension types: datetime (naive or aware,
    to the microsecond), date, time, timedelta, UUID, Decimal, tuple, set and frozenset.
    Dataclass instances travel as dicts of their fields (they arrive as dicts).

    Args:
        encode: for other types: `encode(value)` returns `(code, bytes)` with a code from 64 to
            127, or None if it does not know the value (pydantic: `(64, m.model_dump_json().encode())`).
        decode: `decode(code, data)` rebuilds what `encode` made.
    """

    def __init__(
        self,
        *,
        encode: Callable[[Any], tuple[int, bytes] | None] | None = None,
        decode: Callable[[int, bytes], Any] | None = None,
    ) -> None:
        self._encode = encode
        self._decode = decode

    def dumps(self, value: Any) -> bytes:
        return msgpack.packb(value, default=self._default, use_bin_type=True, strict_types=True)

    def loads(self, data: bytes) -> Any:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=self._ext_hook)

    def _default(self, value: Any) -> Any:
        if isinstance(value, datetime.datetime):  # before date: a datetime is a date
            return msgpack.ExtType(_DATETIME, value.isoformat().encode())
        if isinstance(value, datetime.date):
            return msgpack.ExtType(_DATE, value.isoformat().encode())
        if isinstance(value, datetime.time):
            return msgpack.ExtType(_TIME, value.isoformat().encode())
        if isinstance(value, datetime.timedelta):
            return msgpack.ExtType(_TIMEDELTA, self.dumps([value.days, value.seconds, value.microseconds]))
        if isinstance(value, uuid.UUID):
            return msgpack.ExtType(_UUID, value.bytes)
        if isinstance(value, decimal.Decimal):
            return msgpack.ExtType(_DECIMAL, str(value).encode())
        if isinstance(value, tuple):
            return msgpack.ExtType(_TUPLE, self.dumps(list(value)))
        if isinstance(value, frozenset):
            return msgpack.ExtType(_FROZENSET, self.dumps(list(value)))
        if isinstance(value, set):
            return msgpack.ExtType(_SET, self.dumps(list(value)))
        for base in (bool, int, float, str, bytes, dict, list):  # subclasses (enums...): as their base
            if isinstance(value, base):
                return cast(Any, base)(value)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        if self._encode is not None:
            encoded = self._encode(value)
            if encoded is not None:
                code, data = encoded
                if not FIRST_USER_CODE <= code <= 127:
                    raise ValueError(f"extension codes of your own are {FIRST_USER_CODE} to 127, not {code}")
                return msgpack.ExtType(code, data)
        raise TypeError(f"cannot serialize {type(value).__name__!r} object")

    def _ext_hook(self, code: int, data: bytes) -> Any:
        if code == _DATETIME:
            return datetime.datetime.fromisoformat(data.decode())
        if code == _DATE:
            return datetime.date.fromisoformat(data.decode())
        if code == _TIME:
            return datetime.time.fromisoformat(data.decode())
        if code == _TIMEDELTA:
            days, seconds, microseconds = self.loads(data)
            return datetime.timedelta(days=days, seconds=seconds, microseconds=microseconds)
        if code == _UUID:
            return uuid.UUID(bytes=data)
        if code == _DECIMAL:
            return decimal.Decimal(data.decode())
        if code == _TUPLE:
            return tuple(self.loads(data))
        if code == _SET:
            return set(self.loads(data))
        if code == _FROZENSET:
            return frozenset(self.loads(data))
        if code >= FIRST_USER_CODE and self._decode is not None:
            return self._decode(code, data)
        return msgpack.ExtType(code, data)
