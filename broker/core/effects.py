"""Effects: what the asyncio layer must do after Scheduler.flush(). Mutators collect them in
an Outbox during a loop turn; flush() hands them out at once, so that one frame carries
every delivery (or result, progress report, revocation) a session gets in that turn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Deliver",
    "Effect",
    "JobBuried",
    "Outbox",
    "ProgressReady",
    "ResultsReady",
    "Revoke",
    "SessionExpired",
    "TimeLimitHit",
    "WorkerLost",
]


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send these jobs to the worker session: [job_id, token, queue, payload, attempt, lease]."""

    session: int
    jobs: list[list[Any]]


@dataclass(frozen=True, slots=True)
class ResultsReady:
    """Send these outcomes to the watching session: [job_id, state, result or error]."""

    session: int
    items: list[list[Any]]


@dataclass(frozen=True, slots=True)
class ProgressReady:
    """Send these progress reports to the watching session: [job_id, fraction, message]."""

    session: int
    items: list[list[Any]]


@dataclass(frozen=True, slots=True)
class Revoke:
    """Tell the worker session that it no longer holds these jobs: [job_id, token, reason]."""

    session: int
    items: list[list[Any]]


@dataclass(frozen=True, slots=True)
class SessionExpired:
    """The session missed its heartbeats: close its connection. Its jobs are already requeued."""

    session: int


@dataclass(frozen=True, slots=True)
class WorkerLost:
    """A worker session ended holding leases; these jobs went back to their queues (or dead)."""

    session: int
    name: str
    requeued: list[int]
    buried: list[int]


@dataclass(frozen=True, slots=True)
class TimeLimitHit:
    """A started job ran past its time limit plus the worker's grace: the broker took it back
    from the session (which is told) and failed the attempt."""

    job_id: int
    queue: str
    session: int | None
    buried: bool


@dataclass(frozen=True, slots=True)
class JobBuried:
    """A job went to its queue's dead-letter list."""

    job_id: int
    queue: str
    error: dict[str, str]


Effect = Deliver | ResultsReady | ProgressReady | Revoke | SessionExpired | WorkerLost | TimeLimitHit | JobBuried


@dataclass(slots=True)
class Outbox:
    """Effects collected since the last flush, batched per session."""

    deliveries: dict[int, list[list[Any]]] = field(default_factory=dict)
    results: dict[int, list[list[Any]]] = field(default_factory=dict)
    progress: dict[int, list[list[Any]]] = field(default_factory=dict)
    revoked: dict[int, list[list[Any]]] = field(default_factory=dict)
    notices: list[Effect] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.deliveries or self.results or self.progress or self.revoked or self.notices)

    def effects(self) -> list[Effect]:
        """Everything collected, as effects: notices first, then revocations (so that a worker
        hears a lease is gone before it gets new work), deliveries, progress and results."""
        effects: list[Effect] = list(self.notices)
        effects.extend(Revoke(s, items) for s, items in self.revoked.items())
        effects.extend(Deliver(s, jobs) for s, jobs in self.deliveries.items())
        effects.extend(ProgressReady(s, items) for s, items in self.progress.items())
        effects.extend(ResultsReady(s, items) for s, items in self.results.items())
        return effects
