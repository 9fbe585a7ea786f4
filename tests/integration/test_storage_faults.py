"""A disk that fails while the broker runs: no false acknowledgement, submits refused with a
typed error, and everything written once the disk works again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from broker import Broker, BrokerConfig
from broker.errors import StorageError
from broker.store import SqliteStore, WriteBatch
from client import Client, ConnectionClosed, StorageUnavailable
from tests.helpers import SECRET, TIME_UNIT


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
    stored = {job.payload: job.id for job in reopened.load(0.0, 0.0).jobs}
    reopened.close()
    assert stored["before"] == before and stored["after"] == after
    assert "during" in stored and "refused" not in stored  # written on retry: at least once
