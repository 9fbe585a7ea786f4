"""Clients follow the leader (issue 15; docs/protocol.md, "Standbys"): address lists, the
rotation order, backoff, and not_leader in a welcome or in a reply. The brokers here are
small fakes on loopback built on broker.protocol's ServerConnection: a standby that answers
every request not_leader, a leader that answers every request ok, one that hangs up."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from jobbroker.broker.errors import (
    BrokerUnreachable,
    ConfigError,
    ConnectionClosed,
    NotLeader,
    Unacknowledged,
    broker_error,
)
from jobbroker.broker.protocol.connection import ClientConnection, ServerConnection, State
from jobbroker.broker.protocol.messages import (
    Complete,
    Deliver,
    ErrorReply,
    Fail,
    Reply,
    Request,
    Reserve,
    Stats,
    Submit,
    Watch,
    Welcome,
    decode,
    encode,
)
from jobbroker.client.connection import Link, Rotation, backoff_delays, default_address, parse_addresses

from jobbroker import Client
from tests.helpers import SECRET, TIME_UNIT, connected_pair, credentials

# --- addresses -------------------------------------------------------------------------


def test_addresses_from_a_comma_list_a_list_or_both() -> None:
    assert parse_addresses("h1:7878") == ["h1:7878"]
    assert parse_addresses("h1:7878,h2:7879") == ["h1:7878", "h2:7879"]
    assert parse_addresses(" h1:7878 , h2:7879 ") == ["h1:7878", "h2:7879"]
    assert parse_addresses(["h1:7878", "h2:7879,h3:1"]) == ["h1:7878", "h2:7879", "h3:1"]
    assert parse_addresses("h1:1,h2:2,h1:1") == ["h1:1", "h2:2"]  # repeats dropped, order kept
    assert parse_addresses("[::1]:7878,:7879") == ["[::1]:7878", "127.0.0.1:7879"]


@pytest.mark.parametrize("bad", ["", "h1", "h1:7878,", "h1:7878,,h2:1", "h1:port", []])
def test_a_bad_address_is_a_config_error_naming_it(bad: Any) -> None:
    with pytest.raises(ConfigError):
        parse_addresses(bad)


def test_the_environment_may_name_several_brokers() -> None:
    environ = {"JOBBROKER_CONNECT": "h1:7878,h2:7878", "JOBBROKER_PORT": "9000"}
    assert parse_addresses(default_address(environ)) == ["h1:7878", "h2:7878"]


def test_client_and_worker_take_a_list_or_a_comma_string() -> None:
    from jobbroker import Worker

    client = Client("127.0.0.1:1,127.0.0.1:2", secret=SECRET)
    assert client._link.addresses == ["127.0.0.1:1", "127.0.0.1:2"]
    worker = Worker(["127.0.0.1:1", "127.0.0.1:2"], secret=SECRET, queues=["q"], handler=print)
    assert worker._link.addresses == ["127.0.0.1:1", "127.0.0.1:2"]


# --- rotation ----------------------------------------------------------------------------


def _round(rotation: Rotation) -> list[str]:
    return list(iter(rotation.next, None))


def test_a_round_tries_every_address_once_in_order() -> None:
    rotation = Rotation(["a:1", "b:1", "c:1"])
    assert _round(rotation) == ["a:1", "b:1", "c:1"]
    assert rotation.next() is None  # the round is over until new_round()
    rotation.new_round()
    assert _round(rotation) == ["a:1", "b:1", "c:1"]


def test_after_a_connection_the_next_search_starts_with_the_following_address() -> None:
    rotation = Rotation(["a:1", "b:1", "c:1"])
    assert rotation.next() == "a:1"
    rotation.connected("a:1")
    rotation.new_search()  # a:1 was lost: its machine may be gone, try b first
    assert _round(rotation) == ["b:1", "c:1", "a:1"]
    rotation.connected("c:1")
    rotation.new_search()
    assert _round(rotation) == ["a:1", "b:1", "c:1"]


def test_a_named_leader_goes_first_even_if_not_listed_and_once_a_round() -> None:
    rotation = Rotation(["a:1", "b:1", "c:1"])
    assert rotation.next() == "a:1"
    rotation.follow("c:1")  # a:1 was a standby naming c:1
    assert rotation.next() == "c:1"
    rotation.follow("a:1")  # c:1 names a:1 back: tried this round, not again (no ping-pong)
    rotation.follow("z:9")  # ...or a leader nobody listed
    assert _round(rotation) == ["z:9", "b:1"]
    rotation.connected("z:9")  # unlisted: the list's order is unchanged
    rotation.new_search()
    assert _round(rotation) == ["a:1", "b:1", "c:1"]


def test_the_search_keeps_each_address_last_failure() -> None:
    rotation = Rotation(["a:1", "b:1"])
    rotation.failed("a:1", ConnectionRefusedError(111, "Connection refused"))
    rotation.failed("b:1", NotLeader("not the leader", None))
    assert not rotation.hung_up
    rotation.failed("b:1", ConnectionClosed("hung up"), hung_up=True)
    assert set(rotation.errors) == {"a:1", "b:1"} and rotation.hung_up
    rotation.new_search()
    assert rotation.errors == {} and not rotation.hung_up


def test_unreachable_names_every_address_and_why() -> None:
    error = BrokerUnreachable(
        "a:1,b:1",
        tried={"a:1": ConnectionRefusedError(111, "Connection refused"), "b:1": NotLeader("no", "c:1")},
    )
    assert str(error) == (
        "cannot reach the broker at any of a:1, b:1 (a:1: connection refused; b:1: a standby, naming the leader c:1)"
    )
    assert isinstance(error, ConnectionClosed) and set(error.tried) == {"a:1", "b:1"}
    single = BrokerUnreachable("a:1", ConnectionRefusedError(111, "Connection refused"))
    assert str(single) == "cannot reach the broker at a:1: connection refused"  # as before


def test_backoff_is_jittered_exponential_and_capped() -> None:
    delays = list(itertools.islice(backoff_delays(initial=0.1, factor=2.0, maximum=1.0), 12))
    ceilings = [min(0.1 * 2**step, 1.0) for step in range(12)]
    assert all(ceiling / 2 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True))
    assert len({round(d, 9) for d in delays[6:]}) > 1  # jittered, not the same instant for all


# --- the wire --------------------------------------------------------------------------


def test_not_leader_carries_the_leader_on_the_wire() -> None:
    reply = decode(encode(ErrorReply(id=7, code="not_leader", message="a standby", leader="h2:7878")))
    assert reply == ErrorReply(id=7, code="not_leader", message="a standby", leader="h2:7878")
    error = broker_error(reply.code, reply.message, reply.leader)
    assert isinstance(error, NotLeader) and error.leader == "h2:7878" and error.code == "not_leader"
    # A peer of before: no leader field at all.
    old = decode(b"\x84\xa2op\xa5error\xa2id\x07\xa4code\xaanot_leader\xa7message\xa1x")
    assert isinstance(old, ErrorReply) and old.leader is None


def test_a_standby_names_the_leader_in_its_welcome() -> None:
    client = ClientConnection(SECRET, client="test")
    standby = ServerConnection(credentials(), session=2, heartbeat=5.0, leader="h1:7878")
    client.initiate()
    events: list[Any] = []
    while data := client.data_to_send():
        standby.receive_data(data)
        events += client.receive_data(standby.data_to_send())
    assert client.state is State.OPEN
    [welcome] = [e for e in events if isinstance(e, Welcome)]
    assert welcome.leader == "h1:7878"
    _, leader = connected_pair()
    assert leader.leader is None  # the leader's welcome names none


# --- fakes on loopback -----------------------------------------------------------------


class FakeBroker:
    """Handshakes like a broker; then answers each request as `answer` says: "ok", "standby"
    (not_leader naming `leader`) or "hang up" (closes without answering, once; then ok)."""

    def __init__(self, answer: str, *, leader: str | None = None, welcome_leader: str | None = None) -> None:
        self.answer = answer
        self.leader = leader
        self.welcome_leader = welcome_leader
        self.requests: list[Request] = []
        self.deliver: list[list[Any]] = []  # jobs pushed after the first reserve
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.address = ""

    async def start(self, port: int = 0) -> FakeBroker:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        protocol = ServerConnection(credentials(), session=self.connections, heartbeat=5.0, leader=self.welcome_leader)
        try:
            while protocol.state is not State.CLOSED:
                data = await reader.read(65536)
                if not data:
                    return
                for event in protocol.receive_data(data):
                    if not isinstance(event, Request):
                        continue
                    self.requests.append(event)
                    if self.answer == "standby":
                        protocol.send(ErrorReply(id=event.id, code="not_leader", message="standby", leader=self.leader))
                    elif self.answer == "hang up":
                        self.answer = "ok"
                        return
                    else:
                        reply: dict[str, Any] = {"from": self.address}
                        if isinstance(event, Submit):
                            reply = {"job_ids": [len(self.requests)] * len(event.payloads)}
                        elif isinstance(event, Complete | Fail):  # stale tokens, as after a takeover
                            reply = {"refused": [[index, "lease_lost"] for index in range(len(event.items))]}
                        protocol.send(Reply(id=event.id, data=reply))
                        if isinstance(event, Reserve) and self.deliver:
                            protocol.send(Deliver(jobs=self.deliver))  # type: ignore[arg-type]
                            self.deliver = []
                writer.write(protocol.data_to_send())
        finally:
            writer.close()


@pytest.fixture
async def fakes() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeBroker] = []

    async def start(answer: str, **options: Any) -> FakeBroker:
        fake = await FakeBroker(answer, **options).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        await fake.stop()


async def _dead_address() -> str:
    """A loopback port nothing listens on (bound, then released)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return f"127.0.0.1:{port}"


