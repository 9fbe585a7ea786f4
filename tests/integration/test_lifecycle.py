"""The job lifecycle through a real broker process and real worker processes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from jobbroker import (
    Client,
    InvalidState,
    JobCancelled,
    JobDead,
    JobNotFound,
    QueueFull,
    ResultTimeout,
    SyncClient,
    UsageError,
    Worker,
    current_job,
)
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import STUCK, BrokerProcess, Process, wait_until


async def test_classic_master_and_two_workers(
    broker: BrokerProcess, client: Client, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address)
    start_worker(broker.address)
    ids = [await client.submit("squares", n) for n in range(10)]
    results = [await client.result(job_id, timeout=20 * TIME_UNIT) for job_id in ids]
    assert results == [n * n for n in range(10)]
    stats = await client.stats()
    assert stats["queues"]["squares"]["done"] == 10


async def test_thousands_of_jobs_none_lost_none_duplicated(
    broker: BrokerProcess, client: Client, start_worker: Callable[..., Process]
) -> None:
    for _ in range(3):
        start_worker(broker.address, "many", "handlers:whoami", "--concurrency", "8")
    payloads = list(range(6000))
    mapped = await client.map("many", payloads[:5000], timeout=60 * TIME_UNIT)
    singles = await asyncio.gather(*(client.submit("many", n) for n in payloads[5000:]))
    single_results = await asyncio.gather(*(client.result(i, timeout=60 * TIME_UNIT) for i in singles))
    results = mapped + list(single_results)
    assert [payload for _, payload in results] == payloads
    assert len({pid for pid, _ in results}) >= 2  # the work was shared
    queue = (await client.stats())["queues"]["many"]
    assert queue["done"] == 6000 and queue["submitted"] == 6000
    assert queue["pending"] == queue["in_flight"] == queue["dead"] == 0


async def test_kill_9_of_a_worker_holding_jobs(
    broker: BrokerProcess, client: Client, start_worker: Callable[..., Process]
) -> None:
    doomed = start_worker(broker.address, "squares", "handlers:square", "--concurrency", "4", env=STUCK)
    ids = await client.submit_many("squares", [1, 2, 3, 4])

    async def held() -> bool:
        workers = (await client.stats())["workers"]
        return any(len(w["in_flight"]) == 4 for w in workers)

    await wait_until(held, what="the doomed worker to hold 4 jobs")
    start_worker(broker.address)
    await asyncio.sleep(0.2)
    killed_at = time.monotonic()
    doomed.signal(signal.SIGKILL)
    results = await asyncio.gather(*(client.result(i, timeout=20 * TIME_UNIT) for i in ids))
    assert results == [1, 4, 9, 16]
    assert time.monotonic() - killed_at < (3 * 0.5 + 3.0) * TIME_UNIT  # 3 heartbeats, and slack for a busy machine
    assert [(await client.job(i))["attempts"] for i in ids] == [2, 2, 2, 2]
    broker.wait_for_output(r"worker session \d+ \(worker-1\) lost holding 4 jobs")


async def test_a_silent_worker_is_declared_dead_after_three_heartbeats(
    broker: BrokerProcess, client: Client, start_worker: Callable[..., Process]
) -> None:
    frozen = start_worker(broker.address, "squares", "handlers:square", "--concurrency", "2", env=STUCK)
    ids = await client.submit_many("squares", [5, 6])

    async def held() -> bool:
        return any(len(w["in_flight"]) == 2 for w in (await client.stats())["workers"])

    await wait_until(held, what="the worker to hold 2 jobs")
    start_worker(broker.address)
    frozen.signal(signal.SIGSTOP)  # alive, connected, silent
    stopped_at = time.monotonic()
    results = await asyncio.gather(*(client.result(i, timeout=20 * TIME_UNIT) for i in ids))
    elapsed = time.monotonic() - stopped_at
    assert results == [25, 36]
    assert 2 * 0.5 <= elapsed < (3 * 0.5 + 3.0) * TIME_UNIT
    broker.wait_for_output(r"missed its heartbeats")


async def test_retries_then_dead_letter_then_requeue(
    broker: BrokerProcess, client: Client, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address, "fragile", "handlers:fail_always")
    job_id = await client.submit("fragile", {"n": 1}, max_attempts=3, backoff=0.05)
    with pytest.raises(JobDead) as info:
        await client.result(job_id, timeout=20 * TIME_UNIT)
    assert {k: info.value.error[k] for k in ("type", "message")} == {
        "type": "ValueError",
        "message": "cannot handle {'n': 1}",
    }
    assert "in fail_always" in info.value.error["traceback"]
    (dead,) = await client.dead_letters("fragile")
    assert dead["id"] == job_id and dead["attempts"] == 3 and dead["payload"] == {"n": 1}
    assert await client.requeue_dead("fragile") == 1

    async def dead_again() -> bool:
        return len(await client.dead_letters("fragile")) == 1

    await wait_until(dead_again, what="the requeued job to die again")
    assert (await client.job(job_id))["attempts"] == 3
    assert (await client.stats())["queues"]["fragile"]["failed"] == 6


async def test_priority_order_and_delay(broker: BrokerProcess, client: Client) -> None:
    seen: list[str] = []

    async def record(payload: str) -> str:
        seen.append(payload)
        return payload

    submitted_at = time.monotonic()  # before: the delay runs from the broker's receipt
    delayed = await client.submit("ordered", "delayed-but-urgent", priority=100, delay=0.5)
    await client.submit("ordered", "low-1", priority=0)
    await client.submit("ordered", "high", priority=10)
    await client.submit("ordered", "low-2", priority=0)
    await client.submit("ordered", "mid", priority=5)
    worker = Worker(broker.address, secret=SECRET, queues=["ordered"], handler=record, concurrency=1, prefetch=1)
    running = asyncio.create_task(worker.run())
    try:
        await client.result(delayed, timeout=10 * TIME_UNIT)
        assert time.monotonic() - submitted_at >= 0.5
        assert seen == ["high", "mid", "low-1", "low-2", "delayed-but-urgent"]
    finally:
        worker.stop()
        await running


async def test_result_timeout_and_cancel(client: Client) -> None:
    job_id = await client.submit("nobody-listens", "x")
    with pytest.raises(ResultTimeout):
        await client.result(job_id, timeout=0.2)
    await client.cancel(job_id)
    with pytest.raises(JobCancelled):
        await client.result(job_id, timeout=5)
    with pytest.raises(InvalidState):
        await client.cancel(job_id)
    assert (await client.job(job_id))["state"] == "cancelled"
    with pytest.raises(JobNotFound):
        await client.result(10**9, timeout=5)


async def test_queue_full(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker("--max-pending", "5")
    async with Client(broker.address, secret=SECRET) as client:
        await client.submit_many("bounded", range(5))
        with pytest.raises(QueueFull, match="limit is 5"):
            await client.submit("bounded", 6)
        assert (await client.stats())["queues"]["bounded"]["pending"] == 5


async def test_idempotent_submit(client: Client) -> None:
    first = await client.submit("orders", {"order": 1}, key="order-1")
    again = await client.submit("orders", {"order": 1}, key="order-1")
    assert first == again
    assert (await client.stats())["queues"]["orders"]["submitted"] == 1


async def test_worker_stops_gracefully_on_sigterm(
    broker: BrokerProcess, client: Client, start_worker: Callable[..., Process]
) -> None:
    worker = start_worker(
        broker.address, "squares", "handlers:square", "--concurrency", "2", env={"HANDLER_SLEEP": "1"}
    )
    ids = await client.submit_many("squares", range(6))

    async def busy() -> bool:
        return any(len(w["in_flight"]) > 0 for w in (await client.stats())["workers"])

    await wait_until(busy, what="the worker to start")
    worker.signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    done = (await client.stats())["queues"]["squares"]
    assert done["in_flight"] == 0 and done["done"] >= 2 and done["done"] + done["pending"] == 6
    start_worker(broker.address)
    assert await asyncio.gather(*(client.result(i, timeout=20 * TIME_UNIT) for i in ids)) == [n * n for n in range(6)]
    assert [(await client.job(i))["attempts"] for i in ids] == [1] * 6  # handed back, not failed


async def test_broker_stops_cleanly_on_sigterm(broker: BrokerProcess) -> None:
    broker.signal(signal.SIGTERM)
    assert broker.wait(10) == 0
    assert "broker closed" in broker.output()


async def test_client_reconnects_when_the_broker_comes_back(start_broker: Callable[..., BrokerProcess]) -> None:
    first = start_broker()
    async with Client(first.address, secret=SECRET, reconnect_timeout=15 * TIME_UNIT) as client:
        await client.stats()
        first.signal(signal.SIGKILL)
        first.wait()
        await asyncio.sleep(0.1)  # the client sees the loss while idle
        second = start_broker(port=first.port)
        assert second.port == first.port
        job_id = await client.submit("after-restart", 1)
        assert (await client.job(job_id))["state"] == "pending"


async def test_a_long_handler_keeps_its_lease_by_touching(broker: BrokerProcess, client: Client) -> None:
    async def slow_double(n: int) -> int:
        job = current_job()
        for _ in range(6):  # 1.2 s of work under a 0.5 s lease
            await asyncio.sleep(0.2)
            await job.touch(0.5)
        return n * 2

    def which_job(n: int) -> list[int]:
        job = current_job()  # in a pool thread too
        return [job.id, job.attempt]

    job_id = await client.submit("long", 21, lease=0.5)
    other_id = await client.submit("threads", 0)
    workers = [
        Worker(broker.address, secret=SECRET, queues=["long"], handler=slow_double, concurrency=1),
        Worker(broker.address, secret=SECRET, queues=["threads"], handler=which_job, concurrency=1),
    ]
    running = [asyncio.create_task(w.run()) for w in workers]
    try:
        assert await client.result(job_id, timeout=10 * TIME_UNIT) == 42
        assert (await client.job(job_id))["attempts"] == 1  # never expired, never redelivered
        assert await client.result(other_id, timeout=10 * TIME_UNIT) == [other_id, 1]
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*running)
    with pytest.raises(UsageError):
        current_job()


async def test_waiting_on_more_results_than_one_request_may_carry(broker: BrokerProcess, client: Client) -> None:
    ids = await client.submit_many("wide", range(6000)) + await client.submit_many("wide", range(6000, 12_000))

    async def double(n: int) -> int:
        return 2 * n

    worker = Worker(broker.address, secret=SECRET, queues=["wide"], handler=double, concurrency=64)
    running = asyncio.create_task(worker.run())
    try:  # 12,000 result() calls in one loop turn: watched in requests under the batch limit
        results = await asyncio.gather(*(client.result(i, timeout=60 * TIME_UNIT) for i in ids))
    finally:
        worker.stop()
        await running
    assert results == [2 * n for n in range(12_000)]


def test_sync_client_for_plain_scripts(
    broker: BrokerProcess, start_worker: Callable[..., Process], capsys: pytest.CaptureFixture[str]
) -> None:
    start_worker(broker.address)
    with SyncClient(broker.address, secret=SECRET) as client:
        job_ids = client.submit_many("squares", range(5))
        assert [client.result(job_id, timeout=20 * TIME_UNIT) for job_id in job_ids] == [0, 1, 4, 9, 16]
        assert client.map("squares", [6, 7], timeout=20 * TIME_UNIT, progress=True) == [36, 49]
        assert "results [" not in capsys.readouterr().err  # not a terminal: no bar (test_cli checks one)
        assert client.stats()["queues"]["squares"]["done"] == 7
        with pytest.raises(JobNotFound):
            client.job(10**9)
    with pytest.raises(RuntimeError, match="closed"):
        client.stats()


async def test_progress_reports_reach_the_producer(broker: BrokerProcess, client: Client) -> None:
    async def steps(n: int) -> int:
        job = current_job()
        for step in range(1, 4):
            await asyncio.sleep(0.1)
            job.report_progress(step / 3, f"step {step}")
        await asyncio.sleep(0.1)
        return n

    def threaded(n: int) -> int:
        current_job().report_progress(0.5, "half way, from a thread")
        time.sleep(0.2)
        return n

    job_id = await client.submit("steps", 7)
    other_id = await client.submit("threaded", 8)
    followed = [asyncio.create_task(_collect(client, job_id)), asyncio.create_task(_collect(client, other_id))]
    await asyncio.sleep(0.2)  # the producers follow before the work starts
    workers = [
        Worker(broker.address, secret=SECRET, queues=["steps"], handler=steps),
        Worker(broker.address, secret=SECRET, queues=["threaded"], handler=threaded),
    ]
    running = [asyncio.create_task(w.run()) for w in workers]
    try:
        reports, other_reports = await asyncio.wait_for(asyncio.gather(*followed), 20 * TIME_UNIT)
        assert [(round(r.fraction, 2), r.message) for r in reports] == [
            (0.33, "step 1"),
            (0.67, "step 2"),
            (1.0, "step 3"),
        ]
        assert [r.message for r in other_reports] == ["half way, from a thread"]
        assert await client.result(job_id, timeout=5) == 7
        assert (await client.job(job_id))["progress"] == {"fraction": 1.0, "message": "step 3"}
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*running)


async def _collect(client: Client, job_id: int) -> list[Any]:
    return [report async for report in client.progress(job_id)]


async def test_a_worker_whose_broker_is_gone_stops_when_asked(broker: BrokerProcess, client: Client) -> None:
    worker = Worker(broker.address, secret=SECRET, queues=["squares"], handler=lambda n: n * n)
    running = asyncio.create_task(worker.run())

    async def registered() -> bool:
        return len((await client.stats())["workers"]) == 1

    await wait_until(registered, what="the worker to connect")
    broker.signal(signal.SIGKILL)
    await asyncio.sleep(0.5)  # the worker is now trying to reconnect (for up to an hour)
    worker.stop()
    await asyncio.wait_for(running, 5 * TIME_UNIT)
