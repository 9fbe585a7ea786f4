"""A disk that fails while the broker runs: no false acknowledgement, submits refused with a
typed error, and everything written once the disk works again."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from jobbroker.broker import Broker, BrokerConfig
from jobbroker.broker.core.scheduler import Scheduler
from jobbroker.broker.errors import StorageError, StorageFailed
from jobbroker.broker.store import IdCeilings, Recovered, SqliteStore, WriteBatch, serialize

from jobbroker import Client, ConnectionClosed, StorageUnavailable, Worker, current_job
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import BrokerProcess, Faults, wait_until


class FlakyStore(SqliteStore):
    """SQLite that fails every write while `failing` is set, as a full disk would."""

    failing = False

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        if self.failing:
            raise StorageError("cannot write to jobs.sqlite3: database or disk is full")
        super().write(batch, next_job_id)


async def test_failing_writes_withhold_acks_refuse_submits_and_recover(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "data")
    async with Broker(BrokerConfig(port=0), SECRET, store=store) as broker:
        address = f"127.0.0.1:{broker.port}"
        async with Client(address, secret=SECRET, reconnect_timeout=5) as client:
            before = await client.submit("q", "before")
            store.failing = True
            with pytest.raises(ConnectionClosed):
                await client.submit("q", "during")  # accepted in memory, never acknowledged
            with pytest.raises(StorageUnavailable, match="disk is full"):
                await client.submit("q", "refused")
            assert (await client.job(before))["state"] == "pending"  # reads still work
            store.failing = False

            async def accepted() -> int | None:
                try:
                    return await client.submit("q", "after")
                except StorageUnavailable:
                    return None

            async with asyncio.timeout(10 * TIME_UNIT):
                while (after := await accepted()) is None:
                    await asyncio.sleep(0.2)
    reopened = SqliteStore(tmp_path / "data")
    stored = {msgpack.unpackb(job.payload): job.id for job in reopened.load(0.0, 0.0).jobs}
    reopened.close()
    assert stored["before"] == before and stored["after"] == after
    assert "during" in stored and "refused" not in stored  # written on retry: at least once


# --- real broker processes whose disk is slow, fills or fails (tests/integration/faults.py) ---


async def _workers_ready(client: Client) -> bool:
    return bool((await client.stats())["workers"])


async def test_a_job_is_not_run_before_its_creation_is_stored_nor_its_id_reused(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], faults: Faults
) -> None:
    """Issue #11, defect 2: a job delivered before its creation was committed ran, and after a
    crash its id named another job."""
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir, faults=faults.path)
    payloads: dict[int, set[str]] = defaultdict(set)  # job id -> every payload seen under it
    delivered = asyncio.Event()

    async def handler(payload: str) -> str:
        payloads[current_job().id].add(payload)
        delivered.set()
        return payload

    worker = Worker(broker.address, queues=["q"], handler=handler, secret=SECRET, reconnect_timeout=20 * TIME_UNIT)
    running = asyncio.create_task(worker.run())
    try:
        async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
            await wait_until(lambda: _workers_ready(client), what="the worker")
            faults.set(delay=10)  # a disk that takes 10 s to fsync
            begun = faults.count("begin")
            submitted = asyncio.create_task(client.submit("q", "A"))
            await faults.wait_for("begin", begun)  # the commit that stores A is under way
            # A delivery now would be the defect; nothing else is to be awaited.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(delivered.wait(), 1.0 * TIME_UNIT)
            broker.signal(signal.SIGKILL)
            broker.wait()
            (outcome,) = await asyncio.gather(submitted, return_exceptions=True)
            assert isinstance(outcome, ConnectionClosed | OSError), f"acknowledged before stored: {outcome}"
            assert not payloads, f"a job ran before its creation was stored: {dict(payloads)}"
            faults.set()
            broker = start_broker(port=broker.port, data_dir=data_dir, faults=faults.path)
            job_b = await client.submit("q", "B")
            payloads[job_b].add("B")
            assert await client.result(job_b, timeout=20 * TIME_UNIT) == "B"
    finally:
        worker.stop()
        await asyncio.wait_for(running, 10 * TIME_UNIT)
    assert all(len(seen) == 1 for seen in payloads.values()), f"an id named two jobs: {dict(payloads)}"


async def test_results_withheld_during_a_disk_full_outage_stay_withheld_when_watched_again(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], faults: Faults
) -> None:
    """Issue #11, defect 1: a producer that reconnected during a disk-full outage and watched
    its jobs again got results that existed in memory only; a kill -9 undid them."""
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir, faults=faults.path)
    seen: dict[int, Any] = {}
    ran: list[int] = []

    async def handler(payload: str) -> str:
        ran.append(current_job().id)
        return payload * 2  # results of 8 KB: the jobs' rows must grow, on a disk that cannot

    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        ids = await client.submit_many("q", ["x" * 4096] * 20)
        faults.set(quota=True)  # from now on the database cannot grow

        async def watch(job_id: int) -> None:
            seen[job_id] = await client.result(job_id, timeout=60 * TIME_UNIT)

        watching = [asyncio.create_task(watch(job_id)) for job_id in ids]
        worker = Worker(broker.address, queues=["q"], handler=handler, secret=SECRET, reconnect_timeout=5)
        running = asyncio.create_task(worker.run())
        try:
            await wait_until(lambda: _at_least(ran, len(ids)), what="the jobs to run")  # delivered: they are stored
            failed = faults.count("failed")
            # Each failed commit closes the producer's connection; it reconnects and watches
            # again. Two retries (1 s apart) give the re-watch every chance to be answered.
            await faults.wait_for("failed", failed + 2)
            broker.signal(signal.SIGKILL)
            broker.wait()
        finally:
            worker.stop()
            await asyncio.wait_for(running, 10 * TIME_UNIT)
            for task in watching:
                task.cancel()
            await asyncio.gather(*watching, return_exceptions=True)
        faults.set()
        broker = start_broker(port=broker.port, data_dir=data_dir)
        for job_id, result in seen.items():
            info = await client.job(job_id)
            assert (info["state"], info["result"]) == ("done", result), f"job {job_id}: a result seen, then undone"


async def _at_least(items: list[Any], count: int) -> bool:
    return len(items) >= count


async def test_a_job_reply_never_tells_a_state_that_is_not_committed(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], faults: Faults
) -> None:
    """Issue #11, defect 5: `job show` said done while the completion was not committed."""
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir, faults=faults.path)
    ran = asyncio.Event()

    async def handler(payload: int) -> int:
        ran.set()
        return payload + 1

    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        job_id = await client.submit("q", 41)
        faults.set(delay=10)
        begun = faults.count("begin")
        worker = Worker(broker.address, queues=["q"], handler=handler, secret=SECRET, reconnect_timeout=5)
        running = asyncio.create_task(worker.run())
        told: dict[str, Any] | None = None
        try:
            await asyncio.wait_for(ran.wait(), 10 * TIME_UNIT)
            await faults.wait_for("begin", begun)  # the completion's commit is under way
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                told = await asyncio.wait_for(client.job(job_id), 1.0 * TIME_UNIT)
            broker.signal(signal.SIGKILL)
            broker.wait()
        finally:
            worker.stop()
            await asyncio.wait_for(running, 10 * TIME_UNIT)
        faults.set()
        broker = start_broker(port=broker.port, data_dir=data_dir)
        after = await client.job(job_id)
        assert told is None or told["state"] == after["state"], f"told {told['state']}, then {after['state']}"


