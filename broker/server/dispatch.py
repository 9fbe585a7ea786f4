"""Request dispatch: one request from an authenticated peer in, its reply (or error reply)
out, through the scheduler. Pure: no asyncio, no sockets, no time read but from the clock
given, so that it runs in tests with a FakeClock and a fake peer.

The shell (broker.py) hands it requests; it talks to the rest of the server through two small
interfaces: `Peer` (the connection a request came on) and `Durability` (group commit: is it
on, does storage work, which jobs have changes not yet committed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import msgpack
from jobbroker.broker.core.clock import Clock
from jobbroker.broker.core.scheduler import Scheduler
from jobbroker.broker.core.schedules import schedule_from_settings
from jobbroker.broker.errors import (
    BrokerError,
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    StorageError,
    StorageUnavailable,
)
from jobbroker.broker.protocol.messages import (
    Cancel,
    Complete,
    DeadList,
    DeadPurge,
    DeadRequeue,
    Drain,
    ErrorReply,
    Fail,
    JobInfo,
    JobList,
    Message,
    Progress,
    QueuePurge,
    QueueSet,
    Release,
    Request,
    Reserve,
    ScheduleList,
    ScheduleRemove,
    ScheduleSet,
    Started,
    Stats,
    Submit,
    Touch,
    Watch,
    packed,
)

__all__ = ["Dispatcher", "Durability", "Limits", "Peer", "ids_text"]

log = logging.getLogger("jobbroker.broker")


class Peer(Protocol):
    """What dispatch needs of the connection a request came on."""

    @property
    def session(self) -> int: ...

    @property
    def owner(self) -> str | None:
        """The credential, for producers and workers; None for admins (who see every job)."""
        ...

    @property
    def allowed(self) -> frozenset[str]:
        """The ops the credential's role may send."""
        ...

    @property
    def credential(self) -> str | None:
        """The credential claimed in the handshake (for error messages)."""
        ...

    # Set when the reply must wait for the commit of what it tells of (docs/protocol.md, "Durability").
    needs_commit: bool

    def send_reply(self, request_id: int, data: dict[str, Any]) -> None: ...

    def send(self, message: Message) -> None: ...


class Durability(Protocol):
    """What dispatch needs of group commit."""

    @property
    def active(self) -> bool:
        """Whether changes are committed to a durable store at all."""
        ...

    @property
    def storage_error(self) -> StorageError | None:
        """Why the last write failed, until one succeeds: submits are refused meanwhile."""
        ...

    def unwritten(self, job_ids: Iterable[int]) -> bool:
        """Whether any of these jobs has a change that is not committed."""
        ...


class Limits(Protocol):
    """The limits dispatch enforces (BrokerConfig has them)."""

    @property
    def max_payload_size(self) -> int: ...

    @property
    def max_result_size(self) -> int: ...


