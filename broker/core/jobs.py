"""A job and its lifecycle. The lifecycle is one table (docs/protocol.md, "Job states"):
every legal (state, event) pair and the state it leads to. next_state() reads it; a job held
by the scheduler changes state only in Scheduler._move, which keeps the per-state records
(counts, deadlines, FIFOs, leases) in step with the table."""

from __future__ import annotations

import enum
import operator
from typing import TYPE_CHECKING, Any

from jobbroker.broker.errors import InvalidTransition

__all__ = [
    "FINAL_STATES",
    "TRANSITIONS",
    "Job",
    "JobEvent",
    "JobExtras",
    "JobOptions",
    "JobState",
    "next_state",
    "options",
    "transition",
]


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


class JobOptions:
    """What a submit chose for its jobs, read-only once made. Jobs submitted alike share one
    (interned by options()): a million pending jobs then hold one copy, not a million."""

    __slots__ = ("backoff", "lease_seconds", "max_attempts", "max_backoff", "priority", "result_ttl", "timeout")

    def __init__(
        self,
        priority: int,
        max_attempts: int,
        lease_seconds: float,
        backoff: float,
        timeout: float | None,
        result_ttl: float | None,
        max_backoff: float | None,
    ) -> None:
        self.priority = priority
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.backoff = backoff
        self.timeout = timeout  # seconds of run time one attempt may take; None: no limit
        self.result_ttl = result_ttl  # seconds its result is kept; None: the broker's default
        self.max_backoff = max_backoff  # the cap of its retry delays; None: the broker's


_INTERNED: dict[tuple[Any, ...], JobOptions] = {}
_INTERNED_MAX = 4096  # distinct option sets remembered; past it the table starts again


def options(
    priority: int,
    max_attempts: int,
    lease_seconds: float,
    backoff: float,
    timeout: float | None,
    result_ttl: float | None,
    max_backoff: float | None,
) -> JobOptions:
    """The shared JobOptions for these values. The table is bounded so that a peer sending a
    new value with every submit cannot grow it: jobs keep the options they were given."""
    key = (priority, max_attempts, lease_seconds, backoff, timeout, result_ttl, max_backoff)
    found = _INTERNED.get(key)
    if found is None:
        if len(_INTERNED) >= _INTERNED_MAX:
            _INTERNED.clear()
        found = _INTERNED[key] = JobOptions(*key)
    return found


class JobExtras:
    """What few jobs have: an idempotency key, a failure, progress, watchers, dependencies, lost
    unstarted leases. Made on the first such value; until then a job points at shared defaults."""

    __slots__ = (
        "error",
        "key",
        "parent_results",
        "parents",
        "progress",
        "run_anyway",
        "unstarted_losses",
        "waiting_on",
        "watchers",
    )

    def __init__(self) -> None:
        self.key: str | None = None
        self.error: dict[str, str] | None = None  # the last failure: {"type", "message"}
        self.watchers: list[int] | None = None  # sessions awaiting the outcome
        self.progress: tuple[float, str] | None = None  # the last report of a running job
        self.unstarted_losses = 0  # leases lost with their worker before the job started
        # Dependencies (`after`): the jobs it runs after, their results as they end (in `after`
        # order), how many of them have not ended, and whether it runs when one did not succeed.
        self.parents: list[int] | None = None
        self.parent_results: list[Any] | None = None
        self.waiting_on = 0
        self.run_anyway = False


# The defaults, shared by every job without extras of its own (never written: see _extra).
_NO_EXTRAS = JobExtras()


def _extra(name: str) -> property:
    """A Job attribute kept in its JobExtras: read in C (attrgetter) through the shared
    defaults while the job has none; setting a value other than the default makes its own."""
    default = getattr(_NO_EXTRAS, name)

    def set_(job: Job, value: Any) -> None:
        extras = job.extras
        if extras is _NO_EXTRAS:
            if value is default or value == default:
                return
            extras = job.extras = JobExtras()
        setattr(extras, name, value)

    return property(operator.attrgetter(f"extras.{name}"), set_)


def _option(name: str) -> property:
    return property(operator.attrgetter(f"options.{name}"))


_JOB_SLOTS = (
    "attempts",
    "delivered_at",
    "expires_at",
    "extras",
    "id",
    "not_before",
    "options",
    "owner",
    "payload",
    "queue",
    "result",
    "started_at",
    "state",
    "token",
    "worker",
)


class Job:
    """One job. Compact because a broker may hold millions: slots; the options shared with the
    jobs of its submit (JobOptions); what few jobs have in JobExtras, made when first needed."""

    __slots__ = _JOB_SLOTS  # a name, not a literal: mypy then allows the properties below

    if TYPE_CHECKING:
        priority: int
        max_attempts: int
        lease_seconds: float
        backoff: float
        timeout: float | None
        result_ttl: float | None
        max_backoff: float | None
        key: str | None
        error: dict[str, str] | None
        watchers: list[int] | None
        progress: tuple[float, str] | None
        unstarted_losses: int
        parents: list[int] | None
        parent_results: list[Any] | None
        waiting_on: int
        run_anyway: bool
    else:
        priority = _option("priority")
        max_attempts = _option("max_attempts")
        lease_seconds = _option("lease_seconds")
        backoff = _option("backoff")
        timeout = _option("timeout")
        result_ttl = _option("result_ttl")
        max_backoff = _option("max_backoff")
        key = _extra("key")
        error = _extra("error")
        watchers = _extra("watchers")
        progress = _extra("progress")
        unstarted_losses = _extra("unstarted_losses")
        parents = _extra("parents")
        parent_results = _extra("parent_results")
        waiting_on = _extra("waiting_on")
        run_anyway = _extra("run_anyway")

    def __init__(
        self,
        job_id: int,
        queue: str,
        payload: Any,
        *,
        priority: int = 0,
        max_attempts: int = 1,
        lease_seconds: float = 30.0,
        backoff: float = 0.0,
        key: str | None = None,
        state: JobState,
        timeout: float | None = None,
        result_ttl: float | None = None,
        max_backoff: float | None = None,
        shared: JobOptions | None = None,
    ) -> None:
        """`shared`: the options of the submit this job came with (options()), instead of
        priority .. max_backoff: a submit of many jobs interns them once, not once a job."""
        self.id = job_id
        self.queue = queue
        self.payload = payload
        self.options = shared or options(
            priority, max_attempts, lease_seconds, backoff, timeout, result_ttl, max_backoff
        )
        self.extras = _NO_EXTRAS
        if key is not None:
            self.key = key
        self.state = state
        self.attempts = 0
        self.token = 0  # lease token of the current delivery; fences stale completions
        self.worker: int | None = None  # session holding the lease
        self.result: Any = None
        self.owner: str | None = None  # the credential that submitted it
        self.not_before = 0.0  # when a delayed job becomes pending (scheduler's clock)
        self.delivered_at = 0.0  # when the current lease began (scheduler's clock)
        # When the worker began running the current delivery (scheduler's clock); None while it
        # waits in the worker's prefetch buffer. The attempt counts from the start.
        self.started_at: float | None = None
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
