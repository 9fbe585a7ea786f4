"""A job and its lifecycle. The lifecycle is one table (docs/protocol.md, "Job states"):
every legal (state, event) pair and the state it leads to. next_state() reads it; a job held
by the scheduler changes state only in Scheduler._move, which keeps the per-state records
(counts, deadlines, FIFOs, leases) in step with the table."""

from __future__ import annotations

import enum
from typing import Any

from jobbroker.broker.errors import InvalidTransition

__all__ = ["FINAL_STATES", "TRANSITIONS", "Job", "JobEvent", "JobState", "next_state", "transition"]


class JobState(enum.StrEnum):
    WAITING = "waiting"  # for the jobs it was submitted after (`after`) to end
    PENDING = "pending"  # waiting in its queue for a worker
    DELAYED = "delayed"  # waiting for its not-before time (a delayed submit, or a retry backoff)
    LEASED = "leased"  # delivered to a worker, under a lease
    DONE = "done"  # completed; the result is kept for the result TTL
    DEAD = "dead"  # failed max_attempts times; in its queue's dead-letter list
    CANCELLED = "cancelled"


class JobEvent(enum.StrEnum):
    DUE = "due"  # the not-before time has come
    READY = "ready"  # every job it waited for has ended (done, or any end with run_anyway)
    DELIVER = "deliver"
    COMPLETE = "complete"
    RETRY = "retry"  # failed with attempts left: back off
    BURY = "bury"  # failed, or lost its lease, with no attempts left
    REQUEUE = "requeue"  # lease lost (worker died or disconnected) or handed back
    CANCEL = "cancel"
    REVIVE = "revive"  # requeued from the dead-letter list


TRANSITIONS: dict[tuple[JobState, JobEvent], JobState] = {
    (JobState.DELAYED, JobEvent.DUE): JobState.PENDING,
    (JobState.WAITING, JobEvent.READY): JobState.PENDING,
    (JobState.WAITING, JobEvent.CANCEL): JobState.CANCELLED,  # cancelled, or a job it waits for failed
    (JobState.PENDING, JobEvent.DELIVER): JobState.LEASED,
    (JobState.LEASED, JobEvent.COMPLETE): JobState.DONE,
    (JobState.LEASED, JobEvent.RETRY): JobState.DELAYED,
    (JobState.LEASED, JobEvent.BURY): JobState.DEAD,
    (JobState.LEASED, JobEvent.REQUEUE): JobState.PENDING,
    (JobState.PENDING, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.DELAYED, JobEvent.CANCEL): JobState.CANCELLED,
    (JobState.LEASED, JobEvent.CANCEL): JobState.CANCELLED,  # the worker is told (revoked)
    (JobState.DEAD, JobEvent.REVIVE): JobState.PENDING,
}

FINAL_STATES = frozenset({JobState.DONE, JobState.DEAD, JobState.CANCELLED})


class Job:
    """One job. Compact (slots) because a broker may hold millions."""

    __slots__ = (
        "attempts",
        "backoff",
        "delivered_at",
        "error",
        "expires_at",
        "id",
        "key",
        "lease_seconds",
        "max_attempts",
        "max_backoff",
        "not_before",
        "owner",
        "parent_results",
        "parents",
        "payload",
        "priority",
        "progress",
        "queue",
        "result",
        "result_ttl",
        "run_anyway",
        "started_at",
        "state",
        "timeout",
        "token",
        "unstarted_losses",
        "waiting_on",
        "watchers",
        "worker",
    )

    def __init__(
        self,
        job_id: int,
        queue: str,
        payload: Any,
        *,
        priority: int,
        max_attempts: int,
        lease_seconds: float,
        backoff: float,
        key: str | None,
        state: JobState,
        timeout: float | None = None,
        result_ttl: float | None = None,
        max_backoff: float | None = None,
    ) -> None:
        self.id = job_id
        self.queue = queue
        self.payload = payload
        self.priority = priority
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.timeout = timeout  # seconds of run time one attempt may take; None: no limit
        self.result_ttl = result_ttl  # seconds its result is kept; None: the broker's default
        self.max_backoff = max_backoff  # the cap of its retry delays; None: the broker's
        self.backoff = backoff
        self.key = key
        self.state = state
        self.attempts = 0
        self.token = 0  # lease token of the current delivery; fences stale completions
        self.worker: int | None = None  # session holding the lease
        self.result: Any = None
        self.error: dict[str, str] | None = None  # the last failure: {"type", "message"}
        self.watchers: list[int] | None = None  # sessions awaiting the outcome
        self.progress: tuple[float, str] | None = None  # the last report of a running job
        self.owner: str | None = None  # the credential that submitted it
        self.not_before = 0.0  # when a delayed job becomes pending (scheduler's clock)
        self.delivered_at = 0.0  # when the current lease began (scheduler's clock)
        # When the worker began running the current delivery (scheduler's clock); None while it
        # waits in the worker's prefetch buffer. The attempt counts from the start.
        self.started_at: float | None = None
        self.unstarted_losses = 0  # leases lost with their worker before the job started
        # Dependencies (`after`): the jobs it runs after, their results as they end (in `after`
        # order), how many of them have not ended, and whether it runs when one did not succeed.
        self.parents: list[int] | None = None
        self.parent_results: list[Any] | None = None
        self.waiting_on = 0
        self.run_anyway = False
        self.expires_at = 0.0  # when a finished job is forgotten (scheduler's clock)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.queue} {self.state} attempt {self.attempts}/{self.max_attempts}>"


def next_state(job: Job, event: JobEvent) -> JobState:
    """The state `event` moves `job` to, by the lifecycle table; the job is left as it is.

    Raises:
        InvalidTransition: the table has no row for (job.state, event).
    """
    try:
        return TRANSITIONS[job.state, event]
    except KeyError:
        raise InvalidTransition(f"job {job.id}: no transition from {job.state} on {event}") from None


def transition(job: Job, event: JobEvent) -> None:
    """Move `job` along the lifecycle table (the scheduler moves jobs with Scheduler._move,
    which also keeps its per-state records in step).

    Raises:
        InvalidTransition: the table has no row for (job.state, event).
    """
    job.state = next_state(job, event)
