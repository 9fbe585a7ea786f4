"""The rows of the batch messages (docs/protocol.md, "Ops" and "Pushes"), defined once.

Each row is a NamedTuple: msgpack sends it as an array, one item per column, in this order;
messages.decode() checks each column against its annotation and hands the layers above rows
of these types. The broker builds them (scheduler, server) and the client reads them by name
(client.client, client.worker): neither side describes a row again.

Columns with a default may be left out at the end of a row; columns past those listed are
ignored (a later version's), so a version can add trailing columns. Payloads and results are
opaque bytes (msgpack bin): what the client's serializer made, passed through unchanged.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NamedTuple

from jobbroker.broker.errors import MalformedMessage

__all__ = [
    "CompleteRow",
    "DeliveryRow",
    "FailRow",
    "Outcome",
    "ProgressRow",
    "ProgressedRow",
    "RefusedRow",
    "ReleaseRow",
    "ResultRow",
    "RevokedRow",
    "StartedRow",
    "TouchRow",
    "refused_rows",
]


class Outcome(enum.StrEnum):
    """How a watched job ended: the `state` column of a result row."""

    DONE = "done"  # `result` holds the worker's bytes
    DEAD = "dead"  # `error` holds the last failure: {type, message, traceback?}
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"  # no such job (never submitted, another's, or its result expired)


# --- worker to broker -------------------------------------------------------------------


class CompleteRow(NamedTuple):
    job_id: int
    token: int
    result: bytes  # opaque: the worker's serializer made it


class FailRow(NamedTuple):
    job_id: int
    token: int
    error_type: str
    error_message: str
    traceback: str | None = None  # formatted, cut to 8192 characters
    final: bool | None = None  # no retry: dead at once
    retry_delay: float | None = None  # seconds, instead of the job's backoff


class TouchRow(NamedTuple):
    job_id: int
    token: int
    seconds: float  # ignored: leases follow the session


class ReleaseRow(NamedTuple):
    job_id: int
    token: int


class StartedRow(NamedTuple):
    job_id: int
    token: int


class ProgressRow(NamedTuple):
    job_id: int
    token: int
    fraction: float  # 0..1
    message: str


# --- broker to client -------------------------------------------------------------------


class DeliveryRow(NamedTuple):
    job_id: int
    token: int
    queue: str
    payload: bytes  # opaque: the producer's serializer made it
    attempt: int  # the number this attempt has once started
    lease: float  # kept for version 1 compatibility; no effect
    timeout: float | None = None  # the attempt's time limit in seconds; None: none
    # The results of the jobs it runs after, in `after` order (None: it runs after none; an
    # item is None for a job that did not succeed, when it runs anyway).
    parents: list[bytes | None] | None = None


class ResultRow(NamedTuple):
    job_id: int
    state: str  # an Outcome
    result: bytes | None = None  # done: the result's bytes
    error: dict[str, Any] | None = None  # dead: {type, message, traceback?}


class RevokedRow(NamedTuple):
    job_id: int
    token: int
    reason: str  # "cancelled" or "time limit"


class ProgressedRow(NamedTuple):
    job_id: int
    fraction: float
    message: str


class RefusedRow(NamedTuple):
    """An item of a batch request that was not applied: its index in `items`, and why."""

    item: int  # its index in the request's items (or job_ids)
    code: str


def refused_rows(data: Mapping[str, Any]) -> list[RefusedRow]:
    """The `refused` rows of a reply to complete, fail, touch, release, progress or cancel.

    Raises:
        MalformedMessage: the reply has no such rows.
    """
    try:
        rows = [RefusedRow(*row) for row in data["refused"]]
    except (KeyError, TypeError) as exc:
        raise MalformedMessage(f"a reply's refused rows are [[index, code]]: {exc!r}") from None
    if any(type(row.item) is not int or type(row.code) is not str for row in rows):
        raise MalformedMessage("a reply's refused rows are [[index: int, code: str]]")
    return rows