def _link(addresses: str | list[str], **options: Any) -> Link:
    return Link(addresses, SECRET, client="test", **options)


async def test_a_dead_address_first_is_skipped(fakes: Callable[..., Any]) -> None:
    leader = await fakes("ok")
    link = _link(f"{await _dead_address()},{leader.address}")
    async with asyncio.timeout(5 * TIME_UNIT):
        assert (await link.call(Stats))["from"] == leader.address
    assert link.address == leader.address
    link.close()


async def test_no_broker_at_any_address_fails_fast_naming_each() -> None:
    first, second = await _dead_address(), await _dead_address()
    link = _link([first, second])
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable) as failed:
        await link.get()
    assert time.monotonic() - started < 1.0 * TIME_UNIT  # no retries for a wrong address
    assert first in str(failed.value) and second in str(failed.value)
    assert set(failed.value.tried) == {first, second}


async def test_a_welcome_naming_the_leader_moves_before_any_request(fakes: Callable[..., Any]) -> None:
    leader = await fakes("ok")
    standby = await fakes("standby", leader=leader.address, welcome_leader=leader.address)
    link = _link(standby.address)  # the leader is not even listed
    assert (await link.call(Stats))["from"] == leader.address
    assert standby.requests == [] and len(leader.requests) == 1
    link.close()


