"""client/connection.py against a broker in memory (tests/memory_broker.py): the handshake,
request/reply matching, loss failing what is pending, heartbeats, and the link's reconnects.
No sockets; no sleeping but the loop turns the client itself waits for."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Iterator

import pytest
from jobbroker.broker.errors import (
    AuthenticationFailed,
    BrokerUnreachable,
    ConnectionClosed,
    InvalidRequest,
    QueueFull,
)
from jobbroker.broker.protocol.messages import ErrorReply, JobInfo, Request, Stats
from jobbroker.client.connection import Connection, Link, backoff_delays, is_retryable

from tests.memory_broker import ADDRESS, SECRET, MemoryBroker, ServerSide

pytestmark = pytest.mark.timeout(10)


async def open_connection(broker: MemoryBroker, secret: bytes = SECRET) -> Connection:
    return await Connection.open("memory", 7878, secret, client="unit", dial=broker.dial, timeout=2.0)


async def test_the_handshake_authenticates_both_sides_and_takes_the_welcome() -> None:
    broker = MemoryBroker(heartbeat=7.0)
    connection = await open_connection(broker)
    assert (connection.session, connection.heartbeat) == (1, 7.0)
    side = broker.side
    assert side.authenticated is not None
    assert (side.authenticated.client, side.authenticated.credential) == ("unit", "default")
    connection.close()
    await connection.wait_closed()
    assert connection.is_closed


async def test_a_wrong_secret_is_refused_and_is_not_worth_retrying() -> None:
    broker = MemoryBroker()
    with pytest.raises(AuthenticationFailed) as refused:
        await open_connection(broker, secret=b"w" * 32)
    assert not is_retryable(refused.value)


async def test_replies_find_their_requests_whatever_their_order() -> None:
    held: list[Request] = []
    broker = MemoryBroker(answer=lambda side, request: held.append(request))
    connection = await open_connection(broker)
    first = connection.request(JobInfo, job_id=1)
    second = connection.request(JobInfo, job_id=2)
    third = connection.request(JobInfo, job_id=3)
    while len(held) < 3:
        await asyncio.sleep(0)
    side = broker.side
    assert [r.job_id for r in held] == [1, 2, 3]  # type: ignore[attr-defined]
    side.reply(held[2], job=3)
    side.refuse(held[0], QueueFull.code, "full")
    side.reply(held[1], job=2)
    assert await second == {"job": 2}
    assert await third == {"job": 3}
    with pytest.raises(QueueFull, match="full"):
        await first
    connection.close()


async def test_an_error_without_an_id_that_is_not_fatal_fails_nothing() -> None:
    held: list[Request] = []
    broker = MemoryBroker(answer=lambda side, request: held.append(request))
    connection = await open_connection(broker)
    pending = connection.request(Stats)
    while not held:
        await asyncio.sleep(0)
    broker.side.send(ErrorReply(id=None, code=InvalidRequest.code, message="odd frame"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not pending.done() and not connection.is_closed
    broker.side.reply(held[0], ok=1)
    assert await pending == {"ok": 1}
    connection.close()


async def test_loss_fails_every_pending_request_with_the_cause() -> None:
    broker = MemoryBroker(answer=lambda side, request: None)  # never answers
    connection = await open_connection(broker)
    pending = [connection.request(JobInfo, job_id=n) for n in range(3)]
    await asyncio.sleep(0)
    broker.side.drop()
    for future in pending:
        with pytest.raises(ConnectionClosed) as lost:
            await future
        assert isinstance(lost.value.cause, ConnectionResetError)
    closed = await connection.closed
    assert closed is lost.value  # one loss, one reason
    late = connection.request(Stats)  # after the loss: failed at once
    with pytest.raises(ConnectionClosed):
        await late


async def test_a_silent_broker_is_declared_dead_after_three_heartbeats() -> None:
    broker = MemoryBroker(heartbeat=0.01)
    connection = await open_connection(broker)
    broker.side.closed = True  # the broker stops sending anything: a hung peer
    reason = await asyncio.wait_for(connection.closed, 2.0)
    assert "missed heartbeats" in str(reason)


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    random.seed(12)
    delays = list(itertools.islice(backoff_delays(initial=0.05, factor=2.0, maximum=1.0), 10))
    ceilings = [min(0.05 * 2**n, 1.0) for n in range(10)]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # jittered: no two clients in step


class Recorder:
    """A backoff that records how often it was asked, and never makes the test wait."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self) -> Iterator[float]:
        while True:
            self.asked += 1
            yield 0.0


async def test_the_link_retries_an_unreachable_broker_with_backoff_when_asked_to_wait() -> None:
    broker = MemoryBroker()
    broker.refuse_next = 3
    backoff = Recorder()
    link = Link(ADDRESS, SECRET, client="unit", dial=broker.dial, backoff=backoff, wait_for_broker=True)
    connection = await link.get()
    assert broker.dials == ["refused", "refused", "refused", "open"]
    assert backoff.asked == 3  # one delay before each retry
    assert await link.get() is connection  # the live one, no new dial
    link.close()


async def test_a_broker_never_reached_fails_at_once_without_wait_for_broker() -> None:
    broker = MemoryBroker()
    broker.refuse_next = 1
    link = Link(ADDRESS, SECRET, client="unit", dial=broker.dial, backoff=Recorder())
    with pytest.raises(BrokerUnreachable, match="memory:7878"):
        await link.get()
    assert broker.dials == ["refused"]


async def test_the_link_gives_up_after_its_reconnect_timeout() -> None:
    broker = MemoryBroker()
    broker.refuse_next = 10**9
    link = Link(
        ADDRESS, SECRET, client="unit", dial=broker.dial, backoff=Recorder(), wait_for_broker=True, reconnect_timeout=0
    )
    with pytest.raises(BrokerUnreachable):
        await link.get()


async def test_a_refused_secret_is_not_retried_by_the_link() -> None:
    broker = MemoryBroker()
    link = Link(ADDRESS, b"w" * 32, client="unit", dial=broker.dial, backoff=Recorder(), wait_for_broker=True)
    with pytest.raises(AuthenticationFailed):
        await link.get()
    assert broker.dials == ["open"]


async def test_a_lost_connection_is_replaced_and_a_retryable_call_sent_again() -> None:
    answered: list[ServerSide] = []

    def answer(side: ServerSide, request: Request) -> None:
        if len(broker.sides) == 1:
            side.drop()  # the first connection breaks before its reply
        else:
            answered.append(side)
            side.reply(request, queues={})

    broker = MemoryBroker(answer=answer)
    connected: list[Connection] = []
    lost: list[ConnectionClosed] = []
    link = Link(
        ADDRESS,
        SECRET,
        client="unit",
        dial=broker.dial,
        backoff=Recorder(),
        on_connect=connected.append,
        on_lost=lost.append,
    )
    assert await link.call(Stats) == {"queues": {}}
    assert len(connected) == 2 and len(lost) == 1
    assert answered == [broker.sides[1]]
    assert broker.sides[1].requests(Stats)  # sent again on the new connection


async def test_a_call_without_retry_fails_with_its_connection() -> None:
    broker = MemoryBroker(answer=lambda side, request: side.drop())
    link = Link(ADDRESS, SECRET, client="unit", dial=broker.dial, backoff=Recorder())
    with pytest.raises(ConnectionClosed):
        await link.call(Stats, retry=False)
    assert len(broker.sides) == 1
    link.close()
    with pytest.raises(ConnectionClosed, match="closed by the client"):
        await link.call(Stats)
