"""Payloads that msgpack cannot carry: a serializer for both sides, and a typed error for one
bad submit that leaves the others alone."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import uuid
from typing import Any

import pytest
from jobbroker.client.serializers import MsgpackSerializer

from jobbroker import Client, SyncClient, UnencodablePayload, Worker, task
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import BrokerProcess

TIMEOUT = 20 * TIME_UNIT


async def test_a_serializer_carries_standard_types_both_ways(broker: BrokerProcess) -> None:
    serializer = MsgpackSerializer()

    def describe(payload: dict[str, Any]) -> dict[str, Any]:
        return {
            "next_day": payload["day"] + datetime.timedelta(days=1),
            "types": [type(v).__name__ for v in payload.values()],
            "pair": payload["pair"],
        }

    payload = {
        "day": datetime.date(2026, 11, 23),
        "at": datetime.datetime(2026, 11, 23, 9, 30, tzinfo=datetime.UTC),
        "id": uuid.UUID(int=7),
        "price": decimal.Decimal("9.99"),
        "pair": (1, 2),
    }
    worker = Worker(broker.address, secret=SECRET, queues=["typed"], handler=describe, serializer=serializer)
    running = asyncio.create_task(worker.run())
    try:
        async with Client(broker.address, secret=SECRET, serializer=serializer) as client:
            result = await client.result(await client.submit("typed", payload), timeout=TIMEOUT)
    finally:
        worker.stop()
        await running
    assert result == {
        "next_day": datetime.date(2026, 11, 24),
        "types": ["date", "datetime", "UUID", "Decimal", "tuple"],
        "pair": (1, 2),
    }


async def test_one_unencodable_payload_fails_its_own_submit_only(broker: BrokerProcess) -> None:
    async with Client(broker.address, secret=SECRET) as client:
        outcomes = await asyncio.gather(
            client.submit("mixed", 1),
            client.submit("mixed", datetime.date.today()),
            client.submit("mixed", 3),
            return_exceptions=True,
        )
        first, bad, third = outcomes
        assert isinstance(first, int) and isinstance(third, int) and third == first + 1
        assert isinstance(bad, UnencodablePayload) and "cannot be encoded" in str(bad) and "serializer" in str(bad)
        with pytest.raises(UnencodablePayload, match="payload 1 cannot be encoded"):
            await client.submit_many("mixed", [1, object()])
        assert (await client.stats())["queues"]["mixed"]["pending"] == 2


@task(queue="dates")
def days_until(day: str, when: datetime.date) -> int:
    return 0


async def test_a_task_names_the_argument_it_cannot_send(broker: BrokerProcess) -> None:
    async with Client(broker.address, secret=SECRET) as client:
        with pytest.raises(UnencodablePayload, match=r"argument 'when' of days_until\(\) \(date\) cannot be encoded"):
            await days_until.submit(client, "x", when=datetime.date.today())


def test_sync_client_follows_progress(broker: BrokerProcess) -> None:
    async def halfway(payload: str) -> str:
        from jobbroker import current_job

        current_job().report_progress(0.5, "half")
        await asyncio.sleep(0.2)
        return payload

    async def serve(stop: asyncio.Event) -> None:
        worker = Worker(broker.address, secret=SECRET, queues=["followed"], handler=halfway)
        running = asyncio.create_task(worker.run())
        await stop.wait()
        worker.stop()
        await running

    import threading

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(stop),))
    thread.start()
    try:
        with SyncClient(broker.address, secret=SECRET) as client:
            job_id = client.submit("followed", "x")
            reports = [(r.fraction, r.message) for r in client.progress(job_id)]
            assert client.result(job_id, timeout=TIMEOUT) == "x"
        assert reports == [(0.5, "half")]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


@task(queue="typed-flow")
def stamp() -> dict[str, Any]:
    return {"when": datetime.datetime(2020, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)}


@task(queue="typed-flow")
def year_of_previous() -> int:
    from jobbroker import current_job

    (previous,) = current_job().parent_results or [None]
    return previous["when"].year


async def test_results_handed_to_dependents_are_decoded_with_the_serializer(broker: BrokerProcess) -> None:
    serializer = MsgpackSerializer()
    worker = Worker(broker.address, secret=SECRET, tasks=[stamp, year_of_previous], serializer=serializer)
    running = asyncio.create_task(worker.run())
    try:
        async with Client(broker.address, secret=SECRET, serializer=serializer) as client:
            first = await stamp.submit(client)
            second = await year_of_previous.options(after=(first,)).submit(client)
            assert await client.result(second, timeout=TIMEOUT) == 2020
    finally:
        worker.stop()
        await running


class _Reversed:
    """A serializer whose bytes are no msgpack at all: the broker must not care."""

    def dumps(self, value: Any) -> bytes:
        return b"\xc1" + str(value).encode()[::-1]  # 0xc1: never valid msgpack

    def loads(self, data: bytes) -> Any:
        assert data[:1] == b"\xc1", data
        return data[1:][::-1].decode()


async def test_bytes_the_broker_cannot_decode_pass_through_unchanged(broker: BrokerProcess) -> None:
    """Protocol version 2: payloads and results are opaque; the broker forwards any bytes."""
    serializer = _Reversed()
    seen: list[bytes] = []

    def handler(payload: str) -> str:
        seen.append(payload.encode())
        return payload.upper()

    worker = Worker(broker.address, secret=SECRET, queues=["opaque"], handler=handler, serializer=serializer)
    running = asyncio.create_task(worker.run())
    try:
        async with Client(broker.address, secret=SECRET, serializer=serializer) as client:
            job_id = await client.submit("opaque", "héllo wörld")
            assert await client.result(job_id, timeout=TIMEOUT) == "HÉLLO WÖRLD"
            async with Client(broker.address, secret=SECRET) as plain:  # msgpack cannot read them
                info = await plain.job(job_id)
            assert info["result"] == serializer.dumps("HÉLLO WÖRLD")  # held and shown byte for byte
    finally:
        worker.stop()
        await running
    assert seen == ["héllo wörld".encode()]