async def test_a_failed_fsync_stops_the_broker_instead_of_retrying(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], faults: Faults
) -> None:
    """Issue #11, defect 7: an fsync error was retried and later reported as success."""
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir, faults=faults.path)
    async with Client(broker.address, secret=SECRET, reconnect_timeout=1) as client:
        before = await client.submit("q", "before")
        faults.set(fail="fsync")
        with pytest.raises(ConnectionClosed):
            await client.submit("q", "during")
    assert broker.wait() == 2
    assert "stopping the broker" in broker.output() and "SQLITE_IOERR" not in broker.output()
    assert "disk I/O error" in broker.output()
    faults.set()
    broker = start_broker(port=broker.port, data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        assert (await client.job(before))["state"] == "pending"


class CeilingStore(SqliteStore):
    """Stored lease tokens end 3 above the first, and no write succeeds (a full disk): the
    ceiling cannot be raised in time."""

    full = False

    def load(self, now: float, wall: float) -> Recovered:
        recovered = super().load(now, wall)
        recovered.ceilings = IdCeilings(recovered.next_token + 3, recovered.ceilings.session)
        self.full = True
        return recovered

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        if self.full:
            raise StorageError("cannot write to jobs.sqlite3: database or disk is full")
        super().write(batch, next_job_id)


async def test_no_lease_token_above_the_stored_ceiling_is_handed_out(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "data")
    scheduler = Scheduler(track_changes=True)
    scheduler.open_session(1, 0.0)
    scheduler.submit(1, "q", [msgpack.packb(n) for n in range(10)], 0.0)
    store.load(0.0, 0.0)
    store.write(serialize(scheduler.take_changes(), 0.0, 0.0), scheduler.next_job_id)
    store.close()
    delivered: list[int] = []

    async def handler(payload: int) -> int:
        delivered.append(current_job().token)
        return payload

    broker = Broker(BrokerConfig(port=0), SECRET, store=CeilingStore(tmp_path / "data"))
    await broker.start()
    worker = Worker(f"127.0.0.1:{broker.port}", queues=["q"], handler=handler, secret=SECRET, reconnect_timeout=0.5)
    running = asyncio.create_task(worker.run())
    try:
        with pytest.raises(StorageFailed, match="beyond the stored ceiling"):
            await asyncio.wait_for(broker.wait_closed(), 10 * TIME_UNIT)
    finally:
        worker.stop()
        await asyncio.wait_for(running, 10 * TIME_UNIT)
    assert delivered == []  # the broker stopped before any of those tokens left it
