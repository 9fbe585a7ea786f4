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

The rooms around this one: lifecycle.py (the books: job states change in one place,
Lifecycle.move(), which keeps every per-state record and deadline in step with the lifecycle
table of jobs.py), dependencies.py (jobs that run after others), delivery.py (pending jobs to
waiting workers, at each flush), effects.py (what flush() returns), records.py (queue and
session records), limits.py (defaults, limits and request checks), reports.py (read-only
views), changes.py (what a durable store must write). This one decides what happens to a job.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from jobbroker.broker.core import reports
from jobbroker.broker.core.changes import Changes
from jobbroker.broker.core.controls import QueueControls
from jobbroker.broker.core.deadlines import Deadlines
from jobbroker.broker.core.delivery import dispatch, outcome
from jobbroker.broker.core.dependencies import Dependencies
from jobbroker.broker.core.effects import (
    Deliver,
    Effect,
    JobBuried,
    Outbox,
    ProgressReady,
    ResultsReady,
    Revoke,
    SessionExpired,
    TimeLimitHit,
    WorkerLost,
)
from jobbroker.broker.core.jobs import FINAL_STATES, Job, JobEvent, JobState
from jobbroker.broker.core.lifecycle import HEARTBEATS_MISSED_BEFORE_DEAD, Lifecycle
from jobbroker.broker.core.limits import (
    MAX_PROGRESS_MESSAGE,
    SchedulerConfig,
    check_batch,
    check_controls,
    check_keys,
    check_queue_name,
    check_submit,
    failure,
    retry_delay,
)
from jobbroker.broker.core.records import RATE_SAMPLE_EVERY, Queue, RunTimes, Session
from jobbroker.broker.core.reports import WORKER_JOBS_SHOWN
from jobbroker.broker.core.schedules import Schedule, Schedules
from jobbroker.broker.errors import InvalidRequest, InvalidState, JobNotFound, LeaseLost, LimitExceeded, QueueFull
from jobbroker.broker.protocol.rows import Outcome, ResultRow

__all__ = [
    "WORKER_JOBS_SHOWN",
    "Changes",
    "Deliver",
    "Effect",
    "JobBuried",
    "ProgressReady",
    "ResultsReady",
    "Revoke",
    "RunTimes",
    "Scheduler",
    "SchedulerConfig",
    "SessionExpired",
    "TimeLimitHit",
    "WorkerLost",
    "check_queue_name",
]

