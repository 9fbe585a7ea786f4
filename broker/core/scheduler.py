"""The scheduler: queues, leases, retries, results and sessions, with no I/O.

Every mutator takes `now` (seconds, monotonic). The asyncio layer calls the mutators as
requests arrive, calls tick(now) when next_deadline() comes, and calls flush(now) once per
loop turn to dispatch pending jobs to waiting workers and collect the effects to send out.
Batching per turn is what lets one frame carry many deliveries.

Semantics (docs/protocol.md, "Jobs"): highest priority first, FIFO within a priority, round
robin across the workers that wait on a queue; delivery at least once, completion at most
once, fenced by lease tokens.

Leases follow the worker's session (docs/protocol.md, "Leases"): a job held by a live session
is never taken back for lack of time. It goes back when the session ends (disconnected, or
silent for 3 heartbeat intervals), when it is cancelled, or when it overruns its own time
limit (`timeout`) by the grace the worker had to end it itself. An attempt counts from the
moment the worker starts the job, not from its delivery: a job that waits in a worker's
prefetch buffer uses no attempt.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from jobbroker.broker.core.controls import QueueControls
from jobbroker.broker.core.deadlines import Deadlines, OrderedDeadlines
from jobbroker.broker.core.jobs import FINAL_STATES, Job, JobEvent, JobState, transition
from jobbroker.broker.core.schedules import Schedule, Schedules
from jobbroker.broker.errors import InvalidRequest, InvalidState, JobNotFound, LeaseLost, LimitExceeded, QueueFull
from jobbroker.broker.protocol.messages import (
    MAX_ERROR_MESSAGE,
    MAX_ERROR_TYPE,
    MAX_TRACEBACK,
    bounded,
)
from jobbroker.broker.protocol.rows import DeliveryRow, Outcome, ResultRow

__all__ = [
    "Changes",
    "Deliver",
    "Effect",
    "JobBuried",
    "ProgressReady",
    "ResultsReady",
    "Revoke",
    "Scheduler",
    "SchedulerConfig",
    "SessionExpired",
    "TimeLimitHit",
    "WorkerLost",
]

MAX_QUEUE_NAME = 200
# Queue names: ASCII letters, digits and . _ : / @ -, starting with a letter or digit; they show
# in logs, stats and metrics, where anything else could mislead.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]*\Z")
MAX_KEY_LENGTH = 200
HEARTBEATS_MISSED_BEFORE_DEAD = 3
WORKER_JOBS_SHOWN = 20  # running jobs listed per worker in stats (a worker may hold thousands)
_RATE_SAMPLE_EVERY = 1.0
_RATE_WINDOW = 10.0
# Seconds between sweeps that free the queues nobody uses (no jobs, no workers naming them);
# a queue at the limit is also swept for, at most once a second.
QUEUE_SWEEP_EVERY = 60.0
_QUEUE_SWEEP_AT_LIMIT_EVERY = 1.0


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Defaults and limits of the job core.

    Args:
        heartbeat: heartbeat interval; a session silent for 3 intervals is dead.
        default_lease: lease of a delivery unless the job says otherwise.
        default_max_attempts: deliveries before a failing job goes dead.
        default_backoff: first retry delay; doubles each attempt.
        max_backoff: cap of the retry delay.
        result_ttl: how long results (and finished jobs) are kept, unless a job says otherwise.
        max_result_ttl: the longest result TTL a job may ask for.
        max_pending_per_queue: pending plus delayed jobs a queue may hold (backpressure).
        max_prefetch: the largest prefetch a worker may ask for: its in-flight jobs at most.
        max_batch: jobs (or job ids) one request may carry.
        max_queues: queues the broker holds at most.
    """

    heartbeat: float = 5.0
    default_lease: float = 30.0
    default_max_attempts: int = 3
    default_backoff: float = 1.0
    max_backoff: float = 300.0
    result_ttl: float = 300.0
    max_result_ttl: float = 7 * 86400.0
    max_pending_per_queue: int = 1_000_000
    max_prefetch: int = 10_000
    max_batch: int = 10_000
    max_queues: int = 10_000


# --- effects: what the asyncio layer must do after a flush ------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    """Send these jobs to the worker session."""

    session: int
    jobs: list[DeliveryRow]


@dataclass(frozen=True, slots=True)
class ResultsReady:
    """Send these outcomes to the watching session."""

    session: int
    items: list[ResultRow]


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


# --- changes, for a durable store ---------------------------------------------------------


@dataclass(slots=True)
class Changes:
    """What a durable store must write. Each job appears once: `created` jobs in their
    current state (created and changed since the last take), `updated` jobs whose state,
    attempts, result, error or times changed, and the ids of jobs `forgotten`."""

    created: dict[int, Job] = field(default_factory=dict)
    updated: dict[int, Job] = field(default_factory=dict)
    forgotten: list[int] = field(default_factory=list)
    # queue name -> its controls as they are now (None: none set any more)
    controls: dict[str, QueueControls | None] = field(default_factory=dict)
    # schedule name -> its record as it is now (None: removed)
    schedules: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.created or self.updated or self.forgotten or self.controls or self.schedules)

    def forget(self, job_id: int) -> None:
        self.updated.pop(job_id, None)
        if self.created.pop(job_id, None) is None:  # never written: nothing to delete
            self.forgotten.append(job_id)


# --- state ------------------------------------------------------------------------------


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


class _Queue:
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
        self.pending: dict[int, deque[Job]] = {}  # priority -> FIFO; may hold cancelled jobs
        self.priorities: list[int] = []  # negated priorities present in `pending`, ascending
        self.pending_count = 0
        self.waiting_count = 0  # jobs waiting for the jobs they run after
        self.delayed_count = 0
        self.leased_count = 0
        self.finished_count = 0  # done and cancelled jobs kept for the result TTL
        self.controls: QueueControls | None = None  # paused, concurrency, rate: see controls.py
        self.dead: dict[int, Job] = {}  # dead-letter list, oldest first
        self.waiters: deque[_Session] = deque()  # workers with credit, round robin
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.buried = 0  # jobs that went to the dead-letter list, ever
        self.requeued = 0  # jobs that lost their lease and went back, ever
        self.run_times = RunTimes()
        # (now, submitted, completed), oldest first; the first is the newest taken at or before
        # the start of the rate window (or the queue's creation, when it is younger).
        self.rate_samples: deque[tuple[float, int, int]] = deque([(now, 0, 0)])

    def push(self, job: Job, *, front: bool = False) -> None:
        fifo = self.pending.get(job.priority)
        if fifo is None:
            fifo = self.pending[job.priority] = deque()
            bisect.insort(self.priorities, -job.priority)
        if front:
            fifo.appendleft(job)
        else:
            fifo.append(job)
        self.pending_count += 1

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

    def pop(self) -> Job | None:
        """The next pending job: highest priority, then oldest. Skips cancelled ones."""
        while self.priorities:
            priority = -self.priorities[0]
            fifo = self.pending[priority]
            while fifo:
                job = fifo.popleft()
                if job.state is JobState.PENDING:
                    self.pending_count -= 1
                    if not fifo:
                        self._drop_priority(priority)
                    return job
            self._drop_priority(priority)
        return None

    def _drop_priority(self, priority: int) -> None:
        del self.pending[priority]
        del self.priorities[bisect.bisect_left(self.priorities, -priority)]


