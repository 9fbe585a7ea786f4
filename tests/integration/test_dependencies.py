"""Jobs that run after others (`after`): chains and chords without a result backend, over a real
broker and a real worker process."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from jobbroker import Client, JobCancelled
from tests.helpers import SECRET, TIME_UNIT
from tests.integration import mytasks
from tests.integration.conftest import BrokerProcess, Process

TIMEOUT = 20 * TIME_UNIT


async def test_a_chain_of_three_hands_each_result_on(
    broker: BrokerProcess, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address, "flow", "mytasks")
    async with Client(broker.address, secret=SECRET) as client:
        first = await mytasks.double.submit(client, 20)
        second = await mytasks.plus_one_of_previous.options(after=(first,)).submit(client)
        third = await mytasks.plus_one_of_previous.options(after=(second,)).submit(client)
        assert await client.result(third, timeout=TIMEOUT) == 42
        assert [await client.result(i, timeout=TIMEOUT) for i in (first, second)] == [40, 41]


async def test_map_then_reduce(broker: BrokerProcess, start_worker: Callable[..., Process]) -> None:
    start_worker(broker.address, "flow", "mytasks")
    async with Client(broker.address, secret=SECRET) as client:
        parts = await mytasks.double.submit_many(client, [(n,) for n in range(10)])
        reduce = await mytasks.total.options(after=tuple(parts)).submit(client)
        assert (await client.job(reduce))["state"] in ("waiting", "pending", "leased", "done")
        assert await client.result(reduce, timeout=TIMEOUT) == sum(2 * n for n in range(10))


async def test_a_dependent_of_a_dead_job_is_cancelled_saying_why(
    broker: BrokerProcess, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address, "flow", "mytasks")
    async with Client(broker.address, secret=SECRET) as client:
        failing = await mytasks.broken.submit(client)
        after = await mytasks.total.options(after=(failing,)).submit(client)
        anyway = await mytasks.total.options(after=(failing,), after_policy="always").submit(client)
        with pytest.raises(JobCancelled):
            await client.result(after, timeout=TIMEOUT)
        error = (await client.job(after))["error"]
        assert error["type"] == "DependencyFailed" and f"job {failing}" in error["message"]
        assert await client.result(anyway, timeout=TIMEOUT) == 0  # ran, with no result to add
