"""The job core's defaults and limits, and the checks of requests against them: every
InvalidRequest and LimitExceeded the scheduler raises for a bad argument comes from here, so
the scheduler's methods read as what they do, and the limits are listed in one place."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from jobbroker.broker.errors import InvalidRequest, LimitExceeded
from jobbroker.broker.protocol.messages import MAX_ERROR_MESSAGE, MAX_ERROR_TYPE, MAX_TRACEBACK, bounded

__all__ = [
    "MAX_KEY_LENGTH",
    "MAX_LISTED",
    "MAX_QUEUE_NAME",
    "MAX_RETRY_DELAY",
    "SchedulerConfig",
    "check_batch",
    "check_controls",
    "check_keys",
    "check_listing",
    "check_queue_name",
    "check_submit",
    "failure",
    "retry_delay",
]

MAX_QUEUE_NAME = 200
# Queue names: ASCII letters, digits and . _ : / @ -, starting with a letter or digit; they show
# in logs, stats and metrics, where anything else could mislead.
_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]*\Z")
MAX_KEY_LENGTH = 200
MAX_RETRY_DELAY = 86400.0 * 7  # a retry asked for by the handler comes within a week
MAX_LISTED = 1000  # jobs in one page of job_list
MAX_PROGRESS_MESSAGE = 200
_WEEK = 86400.0 * 7


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


def check_queue_name(name: str) -> None:
    """Raises InvalidRequest for a name that is not a queue's (1 to 200 of A-Z a-z 0-9 . _ : / @ -)."""
    if len(name) > MAX_QUEUE_NAME or not _QUEUE_NAME.match(name):
        raise InvalidRequest(
            f"a queue name has 1 to {MAX_QUEUE_NAME} of A-Z a-z 0-9 . _ : / @ - (starting with a letter or digit), "
            f"not {name[:50]!r}"
        )


def check_batch(config: SchedulerConfig, size: int) -> None:
    """Raises LimitExceeded for a request carrying more than max_batch items."""
    if size > config.max_batch:
        raise LimitExceeded(f"{size} items in one request; the limit is {config.max_batch}")


def check_submit(
    config: SchedulerConfig,
    *,
    priority: int,
    delay: float,
    max_attempts: int | None,
    lease: float | None,
    backoff: float | None,
    timeout: float | None,
    result_ttl: float | None,
    max_backoff: float | None,
    after: Sequence[int] | None,
) -> tuple[int, float, float]:
    """Check a submit's options; returns (max_attempts, lease, backoff) with the defaults
    filled in.

    Raises:
        InvalidRequest: an option out of range.
        LimitExceeded: more jobs to run after than max_batch.
    """
    if not -(2**31) <= priority < 2**31:
        raise InvalidRequest("priority must fit in 32 bits")
    if not 0.0 <= delay < 10 * 365 * 86400:
        raise InvalidRequest("delay must be between 0 and ten years")
    max_attempts = config.default_max_attempts if max_attempts is None else max_attempts
    if not 1 <= max_attempts <= 1_000_000:
        raise InvalidRequest("max_attempts must be between 1 and 1000000")
    lease = config.default_lease if lease is None else lease
    if not 0.0 < lease <= _WEEK:
        raise InvalidRequest("lease must be more than 0 and at most a week")
    backoff = config.default_backoff if backoff is None else backoff
    if not 0.0 <= backoff <= 86400:
        raise InvalidRequest("backoff must be between 0 and a day")
    if timeout is not None and not 0.0 < timeout <= _WEEK:
        raise InvalidRequest("timeout must be more than 0 and at most a week (or nil: no limit)")
    if result_ttl is not None and not 0.0 <= result_ttl <= config.max_result_ttl:
        raise InvalidRequest(f"result_ttl must be between 0 and the broker's maximum, {config.max_result_ttl:g} s")
    if max_backoff is not None and not 0.0 <= max_backoff <= _WEEK:
        raise InvalidRequest("max_backoff must be between 0 and a week")
    if after:
        check_batch(config, len(after))
        if delay > 0:
            raise InvalidRequest("a job runs after other jobs or after a delay, not both")
    return max_attempts, lease, backoff


def check_keys(keys: Sequence[str | None], payloads: int) -> None:
    """Raises InvalidRequest unless there is one idempotency key (or None) per payload, each
    of 1 to MAX_KEY_LENGTH characters."""
    if len(keys) != payloads:
        raise InvalidRequest(f"{len(keys)} idempotency keys for {payloads} payloads")
    for key in keys:
        if key is not None and not 0 < len(key) <= MAX_KEY_LENGTH:
            raise InvalidRequest(f"an idempotency key has 1 to {MAX_KEY_LENGTH} characters")


def check_controls(concurrency: int | None, rate: float | None) -> None:
    """Raises InvalidRequest for a queue control out of range (None: left as it is)."""
    if concurrency is not None and not 0 <= concurrency <= 1_000_000:
        raise InvalidRequest("concurrency must be between 0 (no limit) and 1000000")
    if rate is not None and not (0.0 <= rate <= 1_000_000.0):  # NaN fails too
        raise InvalidRequest("rate must be between 0 (no limit) and 1000000 a second")


def check_listing(state: str, states: Sequence[str], limit: int) -> None:
    """Raises InvalidRequest for a job_list page of an unknown state or a limit outside
    1..MAX_LISTED."""
    if not 1 <= limit <= MAX_LISTED:
        raise InvalidRequest(f"limit must be between 1 and {MAX_LISTED}")
    if state not in states:
        raise InvalidRequest(f"state must be one of {', '.join(states)}, not {state!r}")


def retry_delay(asked: float | None) -> float | None:
    """The retry delay a handler asked for, within 0..MAX_RETRY_DELAY (None or NaN: the
    job's backoff)."""
    if asked is None or asked != asked:
        return None
    return min(max(asked, 0.0), MAX_RETRY_DELAY)


def failure(error_type: str, message: str, traceback: str | None = None) -> dict[str, str]:
    """A failure as stored and reported: type, message and, when the worker sent one, the
    formatted traceback, each bounded (a cut says so)."""
    error = {"type": bounded(error_type, MAX_ERROR_TYPE), "message": bounded(message, MAX_ERROR_MESSAGE)}
    if traceback:
        error["traceback"] = bounded(traceback, MAX_TRACEBACK, keep_end=True)
    return error
