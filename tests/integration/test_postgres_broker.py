"""A broker on `--store postgresql://...`: nothing acknowledged is lost across a `kill -9` of the
broker or a restart of PostgreSQL under it, and a database it cannot use stops it at start with
a clear message (exit status 2) that never shows the password."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from jobbroker import Client, ConnectionClosed, StorageUnavailable
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import REPO, BrokerProcess, Process, wait_until
from tests.postgres import PASSWORD, PostgresServer


@pytest.fixture
def own_postgres(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A PostgreSQL server for one test, to stop and start under a broker (the session's
    server, which other tests share, is left alone)."""
    server = PostgresServer(postgres.binaries)
    try:
        server.start()
        yield server
    finally:
        server.stop()


async def test_every_acknowledged_job_and_delivered_result_survives_kill_9(
    pg_url: str, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    broker = start_broker("--store", pg_url)
    broker.wait_for_output(r"data in postgresql://jobbroker:\*\*\*@127\.0\.0\.1:\d+/test_\w+ \(fsync always\)")
    start_worker(broker.address, "stream", "handlers:square", "--concurrency", "32")
    acknowledged: dict[int, int] = {}  # job id -> n
    delivered: dict[int, int] = {}  # job id -> the result a producer was given

    async def producer(client: Client, first: int) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            for n in range(first, first + 100_000):
                acknowledged[await client.submit("stream", n)] = n

    async def waiter(client: Client) -> None:
        with contextlib.suppress(ConnectionClosed, OSError):
            while True:
                pending = [job_id for job_id in list(acknowledged)[:400] if job_id not in delivered]
                if not pending:
                    await asyncio.sleep(0.01)
                    continue
                delivered[pending[0]] = await client.result(pending[0], timeout=30 * TIME_UNIT)

    async with Client(broker.address, secret=SECRET, reconnect_timeout=1) as client:
        tasks = [asyncio.create_task(producer(client, k * 1_000_000)) for k in range(4)]
        tasks.append(asyncio.create_task(waiter(client)))
        await wait_until(lambda: _enough(acknowledged, delivered), what="submits acknowledged and results delivered")
        broker.signal(signal.SIGKILL)
        await asyncio.wait(tasks, timeout=10 * TIME_UNIT)
        for task in tasks:
            task.cancel()
    broker.wait()
    assert PASSWORD not in broker.output()

    broker = start_broker("--store", pg_url, port=broker.port)
    async with Client(broker.address, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        for job_id, result in delivered.items():  # no result once delivered is undone
            info = await client.job(job_id)
            assert (info["state"], info["result"]) == ("done", result) and result == acknowledged[job_id] ** 2
        start_worker(broker.address, "stream", "handlers:square", "--concurrency", "32")
        ids = list(acknowledged)
        results = await asyncio.gather(*(client.result(i, timeout=60 * TIME_UNIT) for i in ids))
        assert results == [acknowledged[i] ** 2 for i in ids]  # every acknowledged job is there


async def _enough(acknowledged: dict[int, int], delivered: dict[int, int]) -> bool:
    return len(acknowledged) >= 2000 and len(delivered) >= 100


async def test_a_postgresql_restart_withholds_acknowledgements_then_resumes_without_loss(
    own_postgres: PostgresServer, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    url = own_postgres.create_database("jobs")
    broker = start_broker("--store", url)
    start_worker(broker.address)
    async with Client(broker.address, secret=SECRET, reconnect_timeout=30 * TIME_UNIT) as client:
        before = await client.submit_many("squares", range(100))
        assert await asyncio.gather(*(client.result(i, timeout=20 * TIME_UNIT) for i in before)) == [
            n * n for n in range(100)
        ]
        own_postgres.stop_server()
        with pytest.raises(ConnectionClosed):
            await client.submit("squares", 1000)  # held in memory, never acknowledged
        broker.wait_for_output(r"cannot write to postgresql://jobbroker:\*\*\*@.*refusing submits")
        with pytest.raises(StorageUnavailable):
            await client.submit("squares", 1001)
        assert (await client.job(before[0]))["state"] == "done"  # reads still work
        own_postgres.start()  # on the same port

        async def accepted() -> int | None:
            try:
                return await client.submit("squares", 1002)
            except StorageUnavailable:
                return None

        async with asyncio.timeout(20 * TIME_UNIT):
            while (after := await accepted()) is None:
                await asyncio.sleep(0.2)
        broker.wait_for_output("storage works again")
        assert await client.result(after, timeout=20 * TIME_UNIT) == 1002 * 1002

    # All of it is in the database: a broker started on it anew (after a kill -9) has it.
    broker.signal(signal.SIGKILL)
    broker.wait()
    assert PASSWORD not in broker.output()
    broker = start_broker("--store", url, port=broker.port)
    async with Client(broker.address, secret=SECRET) as client:
        assert [(await client.job(i))["result"] for i in before] == [n * n for n in range(100)]
        assert (await client.job(after))["result"] == 1002 * 1002
        # The submit whose acknowledgement was withheld was written on retry (at least once).
        withheld = await client.job(before[-1] + 1)  # the next id after those before
        assert withheld["state"] in ("pending", "done") and withheld["id"] < after


def _serve(secret_file: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "jobbroker", "serve", "--port", "0", "--secret-file", str(secret_file), *args]
    full_env = {**os.environ, "PGPASSFILE": os.devnull, **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, timeout=30 * TIME_UNIT, cwd=REPO, env=full_env)


def test_a_database_that_cannot_be_used_stops_the_broker_at_start(
    postgres: PostgresServer, pg_url: str, secret_file: Path
) -> None:
    unreachable = _serve(secret_file, "--store", f"postgresql://jobbroker:{PASSWORD}@127.0.0.1:1/jobs")
    wrong_password = _serve(secret_file, "--store", pg_url.replace(PASSWORD, "not-the-password"))
    no_database = _serve(secret_file, "--store", postgres.url("no_such_database"))
    not_postgres = _serve(secret_file, "--store", "mysql://root@127.0.0.1/jobs")
    assert (unreachable.returncode, wrong_password.returncode, no_database.returncode) == (2, 2, 2)
    assert "cannot connect to PostgreSQL at postgresql://jobbroker:***@127.0.0.1:1/jobs" in unreachable.stderr
    assert "password authentication failed" in wrong_password.stderr
    assert 'database "no_such_database" does not exist' in no_database.stderr
    assert not_postgres.returncode == 2 and "not a postgresql://" in not_postgres.stderr
    for result in (unreachable, wrong_password, no_database):
        assert PASSWORD not in result.stderr and "not-the-password" not in result.stderr
        assert "Traceback" not in result.stderr
    both = _serve(secret_file, "--store", pg_url, "--memory")
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_the_store_and_its_password_file_come_from_the_environment(
    pg_url: str, tmp_path: Path, secret_file: Path, processes: list[Process]
) -> None:
    password_file = tmp_path / "pg-password"
    password_file.write_text(PASSWORD + "\n")
    env = {
        "JOBBROKER_STORE": pg_url.replace(f":{PASSWORD}@", "@"),
        "JOBBROKER_STORE_PASSWORD_FILE": str(password_file),
        "PGPASSFILE": os.devnull,
    }
    argv = [sys.executable, "-m", "jobbroker", "serve", "--port", "0", "--secret-file", str(secret_file)]
    broker = Process(argv, tmp_path / "broker.log", env)
    processes.append(broker)
    broker.wait_for_output(r"data in postgresql://jobbroker@127\.0\.0\.1:\d+/test_\w+ .*recovered 0 jobs")
    broker.wait_for_output(r"listening on 127\.0\.0\.1:\d+")