class _Session:
    __slots__ = ("closed", "id", "last_seen", "leased", "name", "peer", "prefetch", "queues", "waiting")

    def __init__(self, session_id: int, name: str, peer: str, now: float) -> None:
        self.id = session_id
        self.name = name
        self.peer = peer
        self.last_seen = now
        self.queues: tuple[str, ...] = ()
        self.prefetch = 0
        self.leased: dict[int, Job] = {}
        self.waiting: set[str] = set()  # queues whose waiters hold this session
        self.closed = False

    @property
    def credit(self) -> int:
        return self.prefetch - len(self.leased)


@dataclass(slots=True)
class _Outbox:
    deliveries: dict[int, list[DeliveryRow]] = field(default_factory=dict)
    results: dict[int, list[ResultRow]] = field(default_factory=dict)
    progress: dict[int, list[list[Any]]] = field(default_factory=dict)
    revoked: dict[int, list[list[Any]]] = field(default_factory=dict)
    notices: list[Effect] = field(default_factory=list)


class Scheduler:
    """All queues, jobs and sessions of one broker."""

    def __init__(self, config: SchedulerConfig | None = None, *, track_changes: bool = False) -> None:
        """Args:
        config: defaults and limits.
        track_changes: record every job created, changed or forgotten, for take_changes()
            (a durable broker persists them); off, nothing accumulates. On, a new job is
            also not delivered until stored() says its creation is committed.
        """
        self.config = config or SchedulerConfig()
        self.track_changes = track_changes
        self._changes = Changes()
        self._jobs: dict[int, Job] = {}
        self._queues: dict[str, _Queue] = {}
        self._sessions: dict[int, _Session] = {}
        # (owner, queue, idempotency key) -> job id: one producer's keys never meet another's
        self._keys: dict[tuple[str | None, str, str], int] = {}
        self._next_job_id = 1
        self._next_token = 1
        # With track_changes: pending jobs whose creation is not yet committed, in the order
        # they became pending; counted in pending_count but in no FIFO, so that no worker runs
        # a job a crash could still take back (docs/protocol.md, "Durability"). stored() moves
        # them to their queues.
        self._unstored: list[Job] = []
        self._stored_below = 1  # every job with a smaller id is stored (or gone)
        # job id of a started job with a time limit: when the broker takes it back if the
        # worker has not ended it (its own limit plus the grace the worker has to report it)
        self._run_deadlines: Deadlines[int] = Deadlines()
        self._rate_deadlines: Deadlines[str] = Deadlines()  # queue name: its next rate token
        self._dependents: dict[int, list[Job]] = {}  # job id -> the waiting jobs that run after it
        self.schedules = Schedules()
        self._due_deadlines: Deadlines[int] = Deadlines()  # job id of a delayed job
        # job id of a finished job; TTLs are all alike, so these come in time order
        self._expiry_deadlines: OrderedDeadlines[int] = OrderedDeadlines()
        self._own_ttl_deadlines: Deadlines[int] = Deadlines()  # job id of a job with its own TTL
        self._session_deadlines: Deadlines[int] = Deadlines()  # session id
        self._ready: dict[str, None] = {}  # queues that may have work for waiters (ordered set)
        self._outbox = _Outbox()
        self._last_rate_sample = float("-inf")
        self._last_queue_sweep = float("-inf")  # periodic sweeps of unused queues
        self._last_limit_sweep = float("-inf")  # sweeps because a new queue met the limit
        self.draining = False  # deliveries stopped (drain, or a broker shutting down)

    # --- sessions ---------------------------------------------------------------------

    @property
    def session_timeout(self) -> float:
        return self.config.heartbeat * HEARTBEATS_MISSED_BEFORE_DEAD

    @property
    def time_limit_grace(self) -> float:
        """How long past a job's time limit the broker waits for the worker to end it itself."""
        return self.session_timeout + 1.0

    def open_session(self, session_id: int, now: float, *, name: str = "", peer: str = "") -> None:
        if session_id in self._sessions:
            raise InvalidRequest(f"session {session_id} is already open")
        self._sessions[session_id] = _Session(session_id, name, peer, now)
        self._session_deadlines.add(session_id, now + self.session_timeout)

    def seen(self, session_id: int, now: float) -> None:
        """Anything received from a session proves it alive (a heartbeat or any request).
        O(1): the deadline is pushed back lazily when it comes due."""
        session = self._sessions.get(session_id)
        if session is not None:
            session.last_seen = now

    def close_session(self, session_id: int, now: float) -> None:
        """The session's connection is gone: requeue its leases at once (a started job with
        its attempt counted; one still in the worker's buffer as if never delivered). Idempotent."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        session.closed = True
        self._session_deadlines.cancel(session_id)
        if not session.leased:
            return
        requeued: list[int] = []
        buried: list[int] = []
        for job in list(session.leased.values()):
            if self._lose_lease(job, now, "worker lost"):
                buried.append(job.id)
            else:
                requeued.append(job.id)
        session.leased.clear()
        self._outbox.notices.append(WorkerLost(session_id, session.name, requeued, buried))

    def _session(self, session_id: int) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise InvalidRequest(f"session {session_id} is not open")
        return session

    # --- producers --------------------------------------------------------------------

    def submit(
        self,
        session_id: int,
        queue_name: str,
        payloads: Sequence[Any],
        now: float,
        *,
        priority: int = 0,
        delay: float = 0.0,
        max_attempts: int | None = None,
        lease: float | None = None,
        backoff: float | None = None,
        keys: Sequence[str | None] | None = None,
        watch: bool = False,
        owner: str | None = None,
        timeout: float | None = None,
        result_ttl: float | None = None,
        max_backoff: float | None = None,
        after: Sequence[int] | None = None,
        run_anyway: bool = False,
    ) -> list[int]:
        """Add jobs to a queue, all or none. Returns their ids, in order; a job whose
        idempotency key this owner already used on this queue gets the first job's id.

        `owner` (the submitting credential) alone may later cancel, watch and inspect the jobs
        when it is not an admin.

        Raises:
            InvalidRequest: a bad argument.
            LimitExceeded: more jobs than max_batch, or a new queue past max_queues.
            QueueFull: the queue would hold more than max_pending_per_queue jobs.
        """
        config = self.config
        check_queue_name(queue_name)
        self._check_batch(len(payloads))
        if not -(2**31) <= priority < 2**31:
            raise InvalidRequest("priority must fit in 32 bits")
        if not 0.0 <= delay < 10 * 365 * 86400:
            raise InvalidRequest("delay must be between 0 and ten years")
        max_attempts = config.default_max_attempts if max_attempts is None else max_attempts
        if not 1 <= max_attempts <= 1_000_000:
            raise InvalidRequest("max_attempts must be between 1 and 1000000")
        lease = config.default_lease if lease is None else lease
        if not 0.0 < lease <= 86400 * 7:
            raise InvalidRequest("lease must be more than 0 and at most a week")
        backoff = config.default_backoff if backoff is None else backoff
        if not 0.0 <= backoff <= 86400:
            raise InvalidRequest("backoff must be between 0 and a day")
        if timeout is not None and not 0.0 < timeout <= 86400 * 7:
            raise InvalidRequest("timeout must be more than 0 and at most a week (or nil: no limit)")
        if result_ttl is not None and not 0.0 <= result_ttl <= config.max_result_ttl:
            raise InvalidRequest(f"result_ttl must be between 0 and the broker's maximum, {config.max_result_ttl:g} s")
        if max_backoff is not None and not 0.0 <= max_backoff <= 86400 * 7:
            raise InvalidRequest("max_backoff must be between 0 and a week")
        parents: list[Job] = []
        if after:
            self._check_batch(len(after))
            if delay > 0:
                raise InvalidRequest("a job runs after other jobs or after a delay, not both")
            for parent_id in after:
                parent = self._visible(parent_id, owner)
                if parent is None:  # only existing jobs: no cycle can ever form
                    raise InvalidRequest(f"job {parent_id}, to run after, is unknown (or expired)")
                parents.append(parent)
        if keys is not None:
            if len(keys) != len(payloads):
                raise InvalidRequest(f"{len(keys)} idempotency keys for {len(payloads)} payloads")
            for key in keys:
                if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
                    raise InvalidRequest(f"an idempotency key has 1 to {MAX_KEY_LENGTH} characters")
        watcher = self._session(session_id).id if watch else None

        queue = self._queues.get(queue_name)
        known = 0
        if keys is not None:
            known = sum(1 for key in keys if key is not None and (owner, queue_name, key) in self._keys)
        waiting_now = 0 if queue is None else queue.pending_count + queue.delayed_count
        if waiting_now + len(payloads) - known > config.max_pending_per_queue:
            raise QueueFull(
                f"queue {queue_name!r} holds {waiting_now} waiting jobs; the limit is {config.max_pending_per_queue}"
            )
        if queue is None:
            queue = self._new_queue(queue_name, now)
        self._note_rates(now)

        state = JobState.WAITING if parents else JobState.DELAYED if delay > 0 else JobState.PENDING
        ids: list[int] = []
        created = 0
        for index, payload in enumerate(payloads):
            key = None if keys is None else keys[index]
            if key is not None:
                existing = self._keys.get((owner, queue_name, key))
                if existing is not None:
                    ids.append(existing)
                    if watcher is not None:
                        self._watch_one(watcher, existing, owner)
                    continue
            job = Job(
                self._next_job_id,
                queue_name,
                payload,
                priority=priority,
                max_attempts=max_attempts,
                lease_seconds=lease,
                backoff=backoff,
                key=key,
                state=state,
                timeout=timeout,
                result_ttl=result_ttl,
                max_backoff=max_backoff,
            )
            job.owner = owner
            self._next_job_id += 1
            self._jobs[job.id] = job
            if self.track_changes:
                self._changes.created[job.id] = job
            if key is not None:
                self._keys[(owner, queue_name, key)] = job.id
            if watcher is not None:
                job.watchers = [watcher]
            if state is JobState.WAITING:
                queue.waiting_count += 1
                self._wait_for(job, parents, run_anyway, now)
            elif state is JobState.DELAYED:
                queue.delayed_count += 1
                job.not_before = now + delay
                self._due_deadlines.add(job.id, job.not_before)
            elif self.track_changes:
                queue.pending_count += 1
                self._unstored.append(job)
            else:
                queue.push(job)
            ids.append(job.id)
            created += 1
        queue.submitted += created
        if state is JobState.PENDING and not self.track_changes:
            self._ready[queue_name] = None
        return ids

    def cancel(self, job_ids: Sequence[int], now: float, owner: str | None = None) -> list[str | None]:
        """Cancel pending, delayed or running jobs (an owner: only its own); the worker running
        one is told (Revoke) and its answer will be refused. Per job: None, or an error code."""
        self._check_batch(len(job_ids))
        codes: list[str | None] = []
        for job_id in job_ids:
            job = self._visible(job_id, owner)
            if job is None:
                codes.append(JobNotFound.code)
            elif job.state in FINAL_STATES:
                codes.append(InvalidState.code)
            else:
                self._cancel(job, now)
                codes.append(None)
        return codes

    def _cancel(self, job: Job, now: float) -> None:
        queue = self._queues[job.queue]
        if job.state is JobState.PENDING:
            queue.pending_count -= 1  # the job stays in its FIFO; pop() skips it
        elif job.state is JobState.LEASED:
            self._revoke(job, "cancelled")
            self._end_lease(job)
        elif job.state is JobState.WAITING:
            queue.waiting_count -= 1  # the jobs it waits for skip it when they end
        else:
            queue.delayed_count -= 1
            self._due_deadlines.cancel(job.id)
        self._move(job, JobEvent.CANCEL)
        self._finish(job, now)

    # --- dependencies ---------------------------------------------------------------------

    def _wait_for(self, job: Job, parents: list[Job], run_anyway: bool, now: float, *, restored: bool = False) -> None:
        """A job runs after `parents` (docs/protocol.md, "after"): note what has ended
        already, wait for the rest. A restored job keeps its parents and the results stored."""
        if not restored:
            job.parents = [parent.id for parent in parents]
            job.parent_results = [None] * len(parents)
        assert job.parents is not None and job.parent_results is not None
        job.run_anyway = run_anyway
        failed: Job | None = None
        for parent in {parent.id: parent for parent in parents}.values():  # one wait per job named
            if parent.state in FINAL_STATES:
                if parent.state is JobState.DONE:
                    for index, parent_id in enumerate(job.parents):
                        if parent_id == parent.id:
                            job.parent_results[index] = parent.result
                elif failed is None:
                    failed = parent
            else:
                job.waiting_on += 1
                waiting = self._dependents.setdefault(parent.id, [])
                if not waiting or waiting[-1] is not job:  # named twice: one entry
                    waiting.append(job)
        if failed is not None and not run_anyway:
            self._cancel_dependent(job, failed, now)
        elif job.waiting_on == 0:
            self._make_ready(job)

    def _settle_dependents(self, ended: Job, now: float) -> None:
        """A job ended: the jobs waiting for it get its result, run if nothing else holds them,
        or are cancelled if it did not succeed (unless they run anyway), and so on down their
        own dependents: iteratively, for chains of any length."""
        stack = [ended]
        while stack:
            parent = stack.pop()
            for child in self._dependents.pop(parent.id, ()):
                if child.state is not JobState.WAITING:  # cancelled meanwhile
                    continue
                assert child.parents is not None and child.parent_results is not None
                for index, parent_id in enumerate(child.parents):
                    if parent_id == parent.id and parent.state is JobState.DONE:
                        child.parent_results[index] = parent.result
                self._changed(child)
                if parent.state is not JobState.DONE and not child.run_anyway:
                    self._cancel_dependent(child, parent, now, cascade=False)
                    stack.append(child)
                    continue
                child.waiting_on -= 1
                if child.waiting_on == 0:
                    self._make_ready(child)

    def _cancel_dependent(self, job: Job, failed: Job, now: float, *, cascade: bool = True) -> None:
        job.error = _error("DependencyFailed", f"job {failed.id}, which it runs after, ended {failed.state}")
        self._queues[job.queue].waiting_count -= 1
        self._move(job, JobEvent.CANCEL)
        self._finish(job, now, cascade=cascade)

    def _make_ready(self, job: Job) -> None:
        """Every job it waited for has ended: it joins its queue."""
        self._move(job, JobEvent.READY)
        queue = self._queues[job.queue]
        queue.waiting_count -= 1
        if self.track_changes and job.id >= self._stored_below:  # not stored yet: stored() delivers it
            queue.pending_count += 1
            self._unstored.append(job)
            return
        queue.push(job)
        self._ready[job.queue] = None

    def _changed(self, job: Job) -> None:
        if self.track_changes and job.id not in self._changes.created:
            self._changes.updated[job.id] = job

    def watch(self, session_id: int, job_ids: Sequence[int], owner: str | None = None) -> None:
        """Ask for the outcome of jobs; each arrives in a ResultsReady effect, at once if the
        job has already finished. An owner sees only its own jobs: others are "unknown"."""
        session = self._session(session_id)
        self._check_batch(len(job_ids))
        for job_id in job_ids:
            self._watch_one(session.id, job_id, owner)

    def _watch_one(self, session_id: int, job_id: int, owner: str | None) -> None:
        job = self._visible(job_id, owner)
        if job is None:
            self._outbox.results.setdefault(session_id, []).append(ResultRow(job_id, Outcome.UNKNOWN))
        elif job.state in FINAL_STATES:
            self._outbox.results.setdefault(session_id, []).append(_outcome(job))
        else:
            if job.watchers is None:
                job.watchers = [session_id]
            elif session_id not in job.watchers:
                job.watchers.append(session_id)
            if job.progress is not None:  # a follower that comes late sees where the job is
                self._outbox.progress.setdefault(session_id, []).append([job.id, *job.progress])

    # --- workers ----------------------------------------------------------------------

    def reserve(self, session_id: int, queue_names: Sequence[str], prefetch: int, now: float) -> None:
        """Make the session a worker on these queues holding up to `prefetch` leases at once;
        prefetch 0 stops deliveries (drain). Jobs arrive in Deliver effects."""
        session = self._session(session_id)
        if not 0 <= prefetch <= self.config.max_prefetch:
            raise InvalidRequest(f"prefetch must be between 0 and {self.config.max_prefetch}")
        if prefetch and not queue_names:
            raise InvalidRequest("reserve names no queue")
        self._check_batch(len(queue_names))
        for name in queue_names:
            check_queue_name(name)
        for name in session.waiting:
            queue = self._queues.get(name)
            if queue is not None and session in queue.waiters:
                queue.waiters.remove(session)
        session.waiting.clear()
        session.queues = tuple(dict.fromkeys(queue_names))
        session.prefetch = prefetch
        for name in session.queues:
            if name not in self._queues:
                self._new_queue(name, now)
        self._offer_credit(session)

    def complete(self, session_id: int, items: Iterable[Sequence[Any]], now: float) -> list[str | None]:
        """Complete leased jobs with their results: items of (job_id, token, result)."""
        codes: list[str | None] = []
        self._note_rates(now)
        for job, (_, _, result) in self._fenced(session_id, items, codes):
            started_at = self._start(job, now)
            self._end_lease(job)
            self._move(job, JobEvent.COMPLETE)
            job.result = result
            queue = self._queues[job.queue]
            queue.completed += 1
            queue.run_times.observe(now - started_at)
            self._finish(job, now)
        return codes

    def fail(self, session_id: int, items: Iterable[Sequence[Any]], now: float) -> list[str | None]:
        """Fail leased jobs: items of (job_id, token, error type, error message[, traceback
        [, final[, retry delay]]]). A job with attempts left is retried after its exponential
        backoff (or after the retry delay given), else buried; a final failure is buried at once."""
        codes: list[str | None] = []
        for job, item in self._fenced(session_id, items, codes):
            self._start(job, now)
            self._end_lease(job)
            size = len(item)
            job.error = _error(item[2], item[3], item[4] if size > 4 else None)
            final = size > 5 and bool(item[5])
            retry_delay = item[6] if size > 6 and item[6] == item[6] else None  # NaN: the backoff
            if retry_delay is not None:
                retry_delay = min(max(retry_delay, 0.0), MAX_RETRY_DELAY)
            self._failed(job, now, final=final, retry_delay=retry_delay)
        return codes

    def started(self, session_id: int, items: Iterable[Sequence[Any]], now: float) -> list[str | None]:
        """The worker began running delivered jobs: items of (job_id, token). Their attempt
        counts from now, and their time limit runs from now."""
        codes: list[str | None] = []
        for job, _ in self._fenced(session_id, items, codes):
            self._start(job, now)
        return codes

    def touch(self, session_id: int, items: Iterable[Sequence[Any]], now: float) -> list[str | None]:
        """Check that leases are still held: items of (job_id, token, seconds). Leases follow
        the session, so there is nothing to extend (the seconds are ignored); the answer says
        which jobs this session no longer holds."""
        codes: list[str | None] = []
        for _ in self._fenced(session_id, items, codes):
            pass
        return codes

    def progress(self, session_id: int, items: Iterable[Sequence[Any]], now: float) -> list[str | None]:
        """Running jobs report how far they have got: items of (job_id, token, fraction 0..1,
        message). Kept on the job (not stored on disk) and sent to its watchers."""
        codes: list[str | None] = []
        progress = self._outbox.progress
        for job, (_, _, fraction, message) in self._fenced(session_id, items, codes):
            self._start(job, now)  # a report comes from a running handler
            fraction = min(1.0, max(0.0, fraction)) if fraction == fraction else 0.0  # NaN: 0
            job.progress = (fraction, message[:200])
            for watcher in job.watchers or ():
                if watcher in self._sessions:
                    progress.setdefault(watcher, []).append([job.id, fraction, job.progress[1]])
        return codes

    def release(self, session_id: int, items: Iterable[Sequence[Any]], now: float) -> list[str | None]:
        """Hand leased jobs back (a worker shutting down, or one whose handler slots are stuck):
        requeued at the front, the attempt not counted even if it had started."""
        codes: list[str | None] = []
        for job, _ in self._fenced(session_id, items, codes):
            if job.started_at is not None:
                job.attempts -= 1
            self._end_lease(job)
            self._move(job, JobEvent.REQUEUE)
            self._queues[job.queue].push(job, front=True)
            self._ready[job.queue] = None
        return codes

    def _fenced(
        self, session_id: int, items: Iterable[Sequence[Any]], codes: list[str | None]
    ) -> Iterator[tuple[Job, Sequence[Any]]]:
        """The items (job_id, token, ...) whose job this session holds under that token: the
        fence against stale answers. Appends each item's code to `codes`, in order: None, or
        why it was refused."""
        if isinstance(items, Sequence):
            self._check_batch(len(items))
        for item in items:
            job, code = self._leased(session_id, item[0], item[1])
            codes.append(code)
            if job is not None:
                yield job, item

    def _leased(self, session_id: int, job_id: int, token: int) -> tuple[Job | None, str | None]:
        """The job if this session holds its lease under this token (the fence)."""
        job = self._jobs.get(job_id)
        if job is None:
            return None, JobNotFound.code
        if job.state is not JobState.LEASED or job.token != token or job.worker != session_id:
            return None, LeaseLost.code
        return job, None

    # --- admin ------------------------------------------------------------------------

    def job_info(self, job_id: int, owner: str | None = None) -> dict[str, Any]:
        """Everything known of one job (an owner: of its own jobs only).

        Raises:
            JobNotFound: no such job, its result TTL has passed, or it is another's.
        """
        job = self._visible(job_id, owner)
        if job is None:
            raise JobNotFound(f"job {job_id} is unknown (never submitted, or expired)")
        info = _describe(job)
        session = self._sessions.get(job.worker) if job.worker is not None else None
        info["worker_name"] = None if session is None else f"{session.name or 'worker'} ({session.peer})"
        return info

    def job_list(
        self, queue_name: str, state: str, *, after: int = 0, limit: int = 100, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """A page of a queue's jobs in one state ("pending", "delayed", "running" or "dead"),
        by id, those after `after`; without payloads (job_info has them). An owner sees its
        own jobs only.

        Raises:
            InvalidRequest: an unknown state or a limit outside 1..1000.
        """
        if not 1 <= limit <= MAX_LISTED:
            raise InvalidRequest(f"limit must be between 1 and {MAX_LISTED}")
        if state not in _LISTED_STATES:
            raise InvalidRequest(f"state must be one of {', '.join(_LISTED_STATES)}, not {state!r}")
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        candidates: Iterable[Job]
        if state == "pending":  # in their queue, or waiting for their creation's commit
            candidates = itertools.chain((job for fifo in queue.pending.values() for job in fifo), self._unstored)
        elif state == "dead":
            candidates = queue.dead.values()
        elif state == "running":
            candidates = (job for session in self._sessions.values() for job in session.leased.values())
        else:  # delayed, waiting: no index by queue; an admin's occasional scan
            candidates = self._jobs.values()
        wanted = _LISTED_STATES[state]
        page = heapq.nsmallest(
            limit,
            (
                job
                for job in candidates
                if job.id > after
                and job.state is wanted
                and job.queue == queue_name
                and (owner is None or job.owner == owner)
            ),
            key=lambda job: job.id,
        )
        return [_summary(job) for job in page]

    def configure_queue(
        self,
        queue_name: str,
        now: float,
        *,
        paused: bool | None = None,
        concurrency: int | None = None,
        rate: float | None = None,
    ) -> dict[str, Any]:
        """Set a queue's controls, enforced across every worker: `paused` (deliveries stop;
        submits are still taken), `concurrency` (at most N of its jobs held by workers at once;
        0: no limit), `rate` (at most R deliveries a second; 0: no limit). None leaves a
        setting as it is. Durable. Returns the queue's settings now.

        Raises:
            InvalidRequest: a limit out of range.
            LimitExceeded: a new queue past max_queues.
        """
        check_queue_name(queue_name)
        if concurrency is not None and not 0 <= concurrency <= 1_000_000:
            raise InvalidRequest("concurrency must be between 0 (no limit) and 1000000")
        if rate is not None and not (0.0 <= rate <= 1_000_000.0):  # NaN fails too
            raise InvalidRequest("rate must be between 0 (no limit) and 1000000 a second")
        queue = self._queues.get(queue_name) or self._new_queue(queue_name, now)
        controls = queue.controls or QueueControls(refilled_at=now)
        if paused is not None:
            controls.paused = paused
        if concurrency is not None:
            controls.concurrency = concurrency or None
        if rate is not None:
            controls.rate = rate or None
            controls.tokens, controls.refilled_at = 1.0, now
        queue.controls = controls if controls.configured else None
        if self.track_changes:
            self._changes.controls[queue_name] = queue.controls
        self._ready[queue_name] = None  # resumed, or a limit raised: deliver what may go
        return controls.settings()

    # --- schedules ------------------------------------------------------------------------

    def set_schedule(self, schedule: Schedule, wall: float) -> dict[str, Any]:
        """Add or replace a periodic job (docs/protocol.md, "schedule_set"). Durable.

        Raises:
            InvalidRequest: a bad expression, interval, time zone, queue name or option.
        """
        check_queue_name(schedule.queue)
        unknown = set(schedule.options) - _SCHEDULE_OPTIONS
        if unknown:
            raise InvalidRequest(f"schedule options are {', '.join(sorted(_SCHEDULE_OPTIONS))}, not {sorted(unknown)}")
        self.schedules.set(schedule, wall)
        self._schedule_changed(schedule.name)
        return schedule.record()

    def remove_schedule(self, name: str) -> bool:
        removed = self.schedules.remove(name) is not None
        if removed:
            self._schedule_changed(name)
        return removed

    def restore_schedules(self, records: Iterable[dict[str, Any]], wall: float) -> None:
        for record in records:
            self.schedules.restore(Schedule.from_record(record), wall)

    def fire_schedules(self, now: float, wall: float) -> list[tuple[str, float, str | None]]:
        """Submit the job of every schedule whose tick has come, once per tick: its
        idempotency key names the tick. Returns (name, tick, error or None) for each."""
        fired: list[tuple[str, float, str | None]] = []
        for schedule, tick in self.schedules.due(wall):
            key = f"schedule:{schedule.name}:{tick:.3f}"
            try:
                self.submit(0, schedule.queue, [schedule.payload], now, keys=[key], **schedule.options)
            except (InvalidRequest, QueueFull, LimitExceeded) as exc:
                fired.append((schedule.name, tick, str(exc)))
            else:
                fired.append((schedule.name, tick, None))
            self._schedule_changed(schedule.name)  # its last tick, stored with the job
        return fired

    def _schedule_changed(self, name: str) -> None:
        if self.track_changes:
            schedule = self.schedules.get(name)
            self._changes.schedules[name] = None if schedule is None else schedule.record()

    def restore_controls(self, controls: dict[str, QueueControls], now: float) -> None:
        """Queue controls recovered from storage (after restore())."""
        for name, settings in controls.items():
            queue = self._queues.get(name) or self._new_queue(name, now)
            settings.tokens, settings.refilled_at = 1.0, now
            queue.controls = settings if settings.configured else None
            self._ready[name] = None

    def purge_queue(self, queue_name: str, now: float) -> list[int]:
        """Cancel every pending, delayed and waiting job of a queue (running and dead ones stay).
        Returns the ids cancelled."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        fifos = (job for fifo in queue.pending.values() for job in fifo)
        unstored = (job for job in self._unstored if job.queue == queue_name)
        waiting = [job for job in itertools.chain(fifos, unstored) if job.state is JobState.PENDING]
        if queue.delayed_count or queue.waiting_count:
            later = (JobState.DELAYED, JobState.WAITING)
            waiting += [j for j in self._jobs.values() if j.queue == queue_name and j.state in later]
        for job in waiting:
            self._cancel(job, now)
        return [job.id for job in waiting]

    def dead_list(self, queue_name: str, limit: int = 100) -> list[dict[str, Any]]:
        queue = self._queues.get(queue_name)
        if queue is None or limit <= 0:
            return []
        listed: list[dict[str, Any]] = []
        for job in queue.dead.values():
            listed.append(_describe(job))
            if len(listed) >= limit:
                break
        return listed

    def dead_requeue(self, queue_name: str, job_ids: Sequence[int] | None, now: float) -> list[int]:
        """Move dead jobs (all of the queue's, or those named) back to pending with fresh
        attempts. Returns the ids moved."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        chosen = list(queue.dead) if job_ids is None else [i for i in job_ids if i in queue.dead]
        for job_id in chosen:
            job = queue.dead.pop(job_id)
            self._move(job, JobEvent.REVIVE)
            job.attempts = 0
            queue.push(job)
        if chosen:
            self._ready[queue_name] = None
        return chosen

    def dead_purge(self, queue_name: str, job_ids: Sequence[int] | None) -> list[int]:
        """Forget dead jobs (all of the queue's, or those named). Returns the ids forgotten."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        chosen = list(queue.dead) if job_ids is None else [i for i in job_ids if i in queue.dead]
        for job_id in chosen:
            del queue.dead[job_id]
            self._forget(self._jobs[job_id])
        return chosen

    def metrics(self) -> dict[str, Any]:
        """Counts for metrics: per queue gauges (pending, delayed, in_flight, dead), totals
        since start (submitted, completed, failed, buried, requeued) and run times; workers and
        sessions connected."""
        queues = {
            name: {
                "pending": q.pending_count,
                "waiting": q.waiting_count,
                "delayed": q.delayed_count,
                "in_flight": q.leased_count,
                "dead": len(q.dead),
                "submitted": q.submitted,
                "completed": q.completed,
                "failed": q.failed,
                "buried": q.buried,
                "requeued": q.requeued,
                "run_time_counts": list(q.run_times.counts),
                "run_time_sum": q.run_times.total,
                **(q.controls or _NO_CONTROLS).settings(),
            }
            for name, q in self._queues.items()
        }
        workers = sum(1 for session in self._sessions.values() if session.queues)
        return {"queues": queues, "workers": workers, "sessions": len(self._sessions)}

    def stats(self, now: float) -> dict[str, Any]:
        """Counts and rates per queue; workers with their leases and last heartbeat."""
        self._sample_rates(now)
        queues: dict[str, Any] = {}
        for name, queue in self._queues.items():
            # What changed since the window began, over the whole window: a burst that ended
            # 3 s ago still shows (docs/protocol.md, stats). Counts change only within a
            # sampling interval after a sample (_note_rates), so when the newest sample before
            # the window is older than that, the next one holds the counts at its start.
            # The counts are divided by the time they cover (10 to 11 s; a queue younger than
            # the window, its age, at least a sampling interval), not by a fixed 10 s.
            samples = queue.rate_samples
            base_time, submitted, completed = samples[0]
            if len(samples) > 1 and base_time + _RATE_SAMPLE_EVERY <= now - _RATE_WINDOW:
                _, submitted, completed = samples[1]  # the counts at the window's start
                base_time = now - _RATE_WINDOW
            span = max(now - base_time, _RATE_SAMPLE_EVERY)
            submitted_rate = (queue.submitted - submitted) / span
            completed_rate = (queue.completed - completed) / span
            queues[name] = {
                "pending": queue.pending_count,
                "waiting": queue.waiting_count,
                "delayed": queue.delayed_count,
                "in_flight": queue.leased_count,
                "dead": len(queue.dead),
                "done": queue.completed,
                "submitted": queue.submitted,
                "failed": queue.failed,
                "submitted_per_second": round(submitted_rate, 1),
                "done_per_second": round(completed_rate, 1),
                "workers": len({s.id for s in self._sessions.values() if name in s.queues}),
                **(queue.controls or _NO_CONTROLS).settings(),
            }
        workers = [
            {
                "session": session.id,
                "name": session.name,
                "peer": session.peer,
                "queues": list(session.queues),
                "prefetch": session.prefetch,
                "in_flight": list(session.leased),
                "running": [_running(job, now) for job in _shown_leases(session)],
                "last_heartbeat_age": round(now - session.last_seen, 3),
            }
            for session in self._sessions.values()
            if session.queues
        ]
        return {
            "queues": queues,
            "workers": workers,
            "sessions": len(self._sessions),
            "jobs": len(self._jobs),
            "draining": self.draining,
        }

    def drain(self, on: bool = True) -> int:
        """Stop delivering jobs (or, with on=False, start again); jobs already leased run to
        their end. Returns how many are leased now."""
        self.draining = on
        return self.in_flight

    @property
    def in_flight(self) -> int:
        return sum(queue.leased_count for queue in self._queues.values())

    # --- time -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When tick() next has work, or None."""
        candidates = [
            d
            for d in (
                self._run_deadlines.next_deadline(),
                self._due_deadlines.next_deadline(),
                self._expiry_deadlines.next_deadline(),
                self._own_ttl_deadlines.next_deadline(),
                self._session_deadlines.next_deadline(),
                self._rate_deadlines.next_deadline(),
            )
            if d is not None
        ]
        return min(candidates) if candidates else None

    def tick(self, now: float) -> None:
        """Act on every deadline at or before `now`."""
        for job_id in self._due_deadlines.expire(now):
            job = self._jobs[job_id]
            self._move(job, JobEvent.DUE)
            queue = self._queues[job.queue]
            queue.delayed_count -= 1
            if self.track_changes and job_id >= self._stored_below:  # due before it is stored: waits
                queue.pending_count += 1
                self._unstored.append(job)
                continue
            queue.push(job)
            self._ready[job.queue] = None
        for job_id in self._run_deadlines.expire(now):
            job = self._jobs[job_id]
            holder = job.worker
            limit = job.timeout
            self._revoke(job, "time limit")
            self._end_lease(job)
            job.error = _error(
                "TimeLimitExceeded",
                f"attempt {job.attempts} ran over its time limit of {limit:g} s and was taken back by the broker",
            )
            buried = self._failed(job, now)
            self._outbox.notices.append(TimeLimitHit(job_id, job.queue, holder, buried))
        for job_id in itertools.chain(self._expiry_deadlines.expire(now), self._own_ttl_deadlines.expire(now)):
            self._forget(self._jobs[job_id])
        for name in self._rate_deadlines.expire(now):  # a rate-limited queue may deliver again
            if name in self._queues:
                self._ready[name] = None
        for session_id in self._session_deadlines.expire(now):
            session = self._sessions[session_id]
            alive_until = session.last_seen + self.session_timeout
            if alive_until > now:
                self._session_deadlines.add(session_id, alive_until)
            else:
                self.close_session(session_id, now)
                self._outbox.notices.append(SessionExpired(session_id))

    def flush(self, now: float) -> list[Effect]:
        """Dispatch pending jobs to waiting workers; return every effect since the last flush."""
        if self._ready:
            self._dispatch(now)
        if now - self._last_rate_sample >= _RATE_SAMPLE_EVERY:
            self._sample_rates(now)
        if now - self._last_queue_sweep >= QUEUE_SWEEP_EVERY:
            self.free_unused_queues(now)
        outbox = self._outbox
        if not (outbox.deliveries or outbox.results or outbox.progress or outbox.revoked or outbox.notices):
            return []
        self._outbox = _Outbox()
        effects: list[Effect] = list(outbox.notices)
        effects.extend(Revoke(s, items) for s, items in outbox.revoked.items())
        effects.extend(Deliver(s, jobs) for s, jobs in outbox.deliveries.items())
        effects.extend(ProgressReady(s, items) for s, items in outbox.progress.items())
        effects.extend(ResultsReady(s, items) for s, items in outbox.results.items())
        return effects

    # --- durability -------------------------------------------------------------------

    @property
    def next_job_id(self) -> int:
        return self._next_job_id

    @property
    def next_token(self) -> int:
        """The lease token the next delivery gets."""
        return self._next_token

    def stored(self, next_job_id: int) -> None:
        """The store has committed every job with an id below `next_job_id` (the value of
        next_job_id when its changes were taken): those jobs may now be delivered, in the order
        they were created, at the next flush()."""
        if next_job_id <= self._stored_below:
            return
        self._stored_below = next_job_id
        waiting: list[Job] = []
        for job in self._unstored:
            if job.id >= next_job_id:
                waiting.append(job)
            elif job.state is JobState.PENDING:  # not cancelled meanwhile
                queue = self._queues[job.queue]
                queue.push(job)
                queue.pending_count -= 1  # counted when it was created
                self._ready[job.queue] = None
        self._unstored = waiting

    def changed(self, job_id: int) -> bool:
        """Whether the job has changes not yet taken by take_changes()."""
        changes = self._changes
        return job_id in changes.created or job_id in changes.updated

    def take_changes(self) -> Changes:
        """Jobs created, changed and forgotten since the last call (requires track_changes)."""
        changes, self._changes = self._changes, Changes()
        return changes

    def restore(self, jobs: Iterable[Job], next_job_id: int, now: float, *, next_token: int = 1) -> None:
        """Load jobs recovered from storage into an empty scheduler; lease tokens count from
        `next_token` (above any handed out before the restart). Leases are not stored, so
        a job leased when the broker stopped comes back as its last write left it, pending; a
        job stored as leased (a store that records leases) comes back pending with its attempt
        counted, or dead if that was its last. Jobs must come in id order so that FIFO order
        survives."""
        if self._jobs:
            raise InvalidRequest("restore() needs an empty scheduler")
        finished: list[Job] = []
        waiting: list[Job] = []
        for job in jobs:
            self._jobs[job.id] = job
            queue = self._queues.get(job.queue)
            if queue is None:
                queue = self._queues[job.queue] = _Queue(job.queue, now)
            if job.key is not None:
                self._keys[(job.owner, job.queue, job.key)] = job.id
            if job.state is JobState.LEASED:
                job.worker = None
                job.started_at = now  # stored leased: its attempt was counted
                queue.leased_count += 1  # _lose_lease takes it off again
                self._lose_lease(job, now, "broker restarted")
            elif job.state is JobState.PENDING:
                queue.push(job)
            elif job.state is JobState.DELAYED:
                queue.delayed_count += 1
                self._due_deadlines.add(job.id, job.not_before)
            elif job.state is JobState.DEAD:
                queue.dead[job.id] = job
            elif job.state is JobState.WAITING:
                queue.waiting_count += 1
                waiting.append(job)
            else:  # done or cancelled: kept for the rest of the result TTL
                queue.finished_count += 1
                finished.append(job)
            self._ready[job.queue] = None
        for job in sorted(finished, key=lambda job: job.expires_at):
            self._keep_until(job, job.expires_at)
        self._next_job_id = max(self._next_job_id, next_job_id)
        self._stored_below = self._next_job_id
        self._next_token = max(self._next_token, next_token)
        for job in waiting:  # once every job is back: what each still waits for
            parents = [self._jobs.get(parent_id) for parent_id in job.parents or ()]
            # A job it waited for that is gone ended and expired; its result was stored with
            # this job when it ended.
            job.waiting_on = 0
            self._wait_for(job, [p for p in parents if p is not None], job.run_anyway, now, restored=True)
        self._outbox = _Outbox()  # restoring is not news to anyone

    # --- internals --------------------------------------------------------------------

    def _forget(self, job: Job) -> None:
        del self._jobs[job.id]
        if job.state is JobState.DONE or job.state is JobState.CANCELLED:
            self._queues[job.queue].finished_count -= 1
        if job.key is not None:
            self._keys.pop((job.owner, job.queue, job.key), None)
        if self.track_changes:
            self._changes.forget(job.id)

    def _visible(self, job_id: int, owner: str | None) -> Job | None:
        """The job, if it exists and `owner` may see it (None: anyone may, as admins do)."""
        job = self._jobs.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def _check_batch(self, size: int) -> None:
        if size > self.config.max_batch:
            raise LimitExceeded(f"{size} items in one request; the limit is {self.config.max_batch}")

    def _new_queue(self, name: str, now: float) -> _Queue:
        if len(self._queues) >= self.config.max_queues and now - self._last_limit_sweep >= _QUEUE_SWEEP_AT_LIMIT_EVERY:
            self._last_limit_sweep = now
            self.free_unused_queues(now)
        if len(self._queues) >= self.config.max_queues:
            raise LimitExceeded(f"the broker holds {len(self._queues)} queues, its limit; {name!r} is not created")
        queue = self._queues[name] = _Queue(name, now)
        return queue

    def free_unused_queues(self, now: float) -> list[str]:
        """Forget the queues that hold no job (pending, delayed, leased, dead, or finished and
        kept for the result TTL) and that no worker names: they no longer count against
        max_queues, and leave stats and metrics (their counters start from 0 if they come
        back). flush() calls it every QUEUE_SWEEP_EVERY seconds, and a new queue at the limit
        calls it (at most once a second). Returns the names freed."""
        self._last_queue_sweep = now
        named = {name for session in self._sessions.values() for name in session.queues}
        unused = [name for name, queue in self._queues.items() if queue.idle and name not in named]
        for name in unused:
            del self._queues[name]
            self._ready.pop(name, None)
        return unused

    def _move(self, job: Job, event: JobEvent) -> None:
        transition(job, event)
        if self.track_changes and job.id not in self._changes.created:
            self._changes.updated[job.id] = job

    def _dispatch(self, now: float) -> None:
        if self.draining:
            return  # _ready keeps the queues with work for when deliveries resume
        ready, self._ready = self._ready, {}
        deliveries = self._outbox.deliveries
        for name in ready:
            queue = self._queues[name]
            waiters = queue.waiters
            controls = queue.controls
            allowed = None if controls is None else controls.allowance(queue.leased_count, now)
            while queue.pending_count and waiters and allowed != 0:
                session = waiters.popleft()
                if session.closed or session.credit <= 0:
                    session.waiting.discard(name)
                    continue
                job = queue.pop()
                if job is None:  # only cancelled jobs were left
                    waiters.appendleft(session)
                    break
                # Not a change for the store: a lease lives in memory only. After a crash the
                # job is pending again on disk and goes out anew, this attempt uncounted. The
                # attempt counts when the worker starts the job (started()), not here.
                transition(job, JobEvent.DELIVER)
                job.delivered_at = now
                job.started_at = None
                job.token = self._next_token
                self._next_token += 1
                job.worker = session.id
                session.leased[job.id] = job
                queue.leased_count += 1
                batch = deliveries.get(session.id)
                if batch is None:
                    batch = deliveries[session.id] = []
                batch.append(
                    _new_row(
                        DeliveryRow,
                        (
                            job.id,
                            job.token,
                            name,
                            job.payload,
                            job.attempts + 1,
                            job.lease_seconds,
                            job.timeout,
                            job.parent_results,
                        ),
                    )
                )
                if session.credit > 0:
                    waiters.append(session)
                else:
                    session.waiting.discard(name)
                if allowed is not None:
                    allowed -= 1
                    assert controls is not None
                    controls.spend()
            if controls is not None and queue.pending_count:
                token_at = controls.next_token_at(now)  # a concurrency limit waits for a lease to end
                if token_at is not None:
                    self._rate_deadlines.add(name, token_at)

    def _offer_credit(self, session: _Session) -> None:
        """Put a worker with free credit back in line on each of its queues."""
        if session.closed or session.credit <= 0:
            return
        for name in session.queues:
            if name not in session.waiting:
                session.waiting.add(name)
                self._queues[name].waiters.append(session)
            self._ready[name] = None

    def _start(self, job: Job, now: float) -> float:
        """The worker began the job (said so, or answered for it): count the attempt and start
        its time limit. Idempotent per delivery. Returns when it started."""
        started_at = job.started_at
        if started_at is None:
            started_at = job.started_at = now
            job.attempts += 1
            if job.timeout is not None:
                self._run_deadlines.add(job.id, now + job.timeout + self.time_limit_grace)
        return started_at

    def _revoke(self, job: Job, reason: str) -> None:
        """Tell the session holding `job` that it holds it no more (it may still be running it)."""
        if job.worker is not None and job.worker in self._sessions:
            self._outbox.revoked.setdefault(job.worker, []).append([job.id, job.token, reason])

    def _failed(self, job: Job, now: float, *, final: bool = False, retry_delay: float | None = None) -> bool:
        """An attempt failed (job.error says how): retry after a backoff (or `retry_delay`), or
        bury the job if it was its last attempt or the failure is final. Returns True if buried."""
        self._queues[job.queue].failed += 1
        if final or job.attempts >= job.max_attempts:
            self._bury(job, now)
            return True
        self._retry(job, now, retry_delay)
        return False

    def _end_lease(self, job: Job) -> None:
        """The worker is done with the job (completed, failed, handed back, or taken from it)."""
        self._run_deadlines.cancel(job.id)
        queue = self._queues[job.queue]
        queue.leased_count -= 1
        if queue.controls is not None:  # under a concurrency limit another job may go now
            self._ready[job.queue] = None
        session = self._sessions.get(job.worker) if job.worker is not None else None
        job.worker = None
        if session is not None:
            del session.leased[job.id]
            self._offer_credit(session)

    def _lose_lease(self, job: Job, now: float, reason: str) -> bool:
        """The lease ended without an answer (the worker's session ended). Requeue at the
        front, or bury when the job has used every attempt (so a job that kills its workers
        cannot loop forever). A job that had not started uses no attempt, unless jobs like it
        keep dying with their workers before they can say they started: after max_attempts
        such losses they count too. Returns True if buried."""
        self._run_deadlines.cancel(job.id)
        self._queues[job.queue].leased_count -= 1
        if self._queues[job.queue].controls is not None:  # room under a concurrency limit
            self._ready[job.queue] = None
        job.worker = None
        counted = job.started_at is not None
        if not counted:
            job.unstarted_losses += 1
            if job.unstarted_losses > job.max_attempts:
                job.attempts += 1
                counted = True
        if counted and job.attempts >= job.max_attempts:
            job.error = _error("LeaseLost", f"{reason} on attempt {job.attempts} of {job.max_attempts}")
            self._bury(job, now)
            return True
        self._move(job, JobEvent.REQUEUE)
        self._queues[job.queue].push(job, front=True)
        self._queues[job.queue].requeued += 1
        self._ready[job.queue] = None
        return False

    def _retry(self, job: Job, now: float, delay: float | None = None) -> None:
        self._move(job, JobEvent.RETRY)
        if delay is None:
            cap = self.config.max_backoff if job.max_backoff is None else job.max_backoff
            delay = min(job.backoff * 2 ** (job.attempts - 1), cap)
        self._queues[job.queue].delayed_count += 1
        job.not_before = now + delay
        self._due_deadlines.add(job.id, job.not_before)

    def _bury(self, job: Job, now: float) -> None:
        self._move(job, JobEvent.BURY)
        self._queues[job.queue].dead[job.id] = job
        self._queues[job.queue].buried += 1
        error = job.error or {"type": "Unknown", "message": ""}
        self._outbox.notices.append(JobBuried(job.id, job.queue, error))
        self._notify_watchers(job)
        if job.id in self._dependents:
            self._settle_dependents(job, now)

    def _finish(self, job: Job, now: float, *, cascade: bool = True) -> None:
        """A job reached DONE or CANCELLED: tell its watchers, keep it for the result TTL, and
        (with cascade) settle the jobs that wait for it."""
        if job.state is JobState.DONE:
            job.payload = None  # finished jobs are kept for their result only: free the rest
        self._notify_watchers(job)
        self._queues[job.queue].finished_count += 1
        self._keep_until(job, now + (self.config.result_ttl if job.result_ttl is None else job.result_ttl))
        if cascade and job.id in self._dependents:
            self._settle_dependents(job, now)

    def _keep_until(self, job: Job, expires_at: float) -> None:
        """Forget a finished job at `expires_at`. Default TTLs come in time order (a cheap
        FIFO); a job's own TTL goes to a heap."""
        job.expires_at = expires_at
        if job.result_ttl is None:
            self._expiry_deadlines.add(job.id, expires_at)
        else:
            self._own_ttl_deadlines.add(job.id, expires_at)

    def _notify_watchers(self, job: Job) -> None:
        if not job.watchers:
            return
        outcome = _outcome(job)
        results = self._outbox.results
        for session_id in job.watchers:
            if session_id in self._sessions:
                results.setdefault(session_id, []).append(outcome)
        job.watchers = None

    def _note_rates(self, now: float) -> None:
        """Called before the counts behind the rates change: if the last sample is stale, take
        one now, so that the counts before a burst are known however long the queue was idle."""
        if now - self._last_rate_sample >= _RATE_SAMPLE_EVERY:
            self._sample_rates(now)

    def _sample_rates(self, now: float) -> None:
        self._last_rate_sample = now
        window_start = now - _RATE_WINDOW
        for queue in self._queues.values():
            samples = queue.rate_samples
            samples.append((now, queue.submitted, queue.completed))
            # Keep the newest sample at or before the window's start: the counts then.
            while len(samples) > 1 and samples[1][0] <= window_start:
                samples.popleft()


def check_queue_name(name: str) -> None:
    """Raises InvalidRequest for a name that is not a queue's (1 to 200 of A-Z a-z 0-9 . _ : / @ -)."""
    if len(name) > MAX_QUEUE_NAME or not _QUEUE_NAME.match(name):
        raise InvalidRequest(
            f"a queue name has 1 to {MAX_QUEUE_NAME} of A-Z a-z 0-9 . _ : / @ - (starting with a letter or digit), "
            f"not {name[:50]!r}"
        )


MAX_RETRY_DELAY = 86400.0 * 7  # a retry asked for by the handler comes within a week


def _error(error_type: str, message: str, traceback: str | None = None) -> dict[str, str]:
    """A failure as stored and reported: type, message and, when the worker sent one, the
    formatted traceback, each bounded (a cut says so)."""
    error = {"type": bounded(error_type, MAX_ERROR_TYPE), "message": bounded(message, MAX_ERROR_MESSAGE)}
    if traceback:
        error["traceback"] = bounded(traceback, MAX_TRACEBACK, keep_end=True)
    return error


# A row made from a tuple in C: a NamedTuple's own __new__ is a Python function, which costs
# each delivery and result about 0.5 µs more.
_new_row: Any = tuple.__new__


def _outcome(job: Job) -> ResultRow:
    if job.state is JobState.DONE:
        return _new_row(ResultRow, (job.id, Outcome.DONE, job.result, None))
    if job.state is JobState.DEAD:
        return ResultRow(job.id, Outcome.DEAD, None, job.error)
    return ResultRow(job.id, Outcome.CANCELLED)


def _shown_leases(session: _Session) -> list[Job]:
    """The leases worth showing of a worker that may hold thousands: those reporting progress,
    then the longest running."""
    return heapq.nsmallest(
        WORKER_JOBS_SHOWN,
        session.leased.values(),
        key=lambda j: (j.started_at is None, j.progress is None, j.started_at or j.delivered_at),
    )


def _running(job: Job, now: float) -> dict[str, Any]:
    return {
        "id": job.id,
        "queue": job.queue,
        "attempts": job.attempts,
        "started": job.started_at is not None,  # else waiting in the worker's prefetch buffer
        "running_seconds": 0.0 if job.started_at is None else round(now - job.started_at, 3),
        "progress": _progress(job),
    }


def _progress(job: Job) -> dict[str, Any] | None:
    return None if job.progress is None else {"fraction": job.progress[0], "message": job.progress[1]}


MAX_LISTED = 1000  # jobs in one page of job_list
# What a schedule may set on the jobs it submits.
_SCHEDULE_OPTIONS = frozenset({"priority", "max_attempts", "backoff", "timeout", "result_ttl", "max_backoff"})
_NO_CONTROLS = QueueControls()
_LISTED_STATES = {
    "pending": JobState.PENDING,
    "waiting": JobState.WAITING,
    "delayed": JobState.DELAYED,
    "running": JobState.LEASED,
    "dead": JobState.DEAD,
}


def _summary(job: Job) -> dict[str, Any]:
    """A job in a listing: what tells it apart, not its payload."""
    return {
        "id": job.id,
        "state": str(job.state),
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "started": job.state is JobState.LEASED and job.started_at is not None,
        "error": None if job.error is None else {"type": job.error["type"], "message": job.error["message"]},
        "key": job.key,
    }


def _describe(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "queue": job.queue,
        "state": str(job.state),
        "priority": job.priority,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "lease": job.lease_seconds,
        "timeout": job.timeout,
        "result_ttl": job.result_ttl,
        "max_backoff": job.max_backoff,
        "after": job.parents,
        "waiting_on": job.waiting_on if job.state is JobState.WAITING else 0,
        "started": job.state is JobState.LEASED and job.started_at is not None,
        "payload": job.payload,  # opaque bytes, as submitted
        "result": job.result,
        "error": job.error,
        "progress": _progress(job),
        "worker": job.worker,
        "key": job.key,
    }
