"""Queue controls, enforced by the broker across every worker (docs/protocol.md, "queue_set"):
a queue may be paused, limited to N jobs held by workers at once, and limited to R deliveries
a second (a token bucket). Pure: `now` comes in, nothing is read from a clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BURST_SECONDS", "QueueControls"]

# The bucket holds this many seconds' worth of deliveries, and at least two (so that a
# dispatch that comes a little after its token keeps the fraction it earned meanwhile):
# deliveries come evenly spread, not in bursts, and "R a second" holds over a few seconds.
BURST_SECONDS = 0.01
MIN_BURST = 2.0


@dataclass(slots=True)
class QueueControls:
    """Args:
    paused: no job of the queue is delivered (submits are still taken).
    concurrency: at most this many jobs of the queue held by workers at once (None: no limit).
    rate: at most this many deliveries a second (None: no limit).
    """

    paused: bool = False
    concurrency: int | None = None
    rate: float | None = None
    tokens: float = 1.0
    refilled_at: float = 0.0

    @property
    def configured(self) -> bool:
        """Whether anything is set (a queue without controls needs none)."""
        return self.paused or self.concurrency is not None or self.rate is not None

    def allowance(self, held: int, now: float) -> int | None:
        """How many jobs may be delivered now, with `held` already held by workers; None: no
        limit."""
        if self.paused:
            return 0
        allowed: int | None = None
        if self.concurrency is not None:
            allowed = max(0, self.concurrency - held)
        if self.rate is not None:
            self._refill(now)
            by_rate = int(self.tokens)
            allowed = by_rate if allowed is None else min(allowed, by_rate)
        return allowed

    def spend(self) -> None:
        """One delivery was made."""
        if self.rate is not None:
            self.tokens -= 1.0

    def next_token_at(self, now: float) -> float | None:
        """When the rate allows the next delivery, if it does not now (None: it does, or no rate)."""
        if self.rate is None or self.paused or self.tokens >= 1.0:
            return None
        return now + (1.0 - self.tokens) / self.rate

    def _refill(self, now: float) -> None:
        assert self.rate is not None
        capacity = max(MIN_BURST, self.rate * BURST_SECONDS)
        self.tokens = min(capacity, self.tokens + max(0.0, now - self.refilled_at) * self.rate)
        self.refilled_at = now

    def settings(self) -> dict[str, Any]:
        """What is set, as stats and the wire show it."""
        return {"paused": self.paused, "concurrency": self.concurrency, "rate": self.rate}
