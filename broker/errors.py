"""Every exception jobbroker raises, under one root.

    JobbrokerError
    ├── UsageError               the caller misused the API (bad argument, closed client)
    │   └── UnencodablePayload   a payload or its arguments cannot be encoded
    ├── ConfigError              bad flags, environment or secret file
    ├── StorageError             the data directory is unwritable, full, locked or corrupt
    │   └── StorageFailed        a write failed in a way a retry cannot fix (fsync error): stop
    ├── ProtocolError            the peer broke the wire protocol (docs/protocol.md)
    │   ├── FrameTooLarge        a frame header declared more than the limit
    │   ├── MalformedMessage     not msgpack, not a map, unknown op, wrong field types
    │   ├── AuthenticationFailed the handshake failed (wrong secret, bad proof, timeout)
    │   ├── TlsMismatch          one side speaks TLS and the other plain TCP
    │   └── IntegrityError       a frame's MAC did not verify (altered, replayed, reordered)
    ├── ConnectionClosed         the connection is gone; `cause` says why
    │   ├── BrokerUnreachable    no broker answered at the addresses (refused, unknown host, timeout)
    │   └── Unacknowledged       lost before the reply: the request may or may not have been applied
    ├── BrokerError              the broker refused a request; `code` is the wire error code
    │   ├── QueueFull
    │   ├── JobNotFound
    │   ├── LeaseLost            fencing: the lease this completion refers to is no longer held
    │   ├── InvalidState         e.g. cancelling a job that is already running
    │   ├── InvalidRequest
    │   ├── Forbidden            the credential's role does not allow it
    │   ├── NotLeader            a standby answered: `leader` is the leading broker's address
    │   ├── LimitExceeded        over a batch, payload, result or queue-count limit
    │   │   └── ReplyTooLarge    the reply would not fit in a frame (or the connection's budget)
    │   └── StorageUnavailable   the broker cannot persist new jobs right now
    ├── JobError                 a job ended without a result
    │   ├── JobDead              it failed max_attempts times; `error` holds the last failure
    │   └── JobCancelled
    ├── ResultTimeout            waiting for a result took longer than asked (also a TimeoutError)
    ├── TimeLimitExceeded        a job's attempt ran over its `timeout` (also a TimeoutError)
    ├── Retry                    raised by a handler: retry this job after `delay` seconds
    ├── Fail                     raised by a handler: this job is dead now, no more attempts
    └── InvalidTransition        the job core was asked for a transition its table forbids

Peer faults (ProtocolError) are separated from caller faults (UsageError), and "closed by
us" from "broken by the peer" by ConnectionClosed.cause.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationFailed",
    "BrokerError",
    "BrokerUnreachable",
    "ConfigError",
    "ConnectionClosed",
    "Fail",
    "Forbidden",
    "FrameTooLarge",
    "IntegrityError",
    "InvalidRequest",
    "InvalidState",
    "InvalidTransition",
    "JobCancelled",
    "JobDead",
    "JobError",
    "JobNotFound",
    "JobbrokerError",
    "LeaseLost",
    "LimitExceeded",
    "MalformedMessage",
    "NotLeader",
    "ProtocolError",
    "QueueFull",
    "ReplyTooLarge",
    "ResultTimeout",
    "Retry",
    "StorageError",
    "StorageFailed",
    "StorageUnavailable",
    "TimeLimitExceeded",
    "TlsMismatch",
    "Unacknowledged",
    "UnencodablePayload",
    "UsageError",
    "broker_error",
]


class JobbrokerError(Exception):
    """Root of every jobbroker exception."""


class UsageError(JobbrokerError):
    """The caller used the API wrongly."""


class UnencodablePayload(UsageError):
    """A payload (or a task's arguments) cannot be encoded for the wire; nothing was sent.
    `reasons` maps the index of each payload of the request that failed to why."""

    def __init__(self, message: str, reasons: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or {}
        self.indexes = frozenset(self.reasons)


class ConfigError(JobbrokerError):
    """Configuration (flags, environment, secret file) is unusable."""


class StorageError(JobbrokerError):
    """The broker's data directory cannot be used: unwritable, full, locked or corrupt."""


class StorageFailed(StorageError):
    """A commit failed with an I/O error other than "disk full" (an fsync error, say): the
    kernel may have dropped the pages it could not write, so a retry could report success for
    data that is gone (PostgreSQL's fsync-panic reasoning). The broker stops instead."""


class ProtocolError(JobbrokerError):
    """The peer sent something the protocol does not allow."""

    code = "protocol_error"


class FrameTooLarge(ProtocolError):
    """A frame header declared a length above the limit; the body was never read."""

    code = "frame_too_large"

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class MalformedMessage(ProtocolError):
    """A frame body is not a valid message. `request_id` is the id it carried, if readable."""

    code = "malformed"

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class AuthenticationFailed(ProtocolError):
    """The handshake did not prove knowledge of the shared secret."""

    code = "auth_failed"


class TlsMismatch(ProtocolError):
    """One side speaks TLS and the other plain TCP: a TLS client at a plaintext port, or a
    plaintext client at a TLS port. No retry mends it: fix the client's `tls` setting."""

    code = "tls_mismatch"


class IntegrityError(ProtocolError):
    """A frame's MAC did not verify: it was altered, injected, replayed or reordered."""

    code = "integrity"


class ConnectionClosed(JobbrokerError):
    """The connection is closed. `cause` is the exception that broke it, or None if closed by us."""

    def __init__(self, message: str = "connection closed", cause: BaseException | None = None) -> None:
        super().__init__(message if cause is None else f"{message}: {cause}")
        self.cause = cause


class BrokerUnreachable(ConnectionClosed):
    """No broker could be reached at `address` (connection refused, unknown host, no answer,
    or not a jobbroker broker), or, given several addresses, no leader at any of them.
    Raised at once for brokers never reached before, rather than after minutes of retries.

    Args:
        address: the address, or the addresses tried, separated by commas.
        cause: the (last) failure.
        tried: each address tried and its last failure, when there were several.
    """

    def __init__(
        self, address: str, cause: BaseException | None = None, *, tried: dict[str, BaseException] | None = None
    ) -> None:
        if tried and len(tried) > 1:
            reasons = "; ".join(f"{where}: {_describe_os_error(error)}" for where, error in tried.items())
            message = f"cannot reach the broker at any of {', '.join(tried)} ({reasons})"
        else:
            reason = _describe_os_error(cause) if cause is not None else "no answer"
            message = f"cannot reach the broker at {address}: {reason}"
        JobbrokerError.__init__(self, message)
        self.cause = cause
        self.address = address
        self.tried = dict(tried or {})


class Unacknowledged(ConnectionClosed):
    """The connection was lost after a request was sent and before its reply, and the request
    was not one that can be sent again blindly (a submit without idempotency keys): it may or
    may not have been applied. Give submits keys to have such a loss retried safely."""


def _describe_os_error(error: BaseException) -> str:
    if isinstance(error, NotLeader):
        return f"a standby, naming the leader {error.leader}" if error.leader else "a standby, no leader known"
    if isinstance(error, ProtocolError):
        return f"what answers there does not speak jobbroker's protocol ({error})"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower() if error.strerror[:1].isupper() else error.strerror
    return str(error) or type(error).__name__


class BrokerError(JobbrokerError):
    """The broker refused a request. `code` is the wire error code (docs/protocol.md)."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class QueueFull(BrokerError):
    code = "queue_full"


class JobNotFound(BrokerError):
    code = "not_found"


class LeaseLost(BrokerError):
    code = "lease_lost"


class InvalidState(BrokerError):
    code = "invalid_state"


class InvalidRequest(BrokerError):
    code = "invalid_request"


class Forbidden(BrokerError):
    """The credential's role does not allow this request (or this job is another's)."""

    code = "forbidden"


class NotLeader(BrokerError):
    """The broker is a standby (docs/protocol.md, "Standbys"): it did nothing with the request.
    `leader` is the leading broker's advertised "HOST:PORT", or None when it does not know one
    (a takeover in progress). The client goes there and sends the request again."""

    code = "not_leader"

    def __init__(self, message: str, leader: str | None = None) -> None:
        super().__init__(message)
        self.leader = leader


class LimitExceeded(BrokerError):
    """A request is over one of the broker's limits (batch, payload, result, queues)."""

    code = "limit_exceeded"


