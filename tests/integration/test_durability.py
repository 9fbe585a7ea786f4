"""No acknowledged job is lost when the broker is killed with -9 and restarted."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from jobbroker import Client, ConnectionClosed, StorageUnavailable, Worker, current_job
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import REPO, STUCK, BrokerProcess, Faults, Process, wait_until


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
    argv = [sys.executable, "-m", "jobbroker", "serve", "--port", "0", "--data-dir", str(data_dir)]
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


def _serve_briefly(data_dir: Path, secret_file: Path) -> subprocess.CompletedProcess[str]:
    """`serve` on a data directory it must refuse: bounded, in case it starts after all."""
    argv = [sys.executable, "-m", "jobbroker", "serve", "--port", "0", "--data-dir", str(data_dir)]
    argv += ["--secret-file", str(secret_file)]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10 * TIME_UNIT, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the broker started on a damaged data directory: {exc.stderr!r}") from None


def _recover(data_dir: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "jobbroker", "recover", "--data-dir", str(data_dir)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30 * TIME_UNIT, cwd=REPO)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
async def test_a_lost_write_ahead_log_is_refused_and_recover_starts_again_from_the_database(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], secret_file: Path, damage: str
) -> None:
    """Issue #11, defect 7: after kill -9, a deleted or truncated -wal file started the broker
    with the jobs since the last checkpoint gone, silently."""
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        ids = await client.submit_many("q", list(range(100)))
        ids.append(await client.submit("q", "last"))
    broker.signal(signal.SIGKILL)
    broker.wait()
    wal = data_dir / "jobs.sqlite3-wal"
    if damage == "deleted":
        wal.unlink()
    else:
        os.truncate(wal, wal.stat().st_size // 2)
    refused = _serve_briefly(data_dir, secret_file)
    assert refused.returncode == 2, refused.stderr
    assert "write-ahead log" in refused.stderr and "jobbroker recover" in refused.stderr

    recovered = _recover(data_dir)
    assert recovered.returncode == 0, recovered.stderr
    assert "salvaged" in recovered.stdout and "acknowledged commits" in recovered.stdout
    broker = start_broker(data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        assert await client.submit("q", "after") > max(ids)  # no id of an acknowledged job again


async def test_one_corrupt_row_is_refused_with_advice_and_recover_salvages_the_rest(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], secret_file: Path
) -> None:
    """Issue #11, defect 7: one corrupt row made the data directory unusable."""
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        ids = await client.submit_many("q", list(range(10)))
    broker.signal(signal.SIGKILL)
    broker.wait()
    with contextlib.closing(sqlite3.connect(data_dir / "jobs.sqlite3")) as db, db:
        db.execute("UPDATE jobs SET error = x'c1', state = 'dead' WHERE id = ?", (ids[4],))  # not msgpack
    refused = _serve_briefly(data_dir, secret_file)
    assert refused.returncode == 2 and "jobbroker recover" in refused.stderr, refused.stderr

    recovered = _recover(data_dir)
    assert recovered.returncode == 0, recovered.stderr
    assert "salvaged 9 jobs" in recovered.stdout and f"dropped 1 unreadable jobs: ids {ids[4]}" in recovered.stdout
    broker = start_broker(data_dir=data_dir)
    broker.wait_for_output(r"recovered 9 jobs")
    async with Client(broker.address, secret=SECRET) as client:
        assert (await client.job(ids[5]))["payload"] == 5
        assert await client.submit("q", "new") > max(ids)


async def test_history_across_random_kills_loses_nothing_reuses_no_id_and_undoes_no_result(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], faults: Faults
) -> None:
    """Producers and a worker log every acknowledgement, delivery, completion and result while
    the broker (its commits slowed to 20 ms) is killed with -9 at random moments and restarted;
    then: no acknowledged job lost, no id with two payloads, no result seen and then undone."""
    data_dir = tmp_path / "kept"
    faults.set(delay=0.02)
    broker = start_broker(data_dir=data_dir, faults=faults.path)
    loop = asyncio.get_running_loop()
    acknowledged: dict[int, str] = {}
    payloads: dict[int, set[str]] = defaultdict(set)  # every payload seen under an id
    deliveries: dict[int, list[float]] = defaultdict(list)  # job id -> when delivered
    completions: dict[int, str] = {}
    results: dict[int, tuple[Any, float]] = {}  # job id -> (result, when first seen)
    lost: dict[int, str] = {}

    async def handler(payload: str) -> str:
        job_id = current_job().id
        payloads[job_id].add(payload)
        deliveries[job_id].append(loop.time())
        completions[job_id] = payload + "!"
        return payload + "!"

    async def awaiting(client: Client, job_id: int) -> None:
        try:
            result = await client.result(job_id, timeout=60 * TIME_UNIT)
        except Exception as exc:  # an acknowledged job that is unknown, dead, or never ends
            lost[job_id] = repr(exc)
        else:
            results.setdefault(job_id, (result, loop.time()))

    watchers: list[asyncio.Task[None]] = []
    stop = asyncio.Event()

    async def producer(client: Client, name: str) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            payload = f"{name}-{n}"
            try:
                job_id = await client.submit("history", payload)
            except (ConnectionClosed, OSError, StorageUnavailable):
                await asyncio.sleep(0.05)  # the broker is down: try again when it is back
                continue
            acknowledged[job_id] = payload
            payloads[job_id].add(payload)
            watchers.append(asyncio.create_task(awaiting(client, job_id)))

    worker = Worker(
        broker.address, queues=["history"], handler=handler, secret=SECRET, prefetch=64, reconnect_timeout=20
    )
    working = asyncio.create_task(worker.run())
    rng = random.Random()
    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        producers = [asyncio.create_task(producer(client, name)) for name in ("a", "b", "c")]
        try:
            for _ in range(4):
                count = len(acknowledged)
                await wait_until(lambda count=count: _at_least(list(acknowledged), count + 200), what="traffic")
                await asyncio.sleep(rng.uniform(0.0, 0.5))  # a random moment of a busy stream
                broker.signal(signal.SIGKILL)
                broker.wait()
                broker = start_broker(port=broker.port, data_dir=data_dir, faults=faults.path)
            count = len(acknowledged)
            await wait_until(lambda: _at_least(list(acknowledged), count + 100), what="traffic after the kills")
            stop.set()
            await asyncio.gather(*producers)
            async with asyncio.timeout(30 * TIME_UNIT):
                await asyncio.gather(*watchers)
        finally:
            stop.set()
            worker.stop()
            await asyncio.wait_for(working, 10 * TIME_UNIT)
    assert not lost, f"acknowledged jobs lost: {dict(list(lost.items())[:10])}"
    assert set(results) >= set(acknowledged)
    reused = {i: seen for i, seen in payloads.items() if len(seen) > 1}
    assert not reused, f"ids that named two payloads: {dict(list(reused.items())[:10])}"
    undone = {i: when for i, (_, when) in results.items() if any(d > when for d in deliveries[i])}
    assert not undone, f"results seen, then undone (run again afterwards): {sorted(undone)[:10]}"
    for job_id, (result, _) in results.items():
        assert result == acknowledged.get(job_id, result[:-1]) + "!" == completions[job_id]
