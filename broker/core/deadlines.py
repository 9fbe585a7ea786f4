"""A heap of deadlines with lazy deletion (as trio's Deadlines): add and cancel are O(log n) and
O(1); cancelled entries are dropped when they reach the top, or all at once when they
outnumber the live ones, so the heap never grows past about twice the live deadlines."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["Deadlines", "OrderedDeadlines"]

K = TypeVar("K", bound=Hashable)

_COMPACT_FLOOR = 1024


class _Keyed(Generic[K]):
    """At most one deadline per key; adding a key again replaces its deadline. An entry is
    live while its counter is the key's latest: cancelling forgets the key, nothing else."""

    __slots__ = ("_counter", "_live")

    def __init__(self) -> None:
        self._live: dict[K, int] = {}  # key -> counter of its live entry
        self._counter = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def cancel(self, key: K) -> None:
        self._live.pop(key, None)


class Deadlines(_Keyed[K]):
    """Deadlines in any order, in a heap."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[float, int, K]] = []

    def add(self, key: K, when: float) -> None:
        self._counter += 1
        self._live[key] = self._counter
        heapq.heappush(self._heap, (when, self._counter, key))
        if len(self._heap) > _COMPACT_FLOOR and len(self._heap) > 2 * len(self._live):
            self._compact()

    def next_deadline(self) -> float | None:
        heap, live = self._heap, self._live
        while heap:
            when, counter, key = heap[0]
            if live.get(key) == counter:
                return when
            heapq.heappop(heap)
        return None

    def expire(self, now: float) -> list[K]:
        """Remove and return the keys whose deadline is at or before `now`, earliest first."""
        heap, live = self._heap, self._live
        expired: list[K] = []
        while heap and heap[0][0] <= now:
            _, counter, key = heapq.heappop(heap)
            if live.get(key) == counter:
                del live[key]
                expired.append(key)
        return expired

    def _compact(self) -> None:
        live = self._live
        self._heap = [entry for entry in self._heap if live.get(entry[2]) == entry[1]]
        heapq.heapify(self._heap)


class OrderedDeadlines(_Keyed[K]):
    """Deadlines added in time order (a constant delay from a clock that does not go back,
    as result TTLs are): a FIFO instead of a heap, O(1) to add. Same interface as Deadlines.
    A deadline earlier than the last one added is moved to it: it comes due a little late,
    never early."""

    __slots__ = ("_queue",)

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[tuple[float, int, K]] = deque()

    def add(self, key: K, when: float) -> None:
        if self._queue and when < self._queue[-1][0]:
            when = self._queue[-1][0]
        self._counter += 1
        self._live[key] = self._counter
        self._queue.append((when, self._counter, key))

    def next_deadline(self) -> float | None:
        queue, live = self._queue, self._live
        while queue:
            when, counter, key = queue[0]
            if live.get(key) == counter:
                return when
            queue.popleft()
        return None

    def expire(self, now: float) -> list[K]:
        queue, live = self._queue, self._live
        expired: list[K] = []
        while queue and queue[0][0] <= now:
            _, counter, key = queue.popleft()
            if live.get(key) == counter:
                del live[key]
                expired.append(key)
        return expired