# Seconds between sweeps that free the queues nobody uses (no jobs, no workers naming them);
# a queue at the limit is also swept for, at most once a second.
QUEUE_SWEEP_EVERY = 60.0
_QUEUE_SWEEP_AT_LIMIT_EVERY = 1.0
# What a schedule may set on the jobs it submits.
_SCHEDULE_OPTIONS = frozenset({"priority", "max_attempts", "backoff", "timeout", "result_ttl", "max_backoff"})
# States and events as module constants: in the hot path, an Enum attribute costs about
# 100 ns a look-up (Python 3.11), a global a few.
_WAITING = JobState.WAITING
_PENDING = JobState.PENDING
_DELAYED = JobState.DELAYED
_LEASED = JobState.LEASED
_DONE = JobState.DONE
_DEAD = JobState.DEAD
_ON_DUE = JobEvent.DUE
_ON_COMPLETE = JobEvent.COMPLETE
_ON_RETRY = JobEvent.RETRY
_ON_BURY = JobEvent.BURY
_ON_REQUEUE = JobEvent.REQUEUE
_ON_CANCEL = JobEvent.CANCEL
_ON_REVIVE = JobEvent.REVIVE


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
        # The rooms: the books of every job's state (lifecycle.py) and the jobs that run after
        # others (dependencies.py); delivery.py's dispatch() runs at each flush.
        lifecycle = self._lifecycle = Lifecycle(self.config, track_changes=track_changes)
        self._dependencies = Dependencies(lifecycle, self._finish)
        # The mappings are shared, never replaced; the rooms' methods are bound once here
        # (one call per job on the hot path, as when they were methods of this class).
        self._jobs, self._queues, self._sessions = lifecycle.jobs, lifecycle.queues, lifecycle.sessions
        self._keys = lifecycle.keys
        self._move, self._enter, self._forget = lifecycle.move, lifecycle.enter, lifecycle.forget
        self._start, self._offer_credit = lifecycle.start, lifecycle.offer_credit
        self._wait_for, self._settle_dependents = self._dependencies.wait_for, self._dependencies.settle
        self._cancel_dependent = self._dependencies.cancel
        self._next_job_id = 1
        self._next_token = 1
        self.schedules = Schedules()
        self._session_deadlines: Deadlines[int] = Deadlines()  # session id
        self._outbox = Outbox()
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
        return self._lifecycle.time_limit_grace

    def open_session(self, session_id: int, now: float, *, name: str = "", peer: str = "") -> None:
        if session_id in self._sessions:
            raise InvalidRequest(f"session {session_id} is already open")
        self._sessions[session_id] = Session(session_id, name, peer, now)
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
        # The session is no longer in _sessions, so _move leaves its lease table alone.
        for job in list(session.leased.values()):
            if self._lose_lease(job, now, "worker lost"):
                buried.append(job.id)
            else:
                requeued.append(job.id)
        session.leased.clear()
        self._outbox.notices.append(WorkerLost(session_id, session.name, requeued, buried))

    def _session(self, session_id: int) -> Session:
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
        check_batch(config, len(payloads))
        max_attempts, lease, backoff = check_submit(
            config,
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            lease=lease,
            backoff=backoff,
            timeout=timeout,
            result_ttl=result_ttl,
            max_backoff=max_backoff,
            after=after,
        )
        parents: list[Job] = []
        for parent_id in after or ():
            parent = self._visible(parent_id, owner)
            if parent is None:  # only existing jobs: no cycle can ever form
                raise InvalidRequest(f"job {parent_id}, to run after, is unknown (or expired)")
            parents.append(parent)
        if keys is not None:
            check_keys(keys, len(payloads))
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

        state = _WAITING if parents else _DELAYED if delay > 0 else _PENDING
        jobs, track, changes = self._jobs, self.track_changes, self._lifecycle.changes
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
            if state is _DELAYED:
                job.not_before = now + delay
            self._next_job_id += 1
            jobs[job.id] = job
            if track:
                changes.create(job)
            if key is not None:
                self._keys[(owner, queue_name, key)] = job.id
            if watcher is not None:
                job.watchers = [watcher]
            self._enter(job, queue, now)
            if state is _WAITING:
                self._wait_for(job, parents, run_anyway, now)
            ids.append(job.id)
            created += 1
        queue.submitted += created
        return ids

    def cancel(self, job_ids: Sequence[int], now: float, owner: str | None = None) -> list[str | None]:
        """Cancel pending, delayed or running jobs (an owner: only its own); the worker running
        one is told (Revoke) and its answer will be refused. Per job: None, or an error code."""
        check_batch(self.config, len(job_ids))
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
        if job.state is _LEASED:
            self._revoke(job, "cancelled")
        self._move(job, _ON_CANCEL, now)
        self._finish(job, now)

    def watch(self, session_id: int, job_ids: Sequence[int], owner: str | None = None) -> None:
        """Ask for the outcome of jobs; each arrives in a ResultsReady effect, at once if the
        job has already finished. An owner sees only its own jobs: others are "unknown"."""
        session = self._session(session_id)
        check_batch(self.config, len(job_ids))
        for job_id in job_ids:
            self._watch_one(session.id, job_id, owner)

    def _watch_one(self, session_id: int, job_id: int, owner: str | None) -> None:
        job = self._visible(job_id, owner)
        if job is None:
            self._outbox.results.setdefault(session_id, []).append(ResultRow(job_id, Outcome.UNKNOWN))
        elif job.state in FINAL_STATES:
            self._outbox.results.setdefault(session_id, []).append(outcome(job))
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
        check_batch(self.config, len(queue_names))
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
            job.result = result
            queue = self._queues[job.queue]
            queue.completed += 1
            queue.run_times.observe(now - started_at)
            self._move(job, _ON_COMPLETE, now)
            self._finish(job, now)
        return codes

    def fail(self, session_id: int, items: Iterable[Sequence[Any]], now: float) -> list[str | None]:
        """Fail leased jobs: items of (job_id, token, error type, error message[, traceback
        [, final[, retry delay]]]). A job with attempts left is retried after its exponential
        backoff (or after the retry delay given), else buried; a final failure is buried at once."""
        codes: list[str | None] = []
        for job, item in self._fenced(session_id, items, codes):
            self._start(job, now)
            size = len(item)
            job.error = failure(item[2], item[3], item[4] if size > 4 else None)
            final = size > 5 and bool(item[5])
            self._failed(job, now, final=final, retry_delay=retry_delay(item[6] if size > 6 else None))
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
            job.progress = (fraction, message[:MAX_PROGRESS_MESSAGE])
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
            self._move(job, _ON_REQUEUE, now)
        return codes

    def _fenced(
        self, session_id: int, items: Iterable[Sequence[Any]], codes: list[str | None]
    ) -> Iterator[tuple[Job, Sequence[Any]]]:
        """The items (job_id, token, ...) whose job this session holds under that token: the
        fence against stale answers. Appends each item's code to `codes`, in order: None, or
        why it was refused."""
        if isinstance(items, Sequence):
            check_batch(self.config, len(items))
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
        if job.state is not _LEASED or job.token != token or job.worker != session_id:
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
        return reports.describe(job, self._sessions)

    def job_list(
        self, queue_name: str, state: str, *, after: int = 0, limit: int = 100, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """A page of a queue's jobs in one state ("pending", "waiting", "delayed", "running" or
        "dead"), by id, those after `after`; without payloads (job_info has them). An owner sees
        its own jobs only.

        Raises:
            InvalidRequest: an unknown state or a limit outside 1..1000.
        """
        return reports.job_list(
            self._queues.get(queue_name),
            state,
            jobs=self._jobs.values(),
            sessions=self._sessions.values(),
            unstored=self._lifecycle.unstored,
            after=after,
            limit=limit,
            owner=owner,
        )

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
        check_controls(concurrency, rate)
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
            self._lifecycle.changes.controls[queue_name] = queue.controls
        self._lifecycle.ready[queue_name] = None  # resumed, or a limit raised: deliver what may go
        return controls.settings()

    def restore_controls(self, controls: dict[str, QueueControls], now: float) -> None:
        """Queue controls recovered from storage (after restore())."""
        for name, settings in controls.items():
            queue = self._queues.get(name) or self._new_queue(name, now)
            settings.tokens, settings.refilled_at = 1.0, now
            queue.controls = settings if settings.configured else None
            self._lifecycle.ready[name] = None

    def purge_queue(self, queue_name: str, now: float) -> list[int]:
        """Cancel every pending, delayed and waiting job of a queue (running and dead ones stay).
        Returns the ids cancelled."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        fifos = (job for fifo in queue.pending.values() for job in fifo)
        unstored = (job for job in self._lifecycle.unstored if job.queue == queue_name)
        waiting = [job for job in itertools.chain(fifos, unstored) if job.state is _PENDING]
        if queue.delayed_count or queue.waiting_count:
            later = (_DELAYED, _WAITING)
            waiting += [j for j in self._jobs.values() if j.queue == queue_name and j.state in later]
        for job in waiting:
            if job.state not in FINAL_STATES:  # else cancelled already, with a job it waited for
                self._cancel(job, now)
        return [job.id for job in waiting]

    def dead_list(self, queue_name: str, limit: int = 100) -> list[dict[str, Any]]:
        """The oldest `limit` jobs of a queue's dead-letter list, in full."""
        return reports.dead_list(self._queues.get(queue_name), limit)

    def dead_requeue(self, queue_name: str, job_ids: Sequence[int] | None, now: float) -> list[int]:
        """Move dead jobs (all of the queue's, or those named) back to pending with fresh
        attempts. Returns the ids moved."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        chosen = list(queue.dead) if job_ids is None else [i for i in job_ids if i in queue.dead]
        for job_id in chosen:
            job = queue.dead[job_id]
            job.attempts = 0
            self._move(job, _ON_REVIVE, now)
        return chosen

    def dead_purge(self, queue_name: str, job_ids: Sequence[int] | None) -> list[int]:
        """Forget dead jobs (all of the queue's, or those named). Returns the ids forgotten."""
        queue = self._queues.get(queue_name)
        if queue is None:
            return []
        chosen = list(queue.dead) if job_ids is None else [i for i in job_ids if i in queue.dead]
        for job_id in chosen:
            self._forget(queue.dead[job_id])
        return chosen

    def metrics(self) -> dict[str, Any]:
        """Counts for metrics: per queue gauges (pending, delayed, in_flight, dead), totals
        since start (submitted, completed, failed, buried, requeued) and run times; workers and
        sessions connected."""
        return reports.metrics(self._queues, self._sessions.values())

    def stats(self, now: float) -> dict[str, Any]:
        """Counts and rates per queue; workers with their leases and last heartbeat. Exact
        values: a display rounds them."""
        self._sample_rates(now)
        return reports.stats(self._queues, self._sessions.values(), len(self._jobs), self.draining, now)

    def drain(self, on: bool = True) -> int:
        """Stop delivering jobs (or, with on=False, start again); jobs already leased run to
        their end. Returns how many are leased now."""
        self.draining = on
        return self.in_flight

    @property
    def in_flight(self) -> int:
        return sum(queue.leased_count for queue in self._queues.values())

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
            self._lifecycle.changes.schedules[name] = None if schedule is None else schedule.record()

    # --- time -------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When tick() next has work, or None."""
        books = self._lifecycle
        candidates = [
            d
            for d in (
                books.run_deadlines.next_deadline(),
                books.due_deadlines.next_deadline(),
                books.expiry_deadlines.next_deadline(),
                books.own_ttl_deadlines.next_deadline(),
                self._session_deadlines.next_deadline(),
                books.rate_deadlines.next_deadline(),
            )
            if d is not None
        ]
        return min(candidates) if candidates else None

    def tick(self, now: float) -> None:
        """Act on every deadline at or before `now`."""
        jobs = self._jobs
        for job_id in self._lifecycle.due_deadlines.expire(now):
            self._move(jobs[job_id], _ON_DUE, now)
        for job_id in self._lifecycle.run_deadlines.expire(now):
            job = jobs[job_id]
            holder = job.worker
            self._revoke(job, "time limit")
            job.error = failure(
                "TimeLimitExceeded",
                f"attempt {job.attempts} ran over its time limit of {job.timeout:g} s and was taken back by the broker",
            )
            buried = self._failed(job, now)
            self._outbox.notices.append(TimeLimitHit(job_id, job.queue, holder, buried))
        books = self._lifecycle
        for job_id in itertools.chain(books.expiry_deadlines.expire(now), books.own_ttl_deadlines.expire(now)):
            self._forget(jobs[job_id])
        for name in self._lifecycle.rate_deadlines.expire(now):  # a rate-limited queue may deliver again
            if name in self._queues:
                self._lifecycle.ready[name] = None
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
        if self._lifecycle.ready and not self.draining:  # draining: `ready` keeps them for later
            self._next_token = dispatch(self._lifecycle, self._outbox.deliveries, self._next_token, now)
        if now - self._last_rate_sample >= RATE_SAMPLE_EVERY:
            self._sample_rates(now)
        if now - self._last_queue_sweep >= QUEUE_SWEEP_EVERY:
            self.free_unused_queues(now)
        outbox = self._outbox
        if not outbox:
            return []
        self._outbox = Outbox()
        return outbox.effects()

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
            self._lifecycle.ready.pop(name, None)
        return unused

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
        self._lifecycle.stored(next_job_id)

    def changed(self, job_id: int) -> bool:
        """Whether the job has changes not yet taken by take_changes()."""
        return job_id in self._lifecycle.changes

    def take_changes(self) -> Changes:
        """Jobs created, changed and forgotten since the last call (requires track_changes)."""
        return self._lifecycle.take_changes()

    def restore(self, jobs: Iterable[Job], next_job_id: int, now: float, *, next_token: int = 1) -> None:
        """Load jobs recovered from storage into an empty scheduler; lease tokens count from
        `next_token` (above any handed out before the restart). Leases are not stored, so
        a job leased when the broker stopped comes back as its last write left it, pending; a
        job stored as leased (a store that records leases) comes back pending with its attempt
        counted, or dead if that was its last. Jobs must come in id order so that FIFO order
        survives."""
        if self._jobs:
            raise InvalidRequest("restore() needs an empty scheduler")
        # Every job restored is stored: none waits for a commit before it is delivered.
        self._next_job_id = max(self._next_job_id, next_job_id)
        self._lifecycle.stored_below = self._next_job_id
        self._next_token = max(self._next_token, next_token)
        finished: list[Job] = []
        waiting: list[Job] = []
        for job in jobs:
            self._jobs[job.id] = job
            queue = self._queues.get(job.queue)
            if queue is None:
                queue = self._queues[job.queue] = Queue(job.queue, now)
            if job.key is not None:
                self._keys[(job.owner, job.queue, job.key)] = job.id
            self._lifecycle.ready[job.queue] = None
            if job.state in FINAL_STATES and job.state is not _DEAD:
                finished.append(job)  # kept for the rest of the result TTL: entered in expiry order
                continue
            if job.state is _LEASED:
                job.worker = None
                job.started_at = now  # stored leased: its attempt was counted
            self._enter(job, queue, now)
            if job.state is _LEASED:
                self._lose_lease(job, now, "broker restarted")
            elif job.state is _WAITING:
                waiting.append(job)
        for job in sorted(finished, key=lambda job: job.expires_at):
            self._enter(job, self._queues[job.queue], now, restored=True)
        for job in waiting:  # once every job is back: what each still waits for
            parents = [self._jobs.get(parent_id) for parent_id in job.parents or ()]
            # A job it waited for that is gone ended and expired; its result was stored with
            # this job when it ended.
            job.waiting_on = 0
            self._wait_for(job, [p for p in parents if p is not None], job.run_anyway, now, restored=True)
        self._outbox = Outbox()  # restoring is not news to anyone

    # --- the lifecycle: every change of state, and what follows from it --------------------

    def _failed(self, job: Job, now: float, *, final: bool = False, retry_delay: float | None = None) -> bool:
        """An attempt failed (job.error says how): retry after a backoff (or `retry_delay`), or
        bury the job if it was its last attempt or the failure is final. Returns True if buried."""
        self._queues[job.queue].failed += 1
        if final or job.attempts >= job.max_attempts:
            self._bury(job, now)
            return True
        if retry_delay is None:
            cap = self.config.max_backoff if job.max_backoff is None else job.max_backoff
            retry_delay = min(job.backoff * 2 ** (job.attempts - 1), cap)
        job.not_before = now + retry_delay
        self._move(job, _ON_RETRY, now)
        return False

    def _lose_lease(self, job: Job, now: float, reason: str) -> bool:
        """The lease ended without an answer (the worker's session ended). Requeue at the
        front, or bury when the job has used every attempt (so a job that kills its workers
        cannot loop forever). A job that had not started uses no attempt, unless jobs like it
        keep dying with their workers before they can say they started: after max_attempts
        such losses they count too. Returns True if buried."""
        counted = job.started_at is not None
        if not counted:
            job.unstarted_losses += 1
            if job.unstarted_losses > job.max_attempts:
                job.attempts += 1
                counted = True
        if counted and job.attempts >= job.max_attempts:
            job.error = failure("LeaseLost", f"{reason} on attempt {job.attempts} of {job.max_attempts}")
            self._bury(job, now)
            return True
        self._queues[job.queue].requeued += 1
        self._move(job, _ON_REQUEUE, now)
        return False

    def _bury(self, job: Job, now: float) -> None:
        self._queues[job.queue].buried += 1
        self._move(job, _ON_BURY, now)
        error = job.error or {"type": "Unknown", "message": ""}
        self._outbox.notices.append(JobBuried(job.id, job.queue, error))
        self._notify_watchers(job)
        if job.id in self._dependencies.dependents:
            self._settle_dependents(job, now)

    def _finish(self, job: Job, now: float, *, cascade: bool = True) -> None:
        """A job reached DONE or CANCELLED: tell its watchers and (with cascade) settle the
        jobs that wait for it."""
        if job.state is _DONE:
            job.payload = None  # finished jobs are kept for their result only: free the rest
        if job.watchers:
            self._notify_watchers(job)
        if cascade and job.id in self._dependencies.dependents:
            self._settle_dependents(job, now)

    def _revoke(self, job: Job, reason: str) -> None:
        """Tell the session holding `job` that it holds it no more (it may still be running it)."""
        if job.worker is not None and job.worker in self._sessions:
            self._outbox.revoked.setdefault(job.worker, []).append([job.id, job.token, reason])

    def _notify_watchers(self, job: Job) -> None:
        if not job.watchers:
            return
        row = outcome(job)
        results = self._outbox.results
        for session_id in job.watchers:
            if session_id in self._sessions:
                results.setdefault(session_id, []).append(row)
        job.watchers = None

    # --- internals --------------------------------------------------------------------

    def _visible(self, job_id: int, owner: str | None) -> Job | None:
        """The job, if it exists and `owner` may see it (None: anyone may, as admins do)."""
        job = self._jobs.get(job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job

    def _new_queue(self, name: str, now: float) -> Queue:
        if len(self._queues) >= self.config.max_queues and now - self._last_limit_sweep >= _QUEUE_SWEEP_AT_LIMIT_EVERY:
            self._last_limit_sweep = now
            self.free_unused_queues(now)
        if len(self._queues) >= self.config.max_queues:
            raise LimitExceeded(f"the broker holds {len(self._queues)} queues, its limit; {name!r} is not created")
        queue = self._queues[name] = Queue(name, now)
        return queue

    def _note_rates(self, now: float) -> None:
        """Called before the counts behind the rates change: if the last sample is stale, take
        one now, so that the counts before a burst are known however long the queue was idle."""
        if now - self._last_rate_sample >= RATE_SAMPLE_EVERY:
            self._sample_rates(now)

    def _sample_rates(self, now: float) -> None:
        self._last_rate_sample = now
        for queue in self._queues.values():
            queue.sample(now)