async def test_a_request_refused_not_leader_is_sent_again_to_the_leader(fakes: Callable[..., Any]) -> None:
    leader = await fakes("ok")
    standby = await fakes("standby", leader=leader.address)  # says nothing in its welcome
    link = _link(standby.address)
    assert (await link.call(Submit, queue="q", payloads=[1], retry=False))["job_ids"] == [1]
    assert [type(r) for r in standby.requests] == [Submit] and len(leader.requests) == 1
    link.close()


async def test_a_standby_that_knows_no_leader_sends_us_to_the_next_address(fakes: Callable[..., Any]) -> None:
    leader = await fakes("ok")
    standby = await fakes("standby", leader=None)
    link = _link([standby.address, leader.address])
    results = await asyncio.gather(*(link.call(Stats) for _ in range(5)))  # pipelined on the standby
    assert {r["from"] for r in results} == {leader.address}
    assert len(leader.requests) == 5
    link.close()


async def test_with_no_leader_anywhere_it_backs_off_then_gives_up(fakes: Callable[..., Any]) -> None:
    standbys = [await fakes("standby", leader=None) for _ in range(2)]
    link = _link([s.address for s in standbys], reconnect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match="a standby, no leader known"):
        await link.call(Stats)
    assert 0.9 < time.monotonic() - started < 3 * TIME_UNIT
    connections = sum(s.connections for s in standbys)
    # Rounds of two, with jittered backoff (0.05 s doubling to 5 s) between: a handful, not
    # the thousands a loop without backoff would make in a second.
    assert 2 <= connections <= 20, connections


