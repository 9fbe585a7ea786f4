"""Request dispatch on a fake clock and a fake connection: no sockets, no event loop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from jobbroker.broker.access import PERMISSIONS, Role
from jobbroker.broker.config import BrokerConfig
from jobbroker.broker.core.clock import FakeClock
from jobbroker.broker.core.scheduler import Deliver, Scheduler, SchedulerConfig
from jobbroker.broker.errors import StorageError
from jobbroker.broker.protocol.messages import (
    Cancel,
    Complete,
    Drain,
    ErrorReply,
    Fail,
    JobInfo,
    Message,
    QueuePurge,
    Reserve,
    ScheduleList,
    ScheduleSet,
    Started,
    Stats,
    Submit,
    Watch,
)
from jobbroker.broker.server.dispatch import Dispatcher


class FakePeer:
    """A connection as dispatch sees it: what it was sent, in order."""

    def __init__(self, session: int, role: Role, credential: str) -> None:
        self.session = session
        self.allowed = PERMISSIONS[role]
        self.owner = None if role is Role.ADMIN else credential
        self.credential = credential
        self.needs_commit = False
        self.sent: list[tuple[int | None, Any]] = []  # (request id, reply data or ErrorReply)

    def send_reply(self, request_id: int, data: dict[str, Any]) -> None:
        self.sent.append((request_id, data))

    def send(self, message: Message) -> None:
        assert isinstance(message, ErrorReply)
        self.sent.append((message.id, message))

    def last(self) -> Any:
        return self.sent[-1][1]


class FakeDurability:
    """Group commit as dispatch sees it: on or off, storage working or not, unwritten jobs."""

    def __init__(self, active: bool = False) -> None:
        self.active = active
        self.storage_error: StorageError | None = None
        self.unwritten_jobs: set[int] = set()

    def unwritten(self, job_ids: Iterable[int]) -> bool:
        return not self.unwritten_jobs.isdisjoint(job_ids)


class Harness:
    def __init__(self, *, active: bool = False, **config: Any) -> None:
        self.clock = FakeClock()
        self.scheduler = Scheduler(SchedulerConfig(**config))
        self.durability = FakeDurability(active)
        self.ticker_armed = 0
        self.flushes = 0
        self.dispatch = Dispatcher(
            self.scheduler,
            BrokerConfig(max_payload_size=100, max_result_size=100),
            self.clock,
            self.durability,
            arm_ticker=self._arm_ticker,
            schedule_flush=self._schedule_flush,
        )
        self._next_id = 0

    def _arm_ticker(self) -> None:
        self.ticker_armed += 1

    def _schedule_flush(self) -> None:
        self.flushes += 1

    def peer(self, session: int, role: Role = Role.ADMIN, credential: str = "default") -> FakePeer:
        self.scheduler.open_session(session, self.clock.now())
        return FakePeer(session, role, credential)

    def request_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def deliveries(self) -> dict[int, list[list[Any]]]:
        return {e.session: e.jobs for e in self.scheduler.flush(self.clock.now()) if isinstance(e, Deliver)}

    def submit(self, peer: FakePeer, payloads: list[Any], **options: Any) -> Any:
        self.dispatch.handle(peer, Submit(id=self.request_id(), queue="q", payloads=payloads, **options))
        return peer.last()


def test_submit_reserve_complete_round_trip() -> None:
    h = Harness()
    producer, worker = h.peer(1, Role.PRODUCER, "app"), h.peer(2, Role.WORKER, "w")
    assert h.submit(producer, [{"n": 1}, {"n": 2}]) == {"job_ids": [1, 2]}
    h.dispatch.handle(worker, Reserve(id=7, queues=["q"], prefetch=10))
    assert worker.sent == [(7, {})]
    jobs = h.deliveries()[worker.session]
    assert [job[0] for job in jobs] == [1, 2]
    (first, first_token, *_), (second, second_token, *_) = jobs
    h.dispatch.started(worker, Started(items=[[first, first_token]]))
    h.dispatch.handle(worker, Complete(id=8, items=[[first, first_token, "done"]]))
    assert worker.last() == {"refused": []}
    h.dispatch.handle(worker, Fail(id=9, items=[[second, second_token, "ValueError", "boom"]]))
    assert worker.last() == {"refused": []}
    h.dispatch.handle(producer, JobInfo(id=10, job_id=first))
    assert producer.last()["job"]["state"] == "done"


def test_refusals_name_the_index_and_the_code() -> None:
    h = Harness()
    producer, worker = h.peer(1, Role.PRODUCER, "app"), h.peer(2, Role.WORKER, "w")
    (job_id,) = h.submit(producer, ["x"])["job_ids"]
    h.dispatch.handle(worker, Reserve(id=1, queues=["q"], prefetch=1))
    ((_, token, *_),) = h.deliveries()[worker.session]
    h.dispatch.handle(worker, Complete(id=2, items=[[job_id, token + 1, "r"], [job_id, token, "r"]]))
    assert worker.last() == {"refused": [[0, "lease_lost"]]}


def test_a_job_past_its_time_limit_on_the_fake_clock_is_lost_to_its_worker() -> None:
    h = Harness(heartbeat=1.0)
    producer, worker = h.peer(1, Role.PRODUCER, "app"), h.peer(2, Role.WORKER, "w")
    (job_id,) = h.submit(producer, ["x"], timeout=10.0)["job_ids"]
    h.dispatch.handle(worker, Reserve(id=1, queues=["q"], prefetch=1))
    ((_, token, *_),) = h.deliveries()[worker.session]
    h.dispatch.started(worker, Started(items=[[job_id, token]]))  # `now` from the dispatcher's clock
    h.clock.jump(10.0 + h.scheduler.time_limit_grace)
    h.scheduler.seen(worker.session, h.clock.now())
    h.scheduler.tick(h.clock.now())
    h.dispatch.handle(worker, Complete(id=2, items=[[job_id, token, "late"]]))
    assert worker.last() == {"refused": [[0, "lease_lost"]]}


def test_a_result_over_the_limit_fails_its_job_instead() -> None:
    h = Harness()
    producer, worker = h.peer(1, Role.PRODUCER, "app"), h.peer(2, Role.WORKER, "w")
    (job_id,) = h.submit(producer, ["x"], max_attempts=1)["job_ids"]
    h.dispatch.handle(worker, Reserve(id=1, queues=["q"], prefetch=1))
    ((_, token, *_),) = h.deliveries()[worker.session]
    h.dispatch.handle(worker, Complete(id=2, items=[[job_id, token, "r" * 200]]))
    assert worker.last() == {"refused": [[0, "result_too_large"]]}
    h.dispatch.handle(producer, JobInfo(id=3, job_id=job_id))
    assert producer.last()["job"]["state"] == "dead"


def test_errors_are_typed_replies_to_the_request() -> None:
    h = Harness()
    producer = h.peer(1, Role.PRODUCER, "app")
    refused = h.submit(producer, ["x" * 200])
    assert isinstance(refused, ErrorReply) and refused.code == "limit_exceeded" and "payload 0" in refused.message
    h.dispatch.handle(producer, Submit(id=42, queue="q", payloads=["x"], after_policy="sometimes"))
    assert producer.sent[-1][0] == 42 and producer.last().code == "invalid_request"
    h.dispatch.handle(producer, JobInfo(id=43, job_id=999))
    assert producer.last().code == "not_found"


def test_an_op_outside_the_role_is_forbidden() -> None:
    h = Harness()
    producer, worker = h.peer(1, Role.PRODUCER, "app"), h.peer(2, Role.WORKER, "w")
    h.dispatch.handle(producer, Reserve(id=5, queues=["q"], prefetch=1))
    assert producer.sent[-1][0] == 5
    assert producer.last().code == "forbidden" and "'app'" in producer.last().message
    h.dispatch.handle(worker, Stats(id=6))
    assert worker.last().code == "forbidden"
    h.dispatch.started(producer, Started(items=[]))  # a notice: the error carries no id
    assert producer.sent[-1][0] is None and producer.last().code == "forbidden"
    assert h.deliveries() == {}


def test_an_owner_sees_and_cancels_only_its_own_jobs() -> None:
    h = Harness()
    alice, bob = h.peer(1, Role.PRODUCER, "alice"), h.peer(2, Role.PRODUCER, "bob")
    admin = h.peer(3)
    (job_id,) = h.submit(alice, ["x"])["job_ids"]
    h.dispatch.handle(bob, JobInfo(id=1, job_id=job_id))
    assert bob.last().code == "not_found"
    h.dispatch.handle(bob, Cancel(id=2, job_ids=[job_id]))
    assert bob.last() == {"refused": [[0, "not_found"]]}
    h.dispatch.handle(admin, JobInfo(id=3, job_id=job_id))
    assert admin.last()["job"]["state"] == "pending"
    h.dispatch.handle(alice, Cancel(id=4, job_ids=[job_id]))
    assert alice.last() == {"refused": []}


def test_submits_are_refused_while_storage_fails() -> None:
    h = Harness(active=True)
    producer = h.peer(1, Role.PRODUCER, "app")
    h.durability.storage_error = StorageError("disk full")
    refused = h.submit(producer, ["x"])
    assert refused.code == "storage_unavailable" and "disk full" in refused.message
    assert not producer.needs_commit  # a refusal changes nothing, waits for nothing


def test_replies_that_tell_of_unwritten_changes_wait_for_the_commit() -> None:
    h = Harness(active=True)
    producer, worker = h.peer(1, Role.PRODUCER, "app"), h.peer(2, Role.WORKER, "w")
    h.durability.unwritten_jobs = {1}
    h.submit(producer, ["x"])
    assert producer.needs_commit
    producer.needs_commit = False
    h.dispatch.handle(producer, Watch(id=9, job_ids=[2]))  # not a job with unwritten changes
    assert not producer.needs_commit
    h.dispatch.handle(worker, Reserve(id=1, queues=["q"], prefetch=1))  # a worker's ack never waits
    assert not worker.needs_commit
    admin = h.peer(3)
    h.dispatch.handle(admin, QueuePurge(id=2, queue="q"))  # a change of its own: always waits
    assert admin.last() == {"purged": 1} and admin.needs_commit


def test_nothing_waits_in_memory() -> None:
    h = Harness(active=False)
    producer = h.peer(1, Role.PRODUCER, "app")
    h.durability.unwritten_jobs = {1}
    h.submit(producer, ["x"])
    assert not producer.needs_commit


def test_schedules_use_the_wall_clock_and_arm_the_ticker() -> None:
    h = Harness()
    admin = h.peer(1)
    h.dispatch.handle(
        admin, ScheduleSet(id=1, name="nightly", queue="q", payload={"n": 1}, cron=None, every=60.0, tz=None)
    )
    record = admin.last()
    assert record["name"] == "nightly" and h.ticker_armed == 1
    assert h.clock.wall() < record["next_tick"] <= h.clock.wall() + 60.0  # the fake wall clock's
    h.dispatch.handle(admin, ScheduleList(id=2))
    assert [s["name"] for s in admin.last()["schedules"]] == ["nightly"]


def test_ending_a_drain_asks_for_a_flush() -> None:
    h = Harness()
    admin = h.peer(1)
    h.dispatch.handle(admin, Drain(id=1, on=True))
    assert admin.last() == {"in_flight": 0} and h.flushes == 0
    h.dispatch.handle(admin, Drain(id=2, on=False))
    assert h.flushes == 1


def test_a_bug_in_a_handler_is_an_internal_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    admin = h.peer(1)

    def broken(now: float) -> dict[str, Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(h.scheduler, "stats", broken)
    h.dispatch.handle(admin, Stats(id=3))
    assert admin.sent == [(3, ErrorReply(id=3, code="internal", message="internal broker error"))]
