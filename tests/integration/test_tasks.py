"""Tasks by name over a real broker and a real worker process serving a module of tasks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from jobbroker import Client, JobDead, task
from tests.helpers import SECRET, TIME_UNIT
from tests.integration import mytasks
from tests.integration.conftest import BrokerProcess, Process

TIMEOUT = 20 * TIME_UNIT


@pytest.fixture
def math_worker(broker: BrokerProcess, start_worker: Callable[..., Process]) -> Process:
    # `jobbroker worker mytasks`: every task of the module, on the queues the tasks name.
    return start_worker(broker.address, "math", "mytasks")


async def test_tasks_are_submitted_and_run_by_name(broker: BrokerProcess, math_worker: Process) -> None:
    async with Client(broker.address, secret=SECRET) as client:
        assert mytasks.add(2, 3) == 5  # still a plain function here
        job_id = await mytasks.add.submit(client, 2, 3)
        assert await client.result(job_id, timeout=TIMEOUT) == 5
        assert await mytasks.mul.submit(client, 6, b=7) == job_id + 1
        assert await client.result(job_id + 1, timeout=TIMEOUT) == 42
        assert await mytasks.add.map(client, [(1, 1), (2, 2), (3, 3)], timeout=TIMEOUT) == [2, 4, 6]
        delayed = await mytasks.add.options(delay=0.2, priority=5).submit(client, 10, 20)
        assert await client.result(delayed, timeout=TIMEOUT) == 30
        # Another language submits the documented payload by hand:
        raw = await client.submit("math", {"task": "mul", "args": [3], "kwargs": {"b": 3}})
        assert await client.result(raw, timeout=TIMEOUT) == 9


async def test_calls_that_cannot_work_fail_at_once_without_retries(broker: BrokerProcess, math_worker: Process) -> None:
    async with Client(broker.address, secret=SECRET) as client:
        unknown = await client.submit("math", {"task": "nope", "args": []}, max_attempts=5)
        wrong_args = await mytasks.add.submit(client, 1, 2, 3)
        malformed = await client.submit("math", [1, 2], max_attempts=5)
        for job_id, error_type in ((unknown, "UnknownTask"), (wrong_args, "TypeError"), (malformed, "BadTaskPayload")):
            with pytest.raises(JobDead) as dead:
                await client.result(job_id, timeout=TIMEOUT)
            assert dead.value.error["type"] == error_type
            assert (await client.job(job_id))["attempts"] == 1
        with pytest.raises(JobDead, match="no task named 'nope' on this worker"):
            await client.result(unknown, timeout=TIMEOUT)


async def test_retry_and_fail_from_the_handler(broker: BrokerProcess, math_worker: Process) -> None:
    async with Client(broker.address, secret=SECRET) as client:
        flaky = await mytasks.flaky.submit(client, "m")
        assert await client.result(flaky, timeout=TIMEOUT) == "done on attempt 3"
        info = await client.job(flaky)
        assert info["attempts"] == 3 and info["error"]["type"] == "Retry"
        refused = await mytasks.refuse.submit(client, "bad data")
        with pytest.raises(JobDead) as dead:
            await client.result(refused, timeout=TIMEOUT)
        assert dead.value.error["type"] == "Fail" and dead.value.error["message"] == "bad data"
        assert (await client.job(refused))["attempts"] == 1


async def test_retry_on_and_no_retry(broker: BrokerProcess, math_worker: Process) -> None:
    async with Client(broker.address, secret=SECRET) as client:
        strict = await mytasks.strict.submit(client, 7)
        retried = await mytasks.picky.submit(client, "connection")
        not_listed = await mytasks.picky.submit(client, "key")
        for job_id, attempts in ((strict, 1), (retried, 3), (not_listed, 1)):
            with pytest.raises(JobDead):
                await client.result(job_id, timeout=TIMEOUT)
            assert (await client.job(job_id))["attempts"] == attempts


async def test_tasks_in_a_process_pool(broker: BrokerProcess, start_worker: Callable[..., Process]) -> None:
    start_worker(broker.address, "math", "mytasks", "--executor", "process")
    async with Client(broker.address, secret=SECRET) as client:
        assert await mytasks.add.map(client, [(n, n) for n in range(20)], timeout=TIMEOUT) == [2 * n for n in range(20)]


def test_task_decorator_forms(tmp_path: Path) -> None:
    @task
    def bare(x: int) -> int:
        return x

    @task(name="renamed", queue="q2", max_attempts=4, timeout=9.0)
    async def configured(x: int) -> int:
        return x

    assert bare.name == "bare" and bare.queue == "default" and bare(4) == 4
    assert configured.name == "renamed" and configured.queue == "q2"
    assert configured.default_options.submit_options()["timeout"] == 9.0
    assert configured.options(delay=3).options.delay == 3
