"""client/worker.py and client/client.py against a broker in memory (tests/memory_broker.py):
a delivery reaches the handler, and its outcome goes back as complete or fail; a client's
submit options reach the wire as given."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from jobbroker.broker.protocol.messages import Complete, Deliver, Fail, Request, Reserve, Submit
from jobbroker.client.client import Client
from jobbroker.client.worker import Worker

from jobbroker import Retry
from tests.memory_broker import ADDRESS, SECRET, MemoryBroker, ServerSide

pytestmark = pytest.mark.timeout(10)


def answers(side: ServerSide, request: Request) -> None:
    """Reply as the broker would to what a worker or a client sends here."""
    if isinstance(request, Complete | Fail):
        side.reply(request, refused=[])
    elif isinstance(request, Submit):
        side.reply(request, job_ids=list(range(1, len(request.payloads) + 1)))
    else:
        side.reply(request)


async def until(predicate: Any, what: str) -> None:
    """Loop turns until the predicate holds (each turn moves bytes one hop)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def test_a_delivery_runs_the_handler_and_its_outcome_goes_back() -> None:
    broker = MemoryBroker(answer=answers)
    seen: list[Any] = []

    async def handler(payload: Any) -> Any:
        seen.append(payload)
        if payload == "bad":
            raise ValueError("no good")
        if payload == "later":
            raise Retry(delay=7)
        return {"doubled": payload * 2}

    worker = Worker(ADDRESS, secret=SECRET, queues=["q"], handler=handler, concurrency=2, dial=broker.dial)
    running = asyncio.create_task(worker.run())
    await until(lambda: broker.sides and broker.side.requests(Reserve), "reserve")
    side = broker.side
    (reserve,) = side.requests(Reserve)
    assert (reserve.queues, reserve.prefetch) == (["q"], 4)

    side.send(Deliver(jobs=[[1, 11, "q", 21, 1, 30.0, None, None], [2, 12, "q", "bad", 2, 30.0, None, None]]))
    await until(lambda: side.requests(Complete) and side.requests(Fail), "complete and fail")
    assert [list(item) for r in side.requests(Complete) for item in r.items] == [[1, 11, {"doubled": 42}]]
    (failure,) = [item for r in side.requests(Fail) for item in r.items]
    assert failure[:4] == [2, 12, "ValueError", "no good"] and "ValueError" in failure[4]
    assert failure[5:] == [False, None]  # retried as the job says, after its backoff

    side.send(Deliver(jobs=[[3, 13, "q", "later", 1, 30.0, None, None]]))
    await until(lambda: len(side.requests(Fail)) == 2, "the retry")
    retry = side.requests(Fail)[1].items[0]
    assert retry[:3] == [3, 13, "Retry"] and retry[6] == 7.0
    assert seen == [21, "bad", "later"]
    assert (worker.completed, worker.failed) == (1, 2)

    worker.stop()
    await asyncio.wait_for(running, 5)


async def test_a_worker_reserves_again_on_a_new_connection() -> None:
    broker = MemoryBroker(answer=answers)
    worker = Worker(ADDRESS, secret=SECRET, queues=["q"], handler=lambda p: p, executor="inline", dial=broker.dial)
    running = asyncio.create_task(worker.run())
    await until(lambda: broker.sides and broker.side.requests(Reserve), "reserve")
    broker.side.drop()
    await until(lambda: len(broker.sides) == 2 and broker.side.requests(Reserve), "reserve again")
    worker.stop()
    await asyncio.wait_for(running, 5)


async def test_submit_options_reach_the_wire_as_given() -> None:
    broker = MemoryBroker(answer=answers)
    async with Client(ADDRESS, secret=SECRET, dial=broker.dial) as client:
        ids = await client.submit_many(
            "q", [1, 2], priority=5, delay=2, max_attempts=4, timeout=9, result_ttl=60, after=[7], keys=["a", None]
        )
        single = await client.submit("q", 3, backoff=0.5, max_backoff=8, after_policy="always", after=[1])
    assert ids == [1, 2] and single == 1
    many, one = broker.side.requests(Submit)
    assert (many.queue, many.payloads, many.priority, many.delay, many.max_attempts) == ("q", [1, 2], 5, 2.0, 4)
    assert (many.timeout, many.result_ttl, many.after, many.keys) == (9.0, 60.0, [7], ["a", None])
    assert (one.backoff, one.max_backoff, one.after, one.after_policy, one.priority) == (0.5, 8.0, [1], "always", 0)