async def test_a_submit_without_keys_lost_before_its_ack_raises_unacknowledged(fakes: Callable[..., Any]) -> None:
    broker = await fakes("hang up")
    async with Client(broker.address, secret=SECRET, reconnect_timeout=5.0) as client:
        with pytest.raises(Unacknowledged, match="may or may not have been stored"):
            await client.submit("q", "x")
        assert len(broker.requests) == 1  # not sent twice
        broker.answer = "hang up"
        assert await client.submit("q", "x", key="k1") == 3  # with a key: sent again
        assert len(broker.requests) == 3


async def test_a_worker_on_a_standby_that_names_no_leader_reserves_on_the_next(fakes: Callable[..., Any]) -> None:
    from jobbroker import Worker

    leader = await fakes("ok")
    standby = await fakes("standby", leader=None)
    worker = Worker([standby.address, leader.address], secret=SECRET, queues=["q"], handler=print)
    running = asyncio.create_task(worker.run())

    async def reserved_on_the_leader() -> None:
        while not any(isinstance(r, Reserve) for r in leader.requests):
            await asyncio.sleep(0.01)

    try:
        async with asyncio.timeout(5 * TIME_UNIT):
            await reserved_on_the_leader()
    finally:
        worker.stop()
        await running
    assert [type(r) for r in standby.requests] == [Reserve]  # refused once, then left


async def test_awaited_results_are_watched_again_on_the_leader(fakes: Callable[..., Any]) -> None:
    leader = await fakes("ok")
    standby = await fakes("standby", leader=leader.address)
    async with Client([standby.address], secret=SECRET, reconnect_timeout=5.0) as client:
        waiting = asyncio.create_task(client.result(42, timeout=5.0))
        await asyncio.sleep(0)

        async def watched_on_the_leader() -> None:
            while not any(isinstance(r, Watch) and 42 in r.job_ids for r in leader.requests):
                await asyncio.sleep(0.01)

        async with asyncio.timeout(5 * TIME_UNIT):
            await watched_on_the_leader()
        waiting.cancel()


async def test_answers_refused_as_stale_cost_one_log_line_and_the_worker_goes_on(
    fakes: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """After a takeover a worker's old lease tokens are refused (lease_lost): the worker logs
    the batch in one line, does not count them as done, and keeps running."""
    from jobbroker import Worker

    broker = await fakes("ok")
    broker.deliver = [[job_id, 7, "q", job_id, 1, 30.0, None, None] for job_id in range(1, 31)]

    async def handler(payload: int) -> int:
        return payload

    worker = Worker(broker.address, secret=SECRET, queues=["q"], handler=handler, concurrency=30)
    running = asyncio.create_task(worker.run())

    async def answered() -> None:
        while sum(len(r.items) for r in broker.requests if isinstance(r, Complete)) < 30:
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.INFO, logger="jobbroker.worker"):
        async with asyncio.timeout(5 * TIME_UNIT):
            await answered()
            while worker.completed:  # the refusals arrive just after
                await asyncio.sleep(0.01)
        assert not running.done()
        worker.stop()
        await running
    refusals = [r.getMessage() for r in caplog.records if "answers refused" in r.getMessage()]
    batches = [r for r in broker.requests if isinstance(r, Complete)]
    assert len(refusals) == len(batches), refusals  # one line a batch (one batch a loop turn)
    counts = [int(re.search(r"for (\d+) jobs", line).group(1)) for line in refusals]  # type: ignore[union-attr]
    assert sum(counts) == 30
