"""Clocks. The core never reads time itself: callers pass `now` from one of these."""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "FakeClock", "MonotonicClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""
        ...


class MonotonicClock:
    """time.monotonic(), the same scale as asyncio's loop.time()."""

    def now(self) -> float:
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told, for tests and benchmarks."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def jump(self, seconds: float) -> float:
        """Move forward by `seconds`; return the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        return self._now
