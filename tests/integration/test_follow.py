"""Clients and workers given several broker addresses (issue 15, "Clients and workers
follow"): a dead address is skipped, and a broker killed with -9 and restarted on the same
port and data directory is found again, by producers (keyed submits resent, awaited results
watched again) and by workers (jobs they were running run again, the worker carries on).

The tests against a real standby (not_leader from a broker that shares a PostgreSQL store)
come with the broker-side leadership; test_follow.py in tests/unit covers not_leader with a
fake standby."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from jobbroker import Client, ConnectionClosed
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import REPO, BrokerProcess, Process, wait_until


def dead_address() -> str:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def restart(start_broker: Callable[..., BrokerProcess], old: BrokerProcess, data_dir: Path) -> BrokerProcess:
    old.signal(signal.SIGKILL)
    old.wait()
    return start_broker(port=old.port, data_dir=data_dir)


def cli(*args: str, secret_file: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobbroker", *args, "--secret-file", str(secret_file)],
        capture_output=True,
        text=True,
        timeout=30 * TIME_UNIT,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


async def test_a_dead_address_before_the_live_broker_is_skipped(
    broker: BrokerProcess, start_worker: Callable[..., Process], secret_file: Path
) -> None:
    addresses = f"{dead_address()},{broker.address}"
    start_worker(addresses)
    async with Client(addresses, secret=SECRET) as client:
        assert await client.result(await client.submit("squares", 7), timeout=20 * TIME_UNIT) == 49
    async with Client([dead_address(), broker.address], secret=SECRET) as client:
        assert (await client.stats())["queues"]
    done = cli("stats", "--json", "--connect", addresses, secret_file=secret_file)
    assert done.returncode == 0, done.stderr
    done = cli("stats", "--json", secret_file=secret_file, env={"JOBBROKER_CONNECT": addresses})
    assert done.returncode == 0, done.stderr
    nobody = f"{dead_address()},{dead_address()}"
    refused = cli("stats", "--connect", nobody, secret_file=secret_file)
    assert refused.returncode == 3
    assert re.search(r"cannot reach the broker at any of .*connection refused.*connection refused", refused.stderr)


async def test_a_producer_carries_on_across_kill_9_and_restart(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    addresses = [dead_address(), broker.address]
    async with Client(addresses, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        waited_for = await client.submit("squares", 9)
        waiting = asyncio.create_task(client.result(waited_for, timeout=60 * TIME_UNIT))
        acknowledged: dict[str, int] = {}  # key -> job id
        stop = asyncio.Event()

        async def producer() -> None:
            # Keyed submits: a submit lost with the broker is resent, never stored twice.
            n = 0
            while not stop.is_set():
                key = f"job-{n}"
                acknowledged[key] = await client.submit("squares", n, key=key)
                n += 1
                await asyncio.sleep(0.005)

        producing = asyncio.create_task(producer())
        await wait_until(lambda: _at_least(acknowledged, 20), what="submits before the kill")
        broker = restart(start_broker, broker, data_dir)
        before = len(acknowledged)
        await wait_until(lambda: _at_least(acknowledged, before + 20), timeout=30, what="submits after the restart")
        stop.set()
        await producing
        start_worker(",".join(addresses))
        assert await waiting == 81  # watched again on the new connection
        ids = list(acknowledged.values())
        assert len(set(ids)) == len(ids)  # one job per key
        results = await asyncio.gather(*(client.result(i, timeout=60 * TIME_UNIT) for i in ids))
        assert results == [int(key.removeprefix("job-")) ** 2 for key in acknowledged]
        # Resubmitting a key acknowledged before the kill gives its first id: nothing stored twice.
        assert await client.submit("squares", 0, key="job-0") == acknowledged["job-0"]


async def _at_least(items: dict[str, int], count: int) -> bool:
    return len(items) >= count


async def test_a_submit_without_a_key_lost_with_the_broker_says_so(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess]
) -> None:
    """Without a key the client cannot know whether a submit in flight was stored: it raises
    Unacknowledged (a ConnectionClosed) for it, never resends it, and carries on."""
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    addresses = [dead_address(), broker.address]
    async with Client(addresses, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        outcomes: list[int | BaseException] = []
        stop = asyncio.Event()

        async def producer() -> None:
            while not stop.is_set():
                try:
                    outcomes.append(await client.submit("squares", 1))
                except ConnectionClosed as exc:
                    outcomes.append(exc)
                await asyncio.sleep(0.002)

        producing = asyncio.create_task(producer())
        await wait_until(lambda: _count(outcomes, 20), what="submits before the kill")
        broker = restart(start_broker, broker, data_dir)
        before = len(outcomes)
        await wait_until(lambda: _count(outcomes, before + 20), timeout=30, what="submits after the restart")
        stop.set()
        await producing
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert len(errors) <= 1  # the one in flight at the kill, if any
        for error in errors:
            assert "may or may not have been stored" in str(error), error
        stored = (await client.stats())["queues"]["squares"]["pending"]
        acknowledged = len(outcomes) - len(errors)
        assert acknowledged <= stored <= acknowledged + len(errors)


async def _count(items: list[int | BaseException], count: int) -> bool:
    return len(items) >= count


async def test_a_worker_carries_on_across_kill_9_and_restart(
    tmp_path: Path, start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    """The job the worker was running when its broker died runs again once the broker is
    back (its lease did not survive); the worker drops its old answer, logs one line for the
    loss, and takes jobs from the restarted broker."""
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    addresses = f"{dead_address()},{broker.address}"
    worker = start_worker(addresses, "squares", "handlers:square", env={"HANDLER_SLEEP": str(1.0 * TIME_UNIT)})
    async with Client(addresses, secret=SECRET, reconnect_timeout=20 * TIME_UNIT) as client:
        running = await client.submit("squares", 5)

        async def started() -> bool:
            return (await client.job(running))["state"] == "leased"

        await wait_until(started, what="the job running")
        broker = restart(start_broker, broker, data_dir)
        assert await client.result(running, timeout=30 * TIME_UNIT) == 25
        assert (await client.job(running))["attempts"] <= 2
        later = await client.submit_many("squares", [2, 3])
        assert [await client.result(i, timeout=30 * TIME_UNIT) for i in later] == [4, 9]
    assert worker.popen.poll() is None
    output = worker.output()
    assert len(re.findall(r"lost the broker at 127\.0\.0\.1:\d+ .*; reconnecting", output)) == 1, output
    assert "Traceback" not in output, output
