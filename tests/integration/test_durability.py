"""No acknowledged job is lost when the broker is killed with -9 and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from client import Client, ConnectionClosed
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import REPO, STUCK, BrokerProcess, Process, wait_until


def restart(start_broker: Callable[..., BrokerProcess], old: BrokerProcess, data_dir: Path) -> BrokerProcess:
    old.signal(signal.SIGKILL)
    old.wait()
    return start_broker(port=old.port, data_dir=data_dir)


async def test_submitted_jobs_survive_kill_9(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        ids = await client.submit_many("squares", range(200))
        delayed = await client.submit("squares", 1000, delay=0.5)
        broker = restart(start_broker, broker, data_dir)
        broker.wait_for_output(r"recovered 201 jobs")
        start_worker(broker.address)
        results = await asyncio.gather(*(client.result(i, timeout=30 * TIME_UNIT) for i in [*ids, delayed]))
        assert results == [n * n for n in range(200)] + [1_000_000]


async def test_leased_jobs_are_delivered_again_after_a_crash(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    stuck = start_worker(broker.address, "squares", "handlers:square", "--concurrency", "3", env=STUCK)
    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        ids = await client.submit_many("squares", [2, 3, 4])

        async def held() -> bool:
            return any(len(w["in_flight"]) == 3 for w in (await client.stats())["workers"])

        await wait_until(held, what="3 leased jobs")
        stuck.signal(signal.SIGKILL)
        broker = restart(start_broker, broker, data_dir)
        start_worker(broker.address)
        assert await asyncio.gather(*(client.result(i, timeout=30 * TIME_UNIT) for i in ids)) == [4, 9, 16]
        # Leases live in memory: the attempts that the crash cut short are not counted.
        assert [(await client.job(i))["attempts"] for i in ids] == [1, 1, 1]


async def test_every_acknowledged_submit_survives_a_crash_mid_stream(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess]
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    acknowledged: list[int] = []

    async def producer(client: Client, first: int) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            for n in range(first, first + 100_000):
                acknowledged.append(await client.submit("stream", n))

    async with Client(broker.address, secret=SECRET, reconnect_timeout=1) as client:
        producers = [asyncio.create_task(producer(client, k * 1_000_000)) for k in range(8)]
        await wait_until(lambda: _at_least(acknowledged, 2000), what="a few thousand acknowledged submits")
        broker.signal(signal.SIGKILL)
        await asyncio.wait(producers, timeout=10 * TIME_UNIT)
    count = len(acknowledged)
    assert count >= 2000
    broker.wait()
    broker = start_broker(port=broker.port, data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        stats = (await client.stats())["queues"]["stream"]
        assert stats["pending"] >= count
        for job_id in acknowledged[-50:] + acknowledged[:50]:
            assert (await client.job(job_id))["state"] == "pending"


async def _at_least(items: list[int], count: int) -> bool:
    return len(items) >= count


async def test_results_and_idempotency_keys_survive_a_restart(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    start_worker(broker.address)
    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        job_id = await client.submit("squares", 12, key="order-12")
        assert await client.result(job_id, timeout=20 * TIME_UNIT) == 144
        broker = restart(start_broker, broker, data_dir)
        assert await client.result(job_id, timeout=20 * TIME_UNIT) == 144
        assert await client.submit("squares", 12, key="order-12") == job_id


async def test_a_waiting_producer_gets_its_result_across_a_restart(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        job_id = await client.submit("squares", 9)
        waiting = asyncio.create_task(client.result(job_id, timeout=30 * TIME_UNIT))
        await asyncio.sleep(0.2)
        broker = restart(start_broker, broker, data_dir)
        start_worker(broker.address)
        assert await waiting == 81


def test_corrupt_database_refuses_to_start_with_a_clear_error(tmp_path: Path, secret_file: Path) -> None:
    data_dir = tmp_path / "bad"
    data_dir.mkdir()
    (data_dir / "jobs.sqlite3").write_bytes(b"garbage" * 1000)
    result = _serve_once(data_dir, secret_file)
    assert result.returncode == 2 and "corrupt" in result.stderr


def test_second_broker_on_the_same_data_dir_refuses(tmp_path: Path, secret_file: Path, broker: BrokerProcess) -> None:
    result = _serve_once(tmp_path / "data-1", secret_file)
    assert result.returncode == 2 and "in use by another broker" in result.stderr


def test_unusable_data_dir_is_a_clear_error(tmp_path: Path, secret_file: Path) -> None:
    (tmp_path / "file").write_text("")
    result = _serve_once(tmp_path / "file" / "data", secret_file)
    assert result.returncode == 2 and "cannot create data directory" in result.stderr


def _serve_once(data_dir: Path, secret_file: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "broker", "serve", "--port", "0", "--data-dir", str(data_dir)]
    argv += ["--secret-file", str(secret_file)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30 * TIME_UNIT, cwd=REPO)


async def test_memory_mode_says_so(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker("--memory")
    broker.wait_for_output(r"in memory only")


@pytest.mark.parametrize("mode", ["interval", "never"])
async def test_fsync_modes_keep_acknowledged_jobs_across_kill_9(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], mode: str
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker("--fsync", mode, data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        ids = await client.submit_many("q", range(50))
    broker = restart(start_broker, broker, data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        assert (await client.job(ids[-1]))["state"] == "pending"
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_running_worker_reconnects_when_the_broker_comes_back(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    worker = start_worker(broker.address)
    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        assert await client.result(await client.submit("squares", 3), timeout=20 * TIME_UNIT) == 9
        broker = restart(start_broker, broker, data_dir)
        await asyncio.sleep(0.1)  # the client sees the old connection gone before it submits
        job_id = await client.submit("squares", 4)
        assert await client.result(job_id, timeout=20 * TIME_UNIT) == 16  # the same worker, reconnected
    assert worker.popen.poll() is None
    assert re.search(r"lost the broker at 127.0.0.1:\d+ .*; reconnecting", worker.output())
