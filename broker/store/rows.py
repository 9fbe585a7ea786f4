"""The rows a store writes, shared by the stores: a job as created (Row), a change of a stored
job (Update), a WriteBatch of them for one transaction, serialize() from the scheduler's
Changes, and job_from_row() back. Payloads and results are opaque bytes, stored as they came.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from jobbroker.broker.core.changes import Changes
from jobbroker.broker.core.jobs import Job, JobState
from jobbroker.broker.store.interface import IdCeilings

__all__ = [
    "ROW_COLUMNS",
    "ControlsRow",
    "Row",
    "Update",
    "WriteBatch",
    "job_from_row",
    "pack",
    "serialize",
    "unpack",
]

# A job as created: id, queue, state, priority, payload, attempts, max_attempts, lease,
# backoff, key, result, error, not_before (wall clock), expires_at (wall clock), owner, timeout,
# result_ttl, max_backoff, parents, parent_results, run_anyway.
Row = tuple[
    int,
    str,
    str,
    int,
    bytes | None,
    int,
    int,
    float,
    float,
    str | None,
    bytes | None,
    bytes | None,
    float,
    float,
    str | None,
    float | None,
    float | None,
    float | None,
    bytes | None,
    bytes | None,
    int,
]
ROW_COLUMNS = 21
ControlsRow = tuple[bool, int | None, float | None]  # a queue's paused, concurrency, rate

# A change of a stored job: state, attempts, result, error, not_before, expires_at,
# parent_results, id.
Update = tuple[str, int, bytes | None, bytes | None, float, float, bytes | None, int]


def _opaque(blob: Any) -> bytes | None:
    """A stored payload or result: opaque bytes (protocol version 2), held as stored, never
    decoded. A value SQLite does not hand back as a blob is a damaged row.

    A version 1 broker stored a value's msgpack; that is what a version 2 client's default
    serializer sends, so those rows read the same."""
    if blob is None or type(blob) is bytes:
        return blob
    raise TypeError(f"a stored payload or result is a blob, not {type(blob).__name__}")


def parent_results_of(blob: bytes | None, count: int) -> list[bytes | None]:
    """The stored results of the jobs a job runs after; a version 1 row holds their values,
    which are packed as the default serializer would have sent them."""
    if blob is None:
        return [None] * count
    return [r if r is None or type(r) is bytes else pack(r) for r in unpack(blob)]


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(blob: bytes | None) -> Any:
    return None if blob is None else msgpack.unpackb(blob, raw=False, strict_map_key=False)


@dataclass(slots=True)
class WriteBatch:
    """Rows to write in one transaction: inserts first, then updates, then deletes, so that
    a batch merged from several (earlier first) leaves every job in its latest state."""

    inserts: list[Row] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)
    ceilings: IdCeilings | None = None  # new id ceilings to store, if raised
    # queue name -> (paused, concurrency, rate), or None: nothing set any more
    controls: dict[str, ControlsRow | None] = field(default_factory=dict)
    # schedule name -> its record, packed, or None: removed
    schedules: dict[str, bytes | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.inserts or self.updates or self.deletes or self.ceilings or self.controls or self.schedules)

    def then(self, later: WriteBatch) -> WriteBatch:
        ceilings = later.ceilings or self.ceilings
        if self.ceilings and later.ceilings:
            ceilings = IdCeilings(
                max(self.ceilings.token, later.ceilings.token), max(self.ceilings.session, later.ceilings.session)
            )
        return WriteBatch(
            self.inserts + later.inserts,
            self.updates + later.updates,
            self.deletes + later.deletes,
            ceilings,
            {**self.controls, **later.controls},
            {**self.schedules, **later.schedules},
        )

    def job_ids(self) -> set[int]:
        """The jobs this batch writes (created or changed; not those it deletes)."""
        return {row[0] for row in self.inserts} | {update[-1] for update in self.updates}


def serialize(changes: Changes, now: float, wall: float) -> WriteBatch:
    """The scheduler's changes as rows, made in the event loop's thread (the writer thread
    must not read jobs that the loop is changing). Times become wall-clock times. A change
    writes only the columns that can change, not the payload again."""
    offset = wall - now
    inserts = [_insert_row(job, offset) for job in changes.created.values()]
    updates = [
        (*_state_and_attempts(job), *_mutable_columns(job, offset), _parent_results(job), job.id)
        for job in changes.updated.values()
    ]
    controls = {name: None if c is None else (c.paused, c.concurrency, c.rate) for name, c in changes.controls.items()}
    schedules = {name: None if r is None else pack(r) for name, r in changes.schedules.items()}
    return WriteBatch(inserts, updates, changes.forgotten, controls=controls, schedules=schedules)


def _insert_row(job: Job, offset: float) -> Row:
    state, attempts = _state_and_attempts(job)
    return (
        job.id,
        job.queue,
        state,
        job.priority,
        job.payload,  # opaque bytes, stored as they came
        attempts,
        job.max_attempts,
        job.lease_seconds,
        job.backoff,
        job.key,
        *_mutable_columns(job, offset),
        job.owner,
        job.timeout,
        job.result_ttl,
        job.max_backoff,
        None if job.parents is None else pack(job.parents),
        _parent_results(job),
        int(job.run_anyway),
    )


def _state_and_attempts(job: Job) -> tuple[str, int]:
    """Leases are not written (they would cost a write per delivery): a leased job is written
    as it was before its delivery, pending with the attempts before this one (the attempt
    counts once the worker starts it). After a crash it is simply delivered again."""
    if job.state is JobState.LEASED:
        return JobState.PENDING.value, job.attempts - (job.started_at is not None)
    return job.state.value, job.attempts


def _parent_results(job: Job) -> bytes | None:
    return None if job.parent_results is None else pack(job.parent_results)


def _mutable_columns(job: Job, offset: float) -> tuple[bytes | None, bytes | None, float, float]:
    """result, error, not_before, expires_at: what changes over a job's life besides state
    and attempts."""
    state = job.state
    return (
        job.result,  # opaque bytes, as the worker sent them
        None if job.error is None else pack(job.error),
        job.not_before + offset if state is JobState.DELAYED else 0.0,
        job.expires_at + offset if state is JobState.DONE or state is JobState.CANCELLED else 0.0,
    )


def job_from_row(row: Iterable[Any], offset: float, shared: dict[Any, Any]) -> Job:
    """A job from its row. `shared` holds one copy of each queue name, state and option value
    seen: a million jobs on one queue then share one "queue" string and one lease float,
    as jobs submitted in one batch do, instead of a million copies."""
    (
        job_id,
        queue,
        state,
        priority,
        payload,
        attempts,
        max_attempts,
        lease,
        backoff,
        key,
        result,
        error,
        not_before,
        expires_at,
        owner,
        timeout,
        result_ttl,
        max_backoff,
        parents,
        parent_results,
        run_anyway,
    ) = row
    job = Job(
        job_id,
        shared.setdefault(queue, queue),
        _opaque(payload),
        priority=priority,
        max_attempts=max_attempts,
        lease_seconds=shared.setdefault(("lease", lease), lease),
        backoff=shared.setdefault(("backoff", backoff), backoff),
        key=key,
        state=JobState(state),
        timeout=timeout,
        result_ttl=result_ttl,
        max_backoff=max_backoff,
    )
    job.attempts = attempts
    if parents is not None:
        job.parents = unpack(parents)
        job.parent_results = parent_results_of(parent_results, len(job.parents))
        job.run_anyway = bool(run_anyway)
    job.owner = owner
    if result is not None:
        job.result = _opaque(result)
    if error is not None:
        job.error = unpack(error)
    if not_before:
        job.not_before = not_before + offset
    if expires_at:
        job.expires_at = expires_at + offset
    return job
