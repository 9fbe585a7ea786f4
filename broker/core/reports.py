"""Read-only reports over the scheduler's records: one job, a page of jobs, the dead-letter
list, metrics and stats. Nothing here changes state. Values are exact (seconds and rates as
floats): rounding for display is the display's business (cli.py, the dashboard)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from jobbroker.broker.core.controls import QueueControls
from jobbroker.broker.core.jobs import Job, JobState
from jobbroker.broker.core.limits import check_listing
from jobbroker.broker.core.records import Queue, Session
from jobbroker.broker.protocol.messages import unpacked

__all__ = ["LISTED_STATES", "WORKER_JOBS_SHOWN", "dead_list", "describe", "job_list", "metrics", "stats"]

WORKER_JOBS_SHOWN = 20  # running jobs listed per worker in stats (a worker may hold thousands)
# The states job_list pages through, as the wire names them.
LISTED_STATES = {
    "pending": JobState.PENDING,
    "waiting": JobState.WAITING,
    "delayed": JobState.DELAYED,
    "running": JobState.LEASED,
    "dead": JobState.DEAD,
}
_NO_CONTROLS = QueueControls()


def describe(job: Job, sessions: Mapping[int, Session]) -> dict[str, Any]:
    """Everything known of one job (job_info)."""
    session = sessions.get(job.worker) if job.worker is not None else None
    return {
        **_describe(job),
        "worker_name": None if session is None else f"{session.name or 'worker'} ({session.peer})",
    }


def job_list(
    queue: Queue | None,
    state: str,
    *,
    jobs: Iterable[Job],
    sessions: Iterable[Session],
    unstored: Iterable[Job],
    after: int,
    limit: int,
    owner: str | None,
) -> list[dict[str, Any]]:
    """A page of a queue's jobs in one state, by id, those after `after`, without payloads.
    `jobs` are all jobs, `unstored` the pending ones not yet in a FIFO.

    Raises:
        InvalidRequest: an unknown state or a limit outside 1..MAX_LISTED.
    """
    check_listing(state, list(LISTED_STATES), limit)
    if queue is None:
        return []
    candidates: Iterable[Job]
    if state == "pending":  # in their queue, or waiting for their creation's commit
        candidates = itertools.chain((job for fifo in queue.pending.values() for job in fifo), unstored)
    elif state == "dead":
        candidates = queue.dead.values()
    elif state == "running":
        candidates = (job for session in sessions for job in session.leased.values())
    else:  # delayed, waiting: no index by queue; an admin's occasional scan
        candidates = jobs
    wanted = LISTED_STATES[state]
    name = queue.name
    page = heapq.nsmallest(
        limit,
        (
            job
            for job in candidates
            if job.id > after and job.state is wanted and job.queue == name and (owner is None or job.owner == owner)
        ),
        key=lambda job: job.id,
    )
    return [_summary(job) for job in page]


def dead_list(queue: Queue | None, limit: int) -> list[dict[str, Any]]:
    """The oldest `limit` jobs of a queue's dead-letter list, described in full."""
    if queue is None or limit <= 0:
        return []
    return [_describe(job) for job in itertools.islice(queue.dead.values(), limit)]


def metrics(queues: Mapping[str, Queue], sessions: Collection[Session]) -> dict[str, Any]:
    """Counts for metrics: per queue gauges (pending, delayed, in_flight, dead), totals since
    start (submitted, completed, failed, buried, requeued) and run times; workers and sessions
    connected."""
    return {
        "queues": {
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
            for name, q in queues.items()
        },
        "workers": sum(1 for session in sessions if session.queues),
        "sessions": len(sessions),
    }


def stats(
    queues: Mapping[str, Queue], sessions: Collection[Session], jobs: int, draining: bool, now: float
) -> dict[str, Any]:
    """Counts and rates per queue (the queues sampled at `now`); workers with their leases
    and the age of their last heartbeat."""
    per_queue: dict[str, Any] = {}
    for name, queue in queues.items():
        submitted_rate, completed_rate = queue.rates(now)
        per_queue[name] = {
            "pending": queue.pending_count,
            "waiting": queue.waiting_count,
            "delayed": queue.delayed_count,
            "in_flight": queue.leased_count,
            "dead": len(queue.dead),
            "done": queue.completed,
            "submitted": queue.submitted,
            "failed": queue.failed,
            "submitted_per_second": submitted_rate,
            "done_per_second": completed_rate,
            "workers": sum(1 for s in sessions if name in s.queues),
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
            "last_heartbeat_age": now - session.last_seen,
        }
        for session in sessions
        if session.queues
    ]
    return {"queues": per_queue, "workers": workers, "sessions": len(sessions), "jobs": jobs, "draining": draining}


def _shown_leases(session: Session) -> list[Job]:
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
        "running_seconds": 0.0 if job.started_at is None else now - job.started_at,
        "progress": _progress(job),
    }


def _progress(job: Job) -> dict[str, Any] | None:
    return None if job.progress is None else {"fraction": job.progress[0], "message": job.progress[1]}


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
        "payload": unpacked(job.payload),
        "result": job.result,
        "error": job.error,
        "progress": _progress(job),
        "worker": job.worker,
        "key": job.key,
    }
