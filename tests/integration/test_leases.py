"""Leases follow the worker (docs/protocol.md, "Leases"): a live worker never loses a job for
lack of time, a buffered job uses no attempt, time limits end runaway attempts, the handler
hears when its job is taken back, and failures leave a trace. Real broker, real workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jobbroker.broker.errors import JobCancelled, JobDead

from jobbroker import Client
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import HEARTBEAT, REPO, BrokerProcess, Process, wait_until

LEASE = 0.5  # seconds: every long job below runs at least three times this


async def running_job(client: Client, job_id: int) -> dict[str, Any] | None:
    """The job's entry in some worker's running list, once its worker has started it."""
    for worker in (await client.stats())["workers"]:
        for job in worker["running"]:
            if job["id"] == job_id and job["started"]:
                return job
    return None


@pytest.mark.parametrize(
    ("handler", "executor"),
    [
        ("handlers:square", "thread"),
        ("handlers:square", "process"),
        ("handlers:async_sleepy_square", "thread"),
    ],
)
async def test_a_job_three_times_its_lease_completes_once_on_a_live_worker(
    broker: BrokerProcess, start_worker: Callable[..., Process], handler: str, executor: str
) -> None:
    worker = start_worker(broker.address, "squares", handler, "--executor", executor, env={"HANDLER_SLEEP": "1.5"})
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("squares", 7, lease=LEASE)
        assert await client.result(job_id, timeout=20 * TIME_UNIT) == 49
        info = await client.job(job_id)
    assert info["attempts"] == 1 and info["state"] == "done"
    assert "refused" not in worker.output() and "requeued" not in broker.output()


async def test_a_buffered_job_uses_no_attempt_until_it_starts(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    release = tmp_path / "release"
    start_worker(
        broker.address,
        "slow",
        "handlers:halfway",
        "--concurrency",
        "1",
        "--prefetch",
        "2",
        env={"HANDLER_RELEASE": str(release)},
    )
    async with Client(broker.address, secret=SECRET) as client:
        first, second = await client.submit_many("slow", ["a", "b"], lease=LEASE)
        await wait_until(lambda: running_job(client, first), what="the first job to start")
        await asyncio.sleep(3 * LEASE)  # longer than any lease: nothing may expire meanwhile
        buffered = await client.job(second)
        assert buffered["state"] == "leased" and buffered["attempts"] == 0 and buffered["started"] is False
        assert (await client.job(first))["attempts"] == 1
        release.touch()
        assert [await client.result(i, timeout=20 * TIME_UNIT) for i in (first, second)] == ["a", "b"]
        assert [(await client.job(i))["attempts"] for i in (first, second)] == [1, 1]


async def test_a_frozen_worker_loses_its_job_within_three_heartbeats_and_its_handler_is_told(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    handler_log = tmp_path / "handler.log"
    env = {"HANDLER_SLEEP": "2", "HANDLER_LOG": str(handler_log)}
    frozen = start_worker(broker.address, "squares", "handlers:sleepy_square_told", env=env)
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("squares", 5)
        await wait_until(lambda: running_job(client, job_id), what="the job to start")
        frozen.signal(signal.SIGSTOP)
        stopped_at = asyncio.get_running_loop().time()
        try:
            # Declared dead after 3 silent heartbeat intervals: the job goes back at once.
            async def requeued() -> bool:
                return (await client.job(job_id))["state"] == "pending"

            await wait_until(requeued, timeout=3 * HEARTBEAT + 2.0, what="the job to be requeued")
            assert asyncio.get_running_loop().time() - stopped_at < 3 * HEARTBEAT * TIME_UNIT + 1.5
            start_worker(broker.address, "squares", "handlers:sleepy_square_told", env=env)
            assert await client.result(job_id, timeout=20 * TIME_UNIT) == 25
        finally:
            frozen.signal(signal.SIGCONT)
        frozen.wait_for_output(r"lost the broker at 127\.0\.0\.1:\d+")
        await wait_until(lambda: _lines(handler_log, 2), what="the frozen handler to finish")
        info = await client.job(job_id)
    lines = sorted(handler_log.read_text().splitlines())
    assert lines == [f"{job_id} 1 lease_lost=True", f"{job_id} 2 lease_lost=False"]
    assert info["attempts"] == 2 and info["result"] == 25


async def _lines(path: Path, count: int) -> bool:
    return path.exists() and len(path.read_text().splitlines()) >= count


@pytest.mark.parametrize(
    ("handler", "executor"),
    [
        ("handlers:runaway_once", "thread"),
        ("handlers:runaway_once", "process"),
        ("handlers:async_runaway_once", "thread"),
    ],
)
async def test_a_time_limit_ends_a_runaway_attempt_and_the_retry_runs(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path, handler: str, executor: str
) -> None:
    marker = tmp_path / "ran-once"
    worker = start_worker(broker.address, "runaway", handler, "--executor", executor, "--concurrency", "1")
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("runaway", str(marker), timeout=1.0, backoff=0.1)
        assert await client.result(job_id, timeout=30 * TIME_UNIT) == "second attempt"
        info = await client.job(job_id)
    assert info["attempts"] == 2 and info["error"]["type"] == "TimeLimitExceeded"
    worker.wait_for_output(rf"job {job_id} \(queue runaway\) attempt 1 failed: TimeLimitExceeded")
    if executor == "process":  # its process was killed, not left running
        pid = int(marker.read_text())
        await wait_until(lambda: _gone(pid), what=f"the runaway process {pid} to be killed")


async def _gone(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status  # killed, not yet reaped


async def test_a_worker_default_time_limit_applies_to_jobs_without_their_own(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    marker = tmp_path / "ran-once"
    start_worker(broker.address, "runaway", "handlers:async_runaway_once", "--timeout", "1")
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("runaway", str(marker), backoff=0.1)
        assert await client.result(job_id, timeout=30 * TIME_UNIT) == "second attempt"


async def test_a_failing_handler_leaves_its_traceback_and_a_log_line(
    broker: BrokerProcess, start_worker: Callable[..., Process], secret_file: Path
) -> None:
    worker = start_worker(broker.address, "fragile", "handlers:fail_always")
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("fragile", "bad input", max_attempts=1)
        with pytest.raises(JobDead) as dead:
            await client.result(job_id, timeout=20 * TIME_UNIT)
    error = dead.value.error
    assert error["type"] == "ValueError" and error["message"] == "cannot handle 'bad input'"
    assert "handlers.py" in error["traceback"] and "in fail_always" in error["traceback"]
    assert "client/worker.py" not in error["traceback"]  # the worker's own frames are left out
    assert "ValueError: cannot handle 'bad input'" in str(dead.value)
    worker.wait_for_output(rf"job {job_id} \(queue fragile\) attempt 1 failed: ValueError: cannot handle 'bad input'")
    shown = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jobbroker", "job", "show", str(job_id), "--connect", broker.address],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "JOBBROKER_SECRET_FILE": str(secret_file)},
    )
    assert shown.returncode == 0, shown.stderr
    assert "ValueError: cannot handle 'bad input'" in shown.stdout
    assert "Traceback (most recent call last):" in shown.stdout and "in fail_always" in shown.stdout


async def test_cancelling_a_running_job_stops_its_handler(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    handler_log = tmp_path / "handler.log"
    worker = start_worker(
        broker.address, "forever", "handlers:async_forever", "--concurrency", "1", env={"HANDLER_LOG": str(handler_log)}
    )
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("forever", "first")
        await wait_until(lambda: running_job(client, job_id), what="the job to start")
        await client.cancel(job_id)
        with pytest.raises(JobCancelled):
            await client.result(job_id, timeout=10 * TIME_UNIT)
        await wait_until(lambda: _lines(handler_log, 1), what="the handler to be cancelled")
        assert handler_log.read_text() == "cancelled first\n"
        # The slot is free again: the next job starts on this one-slot worker.
        next_id = await client.submit("forever", "second")
        await wait_until(lambda: running_job(client, next_id), what="the next job to start")
    worker.wait_for_output(rf"job {job_id} \(queue forever\) taken back while running: cancelled")
    assert "refused" not in worker.output()


async def test_a_worker_with_every_slot_stuck_hands_its_buffered_jobs_back(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    released = tmp_path / "released"
    released.touch()
    stuck = start_worker(
        broker.address,
        "slow",
        "handlers:halfway",
        "--concurrency",
        "1",
        "--prefetch",
        "3",
        "--hand-back-after",
        "1",
        env={"HANDLER_RELEASE": str(tmp_path / "never")},
    )
    async with Client(broker.address, secret=SECRET) as client:
        await wait_until(lambda: _has_worker(client), what="the stuck worker")
        first, *others = await client.submit_many("slow", ["a", "b", "c"])
        await wait_until(lambda: running_job(client, first), what="the first job to start")
        start_worker(broker.address, "slow", "handlers:halfway", env={"HANDLER_RELEASE": str(released)})
        results = [await client.result(i, timeout=20 * TIME_UNIT) for i in others]
        assert results == ["b", "c"]
        assert [(await client.job(i))["attempts"] for i in others] == [1, 1]
        assert (await client.job(first))["state"] == "leased"  # still running on the stuck worker
    stuck.wait_for_output(r"every handler slot busy for 1s: handing 2 waiting jobs back")


async def _has_worker(client: Client) -> bool:
    return bool((await client.stats())["workers"])


# --- found by an outside review of the promises above ---------------------------------------


async def test_current_job_in_a_process_handler_is_the_running_job(
    broker: BrokerProcess, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address, "who", "handlers:job_identity", "--executor", "process", "--concurrency", "1")
    async with Client(broker.address, secret=SECRET) as client:
        ids = [await client.submit("who", n) for n in range(4)]
        assert [await client.result(i, timeout=20 * TIME_UNIT) for i in ids] == [[i, 1] for i in ids]


async def test_a_failure_whose_text_is_not_utf8_still_fails_the_job(
    broker: BrokerProcess, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address, "odd", "handlers:raise_surrogate")
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("odd", 1, max_attempts=1)
        with pytest.raises(JobDead) as dead:
            await client.result(job_id, timeout=20 * TIME_UNIT)
    assert dead.value.error["message"] == "bad \\udcff surrogate"


async def test_a_coroutine_that_swallows_its_time_limit_does_not_complete(
    broker: BrokerProcess, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address, "stubborn", "handlers:swallow_cancel")
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("stubborn", 1, timeout=0.5, max_attempts=1)
        with pytest.raises(JobDead) as dead:
            await client.result(job_id, timeout=20 * TIME_UNIT)
    assert dead.value.error["type"] == "TimeLimitExceeded"


async def test_an_abandoned_thread_handler_sees_its_job_is_lost(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    noticed = tmp_path / "noticed"
    start_worker(broker.address, "abandoned", "handlers:notice_lost")
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("abandoned", str(noticed), timeout=0.5, max_attempts=1)
        with pytest.raises(JobDead):
            await client.result(job_id, timeout=20 * TIME_UNIT)
        await wait_until(lambda: _exists(noticed), what="the handler to notice")
    assert noticed.read_text() == "noticed"


async def _exists(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


async def test_a_worker_killed_with_9_leaves_no_handler_process(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    pid_file = tmp_path / "pid"
    worker = start_worker(broker.address, "doomed", "handlers:pid_then_sleep", "--executor", "process")
    async with Client(broker.address, secret=SECRET) as client:
        await client.submit("doomed", str(pid_file))
        await wait_until(lambda: _exists(pid_file), what="the handler process")
    handler_pid = int(pid_file.read_text())
    worker.signal(signal.SIGKILL)
    await wait_until(lambda: _gone(handler_pid), what=f"handler process {handler_pid} to die with its worker")


async def test_a_stopped_worker_exits_without_waiting_for_an_abandoned_thread(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    marker = tmp_path / "ran-once"
    worker = start_worker(broker.address, "runaway", "handlers:runaway_once", "--grace", "1")
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("runaway", str(marker), timeout=0.5, backoff=0.1)
        assert await client.result(job_id, timeout=20 * TIME_UNIT) == "second attempt"
    worker.signal(signal.SIGTERM)  # the first attempt's thread sleeps on for a minute
    assert await asyncio.to_thread(worker.wait, 10) == 0