class ReplyTooLarge(LimitExceeded):
    """The reply to this request would be larger than a frame (or than what the broker holds
    for one connection); nothing was built. Ask for less (e.g. fewer ids per request)."""

    code = "reply_too_large"


class StorageUnavailable(BrokerError):
    """The broker cannot persist new jobs (disk full, unwritable, failing); nothing was accepted."""

    code = "storage_unavailable"


class JobError(JobbrokerError):
    """A job ended without a result."""

    def __init__(self, job_id: int, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobDead(JobError):
    """The job failed max_attempts times and went to its queue's dead-letter list."""

    def __init__(self, job_id: int, error: Any) -> None:
        # `error`: {"type", "message"} and, from workers that send it, "traceback"
        summary = f"{error.get('type')}: {error.get('message')}" if isinstance(error, dict) else error
        super().__init__(job_id, f"job {job_id} is dead: {summary}")
        self.error = error


class JobCancelled(JobError):
    def __init__(self, job_id: int) -> None:
        super().__init__(job_id, f"job {job_id} was cancelled")


class ResultTimeout(JobbrokerError, TimeoutError):
    """No result arrived within the timeout; the job itself goes on."""


class TimeLimitExceeded(JobbrokerError, TimeoutError):
    """A job's attempt ran over its time limit (`timeout`); the attempt fails with this type
    and is retried by the job's policy."""


class Retry(JobbrokerError):
    """Raised by a handler: fail this attempt and retry the job after `delay` seconds (instead
    of its backoff). The attempt counts: on the last one the job goes dead.

    Args:
        delay: seconds before the retry (None: the job's own backoff).
        reason: a short text kept as the attempt's error message.
    """

    def __init__(self, delay: float | None = None, reason: str = "") -> None:
        super().__init__(reason or (f"retry in {delay:g} s" if delay is not None else "retry"))
        self.delay = delay
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # from a process handler: keep the delay
        return (type(self), (self.delay, self.reason))


class Fail(JobbrokerError):
    """Raised by a handler: the job is dead at once, whatever attempts it has left."""


class InvalidTransition(JobbrokerError):
    """The job lifecycle table has no such transition (broker/core/jobs.py)."""


_BROKER_ERRORS: dict[str, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        QueueFull,
        JobNotFound,
        LeaseLost,
        InvalidState,
        InvalidRequest,
        Forbidden,
        LimitExceeded,
        NotLeader,
        ReplyTooLarge,
        StorageUnavailable,
    )
}


def broker_error(code: str, message: str, leader: str | None = None) -> BrokerError:
    """The typed exception for a wire error code; unknown codes give a plain BrokerError.
    `leader` is the error message's field of that name (kept by NotLeader only)."""
    if code == NotLeader.code:
        return NotLeader(message, leader)
    cls = _BROKER_ERRORS.get(code)
    if cls is None:
        return BrokerError(message, code)
    return cls(message)
