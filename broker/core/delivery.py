"""Delivery: pending jobs to the workers waiting on their queues, and the rows that carry a
job out (a delivery, an outcome). Runs once per loop turn from Scheduler.flush(), for every
queue that may have work: highest priority first, FIFO within a priority, round robin across
the workers that wait on a queue, within the queue's concurrency and rate controls
(docs/protocol.md, "Jobs"). Pure: `now` passed in.
"""

from __future__ import annotations

from typing import Any

from jobbroker.broker.core.jobs import Job, JobEvent, JobState
from jobbroker.broker.core.lifecycle import Lifecycle
from jobbroker.broker.protocol.rows import DeliveryRow, Outcome, ResultRow

__all__ = ["dispatch", "outcome"]

_DONE = JobState.DONE
_DEAD = JobState.DEAD
_ON_DELIVER = JobEvent.DELIVER

# A row made from a tuple in C: a NamedTuple's own __new__ is a Python function, which costs
# each delivery and result about 0.5 µs more.
_new_row: Any = tuple.__new__


def dispatch(lifecycle: Lifecycle, deliveries: dict[int, list[DeliveryRow]], next_token: int, now: float) -> int:
    """Lease the pending jobs of the queues in `lifecycle.ready` to their waiting workers,
    adding a row per delivery to `deliveries` (session id -> rows). Lease tokens count from
    `next_token`; returns the next one."""
    ready, lifecycle.ready = lifecycle.ready, {}
    queues = lifecycle.queues
    move = lifecycle.move
    for name in ready:
        queue = queues[name]
        waiters = queue.waiters
        controls = queue.controls
        allowed = None if controls is None else controls.allowance(queue.leased_count, now)
        while queue.pending_count and waiters and allowed != 0:
            session = waiters.popleft()
            if session.closed or len(session.leased) >= session.prefetch:  # no credit left
                session.waiting.discard(name)
                continue
            job = queue.pop()
            if job is None:  # only cancelled jobs (or jobs not yet stored) were left
                waiters.appendleft(session)
                break
            # The attempt counts when the worker starts the job (started()), not here.
            job.delivered_at = now
            job.started_at = None
            job.token = next_token
            next_token += 1
            job.worker = session.id
            move(job, _ON_DELIVER, now)
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
            if len(session.leased) < session.prefetch:  # credit left
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
                lifecycle.rate_deadlines.add(name, token_at)
    return next_token


def outcome(job: Job) -> ResultRow:
    """The row that tells a watcher how a finished job ended."""
    if job.state is _DONE:
        return _new_row(ResultRow, (job.id, Outcome.DONE, job.result, None))
    if job.state is _DEAD:
        return ResultRow(job.id, Outcome.DEAD, None, job.error)
    return ResultRow(job.id, Outcome.CANCELLED)