class Dispatcher:
    """The `_handlers` table and one `_on_<op>` method per request type.

    Args:
        scheduler: the job core every request goes to.
        config: the payload and result limits.
        clock: `now` for every request; its wall clock for schedules.
        durability: group commit, or a stand-in that is never active (in memory).
        arm_ticker: called when the schedules changed (the next tick may be sooner).
        schedule_flush: called when deliveries may go out again (drain turned off).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        config: Limits,
        clock: Clock,
        durability: Durability,
        *,
        arm_ticker: Callable[[], None],
        schedule_flush: Callable[[], None],
    ) -> None:
        self.scheduler = scheduler
        self.config = config
        self.clock = clock
        self._durability = durability
        self._arm_ticker = arm_ticker
        self._schedule_flush = schedule_flush
        self._handlers: dict[type[Request], Callable[[Peer, Any, float], dict[str, Any]]] = {
            Submit: self._on_submit,
            Reserve: self._on_reserve,
            Complete: self._on_complete,
            Fail: self._on_fail,
            Touch: self._on_touch,
            Release: self._on_release,
            Progress: self._on_progress,
            Watch: self._on_watch,
            Cancel: self._on_cancel,
            Stats: self._on_stats,
            JobInfo: self._on_job_info,
            JobList: self._on_job_list,
            QueuePurge: self._on_queue_purge,
            QueueSet: self._on_queue_set,
            ScheduleSet: self._on_schedule_set,
            ScheduleRemove: self._on_schedule_remove,
            ScheduleList: self._on_schedule_list,
            DeadList: self._on_dead_list,
            DeadRequeue: self._on_dead_requeue,
            DeadPurge: self._on_dead_purge,
            Drain: self._on_drain,
        }

    def handle(self, peer: Peer, request: Request) -> None:
        """Answer one request: its reply, or an error reply, goes to `peer`. Never raises."""
        handler = self._handlers.get(type(request))
        try:
            if handler is None:
                raise InvalidRequest(f"op {request.op!r} is not handled")
            if request.op not in peer.allowed:
                raise Forbidden(f"op {request.op!r} is not allowed for credential {peer.credential!r}")
            data = handler(peer, request, self.clock.now())
        except BrokerError as exc:
            peer.send(ErrorReply(id=request.id, code=exc.code, message=str(exc)))
        except Exception:
            # A bug of ours must not take the connection (or the broker) down with it.
            log.exception("internal error handling %s from session %d", request.op, peer.session)
            peer.send(ErrorReply(id=request.id, code="internal", message="internal broker error"))
        else:
            peer.send_reply(request.id, data)
            if self._durability.active and not peer.needs_commit:
                peer.needs_commit = self._reflects_unwritten(request, data)

    def _reflects_unwritten(self, request: Request, data: dict[str, Any]) -> bool:
        """Whether a reply tells of a change not yet committed, so that it must wait for it
        (docs/protocol.md, "Durability"): what a submit created or found by its key, what a
        cancel changed, the state a `job` reply or a dead list shows. A refusal changes
        nothing and waits for nothing."""
        kind = type(request)
        if kind is Submit:
            return self._durability.unwritten(data["job_ids"])
        if isinstance(request, Cancel | Watch):
            return self._durability.unwritten(request.job_ids)
        if isinstance(request, JobInfo):
            return self._durability.unwritten([request.job_id])
        if kind is DeadList or kind is JobList:
            return self._durability.unwritten([job["id"] for job in data["jobs"]])
        return kind in _DURABLE_REPLIES

    @property
    def _storage_error(self) -> StorageError | None:
        return self._durability.storage_error

    def _on_submit(self, client: Peer, request: Submit, now: float) -> dict[str, Any]:
        if self._storage_error is not None:
            raise StorageUnavailable(f"the broker cannot store new jobs: {self._storage_error}")
        # Payloads are held packed (the broker never looks inside): a payload costs its encoded
        # size, is measured by it, stored as it is and spliced into deliveries.
        payloads = [packed(payload) for payload in request.payloads]
        limit = self.config.max_payload_size
        for index, payload in enumerate(payloads):
            if len(payload) > limit:
                raise LimitExceeded(f"payload {index} is over the limit of {limit} bytes")
        ids = self.scheduler.submit(
            client.session,
            request.queue,
            payloads,
            now,
            priority=request.priority,
            delay=request.delay,
            max_attempts=request.max_attempts,
            lease=request.lease,
            backoff=request.backoff,
            keys=request.keys,
            watch=request.watch,
            owner=client.owner,
            timeout=request.timeout,
            result_ttl=request.result_ttl,
            max_backoff=request.max_backoff,
            after=request.after,
            run_anyway=_run_anyway(request.after_policy),
        )
        return {"job_ids": ids}

    def _on_reserve(self, client: Peer, request: Reserve, now: float) -> dict[str, Any]:
        self.scheduler.reserve(client.session, request.queues, request.prefetch, now)
        return {}

    def _on_complete(self, client: Peer, request: Complete, now: float) -> dict[str, Any]:
        limit = self.config.max_result_size
        oversized = _too_large([item[2] for item in request.items], limit, every=True)
        if not oversized:
            return _refusals(self.scheduler.complete(client.session, request.items, now))
        # A result over the limit fails its job (retried, then dead) rather than vanishing.
        items = [item for index, item in enumerate(request.items) if index not in oversized]
        codes = iter(self.scheduler.complete(client.session, items, now))
        failures = [[item[0], item[1], "ResultTooLarge", f"result over {limit} bytes"] for item in request.items]
        self.scheduler.fail(client.session, [failures[index] for index in sorted(oversized)], now)
        return _refusals(["result_too_large" if i in oversized else next(codes) for i in range(len(request.items))])

    def _on_fail(self, client: Peer, request: Fail, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.fail(client.session, request.items, now))

    def started(self, client: Peer, notice: Started) -> None:
        """A notice (no reply): the worker began these jobs. Items it no longer holds are
        ignored: the broker has told it already (revoked) or its session is gone."""
        if Started.op in client.allowed:
            self.scheduler.started(client.session, notice.items, self.clock.now())
        else:
            client.send(ErrorReply(id=None, code=Forbidden.code, message="op 'started' is not allowed"))

    def _on_touch(self, client: Peer, request: Touch, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.touch(client.session, request.items, now))

    def _on_release(self, client: Peer, request: Release, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.release(client.session, request.items, now))

    def _on_progress(self, client: Peer, request: Progress, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.progress(client.session, request.items, now))

    def _on_watch(self, client: Peer, request: Watch, now: float) -> dict[str, Any]:
        # One outcome per job however often the request names it: a job's result is pushed once.
        self.scheduler.watch(client.session, list(dict.fromkeys(request.job_ids)), owner=client.owner)
        return {}

    def _on_cancel(self, client: Peer, request: Cancel, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.cancel(request.job_ids, now, owner=client.owner))

    def _on_stats(self, client: Peer, request: Stats, now: float) -> dict[str, Any]:
        return self.scheduler.stats(now)

    def _on_job_info(self, client: Peer, request: JobInfo, now: float) -> dict[str, Any]:
        return {"job": self.scheduler.job_info(request.job_id, owner=client.owner)}

    def _on_job_list(self, client: Peer, request: JobList, now: float) -> dict[str, Any]:
        jobs = self.scheduler.job_list(
            request.queue, request.state, after=request.after, limit=request.limit, owner=client.owner
        )
        return {"jobs": jobs}

    def _on_queue_set(self, client: Peer, request: QueueSet, now: float) -> dict[str, Any]:
        settings = self.scheduler.configure_queue(
            request.queue, now, paused=request.paused, concurrency=request.concurrency, rate=request.rate
        )
        log.warning("queue %s set by session %d: %s", request.queue, client.session, settings)
        return settings

    def _on_schedule_set(self, client: Peer, request: ScheduleSet, now: float) -> dict[str, Any]:
        settings = {
            "queue": request.queue,
            "payload": request.payload,
            "cron": request.cron,
            "every": request.every,
            "tz": request.tz,
            "catch_up": request.catch_up,
            **(request.options or {}),
        }
        record = self.scheduler.set_schedule(schedule_from_settings(request.name, settings), self.clock.wall())
        log.warning("schedule %s set by session %d: %s", request.name, client.session, record)
        self._arm_ticker()
        return record

    def _on_schedule_remove(self, client: Peer, request: ScheduleRemove, now: float) -> dict[str, Any]:
        removed = self.scheduler.remove_schedule(request.name)
        if removed:
            log.warning("schedule %s removed by session %d", request.name, client.session)
        return {"removed": removed}

    def _on_schedule_list(self, client: Peer, request: ScheduleList, now: float) -> dict[str, Any]:
        return {"schedules": [schedule.record() for schedule in self.scheduler.schedules.all()]}

    def _on_queue_purge(self, client: Peer, request: QueuePurge, now: float) -> dict[str, Any]:
        purged = self.scheduler.purge_queue(request.queue, now)
        if purged:
            log.warning("queue %s purged by session %d: %s", request.queue, client.session, ids_text(purged))
        return {"purged": len(purged)}

    def _on_dead_list(self, client: Peer, request: DeadList, now: float) -> dict[str, Any]:
        return {"jobs": self.scheduler.dead_list(request.queue, request.limit)}

    def _on_dead_requeue(self, client: Peer, request: DeadRequeue, now: float) -> dict[str, Any]:
        requeued = self.scheduler.dead_requeue(request.queue, request.job_ids, now)
        if requeued:
            log.warning(
                "dead jobs of queue %s requeued by session %d: %s", request.queue, client.session, ids_text(requeued)
            )
        return {"requeued": len(requeued)}

    def _on_drain(self, client: Peer, request: Drain, now: float) -> dict[str, Any]:
        in_flight = self.scheduler.drain(request.on)
        log.warning(
            "deliveries %s by session %d; %d jobs in flight",
            "stopped" if request.on else "resumed",
            client.session,
            in_flight,
        )
        if not request.on:
            self._schedule_flush()
        return {"in_flight": in_flight}

    def _on_dead_purge(self, client: Peer, request: DeadPurge, now: float) -> dict[str, Any]:
        purged = self.scheduler.dead_purge(request.queue, request.job_ids)
        if purged:
            log.warning(
                "dead jobs of queue %s purged by session %d: %s", request.queue, client.session, ids_text(purged)
            )
        return {"purged": len(purged)}


# Replies that wait for the commit of what the request changed (see Broker._flush_now); submit,
# cancel, watch, job and dead_list replies wait if the jobs they name have unwritten changes
# (Broker._reflects_unwritten).
_DURABLE_REPLIES: frozenset[type[Request]] = frozenset(
    {Submit, Cancel, DeadRequeue, DeadPurge, QueuePurge, QueueSet, ScheduleSet, ScheduleRemove}
)


def _run_anyway(policy: str) -> bool:
    """after_policy: "done" (every job it runs after must succeed) or "always"."""
    if policy not in ("done", "always"):
        raise InvalidRequest(f"after_policy is 'done' or 'always', not {policy!r}")
    return policy == "always"


def _too_large(values: list[Any], limit: int, *, every: bool = False) -> Any:
    """Which values encode to more than `limit` bytes: the first index (or, with every, the
    set of all), or None / an empty set. Cheap in the common case: when all of them together
    fit, none is checked alone."""
    if len(msgpack.packb(values, use_bin_type=True)) <= limit:
        return set() if every else None
    oversized = {i for i, value in enumerate(values) if len(msgpack.packb(value, use_bin_type=True)) > limit}
    if every:
        return oversized
    return min(oversized) if oversized else None


def _refusals(codes: list[str | None]) -> dict[str, Any]:
    return {"refused": [[index, code] for index, code in enumerate(codes) if code is not None]}


def ids_text(ids: list[int]) -> str:
    shown = ",".join(map(str, ids[:20]))
    return f"[{shown}{',...' if len(ids) > 20 else ''}]"
