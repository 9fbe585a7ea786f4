"""MsgpackSerializer: the standard types msgpack lacks, and hooks for one's own."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import uuid
from typing import Any

import pytest
from jobbroker.client.serializers import MsgpackSerializer


class Color(enum.StrEnum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    "value",
    [
        datetime.datetime(2026, 1, 2, 3, 4, 5, 678901),
        datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=-5))),
        datetime.date(2026, 1, 2),
        datetime.time(23, 59, 59, 1),
        datetime.timedelta(days=-1, seconds=5, microseconds=7),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        decimal.Decimal("-0.000100"),
        (1, (2, "three"), []),
        {1, 2, 3},
        frozenset({"a"}),
        {"nested": [(1, 2), {datetime.date(2000, 1, 1)}]},
    ],
)
def test_round_trip(value: Any) -> None:
    serializer = MsgpackSerializer()
    restored = serializer.loads(serializer.dumps(value))
    assert restored == value and type(restored) is type(value)


def test_enums_and_dataclasses_travel_as_their_values() -> None:
    serializer = MsgpackSerializer()
    assert serializer.loads(serializer.dumps([Color.RED, Point(1, 2)])) == ["red", {"x": 1, "y": 2}]


def test_hooks_for_ones_own_types() -> None:
    class Money:
        def __init__(self, cents: int) -> None:
            self.cents = cents

    serializer = MsgpackSerializer(
        encode=lambda v: (64, str(v.cents).encode()) if isinstance(v, Money) else None,
        decode=lambda code, data: Money(int(data)),
    )
    assert serializer.loads(serializer.dumps(Money(150))).cents == 150
    with pytest.raises(TypeError, match="cannot serialize 'object'"):
        serializer.dumps(object())
    bad = MsgpackSerializer(encode=lambda v: (3, b""))
    with pytest.raises(ValueError, match="64 to 127"):
        bad.dumps(object())
