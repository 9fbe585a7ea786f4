"""Clocks. The core never reads time itself: callers pass `now` from one of these.

Two scales: `now()` is monotonic (leases, deadlines, heartbeats: only differences mean
anything); `wall()` is the wall clock (what is stored, and a schedule's ticks).
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "MonotonicClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (time.time())."""
        ...


class MonotonicClock:
    """time.monotonic(), the same scale as asyncio's loop.time(); time.time() for the wall."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class FakeClock:
    """A clock that moves only when told, for tests and benchmarks; its wall clock moves with it."""

    def __init__(self, start: float = 1000.0, wall: float = 1_700_000_000.0) -> None:
        self._now = start
        self._wall_offset = wall - start

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    def jump(self, seconds: float) -> float:
        """Move forward by `seconds`; return the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        return self._now
