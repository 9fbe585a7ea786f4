"""The scheduler's records of queues and worker sessions. They hold state and answer
questions about it; which job is in which count, FIFO or lease table is decided in one place,
Scheduler._move (scheduler.py), from the lifecycle table in jobs.py."""

from __future__ import annotations

import bisect
from collections import deque

from jobbroker.broker.core.controls import QueueControls
from jobbroker.broker.core.jobs import Job, JobState

__all__ = ["RATE_SAMPLE_EVERY", "RATE_WINDOW", "Queue", "RunTimes", "Session"]

_PENDING = JobState.PENDING  # a global: an Enum attribute costs ~100 ns a look-up (Python 3.11)

# Rates in stats are the change over the last RATE_WINDOW seconds, from samples of the counts
# taken at most every RATE_SAMPLE_EVERY seconds (docs/protocol.md, "stats").
RATE_SAMPLE_EVERY = 1.0
RATE_WINDOW = 10.0


class RunTimes:
    """A histogram of job run times (delivery to completion), in fixed buckets, for metrics."""

    BOUNDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0)
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last: above every bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += 1
        self.total += seconds


class Queue:
    """One queue: its pending jobs by priority, per-state counts, dead-letter list, the
    workers waiting on it, its controls and its totals since it was created."""

    __slots__ = (
        "buried",
        "completed",
        "controls",
        "dead",
        "delayed_count",
        "failed",
        "finished_count",
        "leased_count",
        "name",
        "pending",
        "pending_count",
        "priorities",
        "rate_samples",
        "requeued",
        "run_times",
        "submitted",
        "waiters",
        "waiting_count",
    )

    def __init__(self, name: str, now: float = 0.0) -> None:
        self.name = name
        # priority -> FIFO. May hold jobs no longer pending (cancelled): pop() skips them.
        # Pending jobs not yet stored are counted but in no FIFO (Lifecycle.unstored, lifecycle.py).
        self.pending: dict[int, deque[Job]] = {}
        self.priorities: list[int] = []  # negated priorities present in `pending`, ascending
        # Jobs per state, kept by Scheduler._move only.
        self.pending_count = 0
        self.waiting_count = 0  # jobs waiting for the jobs they run after
        self.delayed_count = 0
        self.leased_count = 0
        self.finished_count = 0  # done and cancelled jobs kept for the result TTL
        self.dead: dict[int, Job] = {}  # dead-letter list, oldest first
        self.controls: QueueControls | None = None  # paused, concurrency, rate: see controls.py
        self.waiters: deque[Session] = deque()  # workers with credit, round robin
        # Totals since the queue was created.
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.buried = 0  # jobs that went to the dead-letter list, ever
        self.requeued = 0  # jobs that lost their lease and went back, ever
        self.run_times = RunTimes()
        # (now, submitted, completed), oldest first; the first is the newest taken at or before
        # the start of the rate window (or the queue's creation, when it is younger).
        self.rate_samples: deque[tuple[float, int, int]] = deque([(now, 0, 0)])

    def count(self, state: JobState) -> int:
        """Jobs of this queue in `state` (done and cancelled counted together)."""
        if state is JobState.PENDING:
            return self.pending_count
        if state is JobState.WAITING:
            return self.waiting_count
        if state is JobState.DELAYED:
            return self.delayed_count
        if state is JobState.LEASED:
            return self.leased_count
        if state is JobState.DEAD:
            return len(self.dead)
        return self.finished_count

    @property
    def idle(self) -> bool:
        """No job of any kind refers to this queue and nothing is set on it (workers naming it
        are checked apart)."""
        return not (
            self.pending_count
            or self.waiting_count
            or self.delayed_count
            or self.leased_count
            or self.finished_count
            or self.dead
            or self.controls is not None
        )

    def push(self, job: Job, *, front: bool = False) -> None:
        """Put a pending job in line (at the front of its priority: a job handed back)."""
        fifo = self.pending.get(job.priority)
        if fifo is None:
            fifo = self.pending[job.priority] = deque()
            bisect.insort(self.priorities, -job.priority)
        if front:
            fifo.appendleft(job)
        else:
            fifo.append(job)

    def pop(self) -> Job | None:
        """The next pending job: highest priority, then oldest. Skips cancelled ones."""
        while self.priorities:
            priority = -self.priorities[0]
            fifo = self.pending[priority]
            while fifo:
                job = fifo.popleft()
                if job.state is _PENDING:
                    if not fifo:
                        self._drop_priority(priority)
                    return job
            self._drop_priority(priority)
        return None

    def _drop_priority(self, priority: int) -> None:
        del self.pending[priority]
        del self.priorities[bisect.bisect_left(self.priorities, -priority)]

    def sample(self, now: float) -> None:
        """Take a sample of the totals behind the rates."""
        samples = self.rate_samples
        samples.append((now, self.submitted, self.completed))
        # Keep the newest sample at or before the window's start: the counts then.
        window_start = now - RATE_WINDOW
        while len(samples) > 1 and samples[1][0] <= window_start:
            samples.popleft()

    def rates(self, now: float) -> tuple[float, float]:
        """Jobs submitted and completed a second over the last RATE_WINDOW seconds (after a
        sample at `now`). What changed since the window began, divided by the time that covers
        (docs/protocol.md, "stats"): a burst that ended 3 s ago still shows. Counts change only
        within a sampling interval after a sample (Scheduler._note_rates), so when the newest
        sample before the window is older than that, the next one holds the counts at its
        start. A queue younger than the window: over its age (at least a sampling interval)."""
        samples = self.rate_samples
        base_time, submitted, completed = samples[0]
        if len(samples) > 1 and base_time + RATE_SAMPLE_EVERY <= now - RATE_WINDOW:
            _, submitted, completed = samples[1]  # the counts at the window's start
            base_time = now - RATE_WINDOW
        span = max(now - base_time, RATE_SAMPLE_EVERY)
        return (self.submitted - submitted) / span, (self.completed - completed) / span


class Session:
    """A connected client; a worker once it names queues (reserve)."""

    __slots__ = ("closed", "id", "last_seen", "leased", "name", "peer", "prefetch", "queues", "waiting")

    def __init__(self, session_id: int, name: str, peer: str, now: float) -> None:
        self.id = session_id
        self.name = name
        self.peer = peer
        self.last_seen = now
        self.queues: tuple[str, ...] = ()
        self.prefetch = 0
        self.leased: dict[int, Job] = {}  # the jobs it holds, kept by Scheduler._move only
        self.waiting: set[str] = set()  # queues whose waiters hold this session
        self.closed = False

    @property
    def credit(self) -> int:
        return self.prefetch - len(self.leased)
