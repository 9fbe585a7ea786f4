"""Queue controls kept by the broker across every worker: pause and resume, a concurrency
limit, a rate limit; durable, and from the config file. Real broker, real worker processes."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from jobbroker import Client
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import REPO, BrokerProcess, Process, wait_until

TIMEOUT = 30 * TIME_UNIT


def spans(log: Path) -> list[tuple[float, float]]:
    return sorted(tuple(map(float, line.split())) for line in log.read_text().splitlines())  # type: ignore[misc]


async def test_with_concurrency_1_two_workers_never_run_two_at_once(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    for _ in range(2):
        start_worker(broker.address, "exclusive", "handlers:record_span", env={"HANDLER_LOG": str(log)})
    async with Client(broker.address, secret=SECRET) as client:
        assert (await client.set_queue("exclusive", concurrency=1))["concurrency"] == 1
        assert await client.map("exclusive", range(20), timeout=TIMEOUT) == list(range(20))
    runs = spans(log)
    assert len(runs) == 20
    for (_, first_end), (second_start, _) in itertools.pairwise(runs):
        assert second_start >= first_end - 0.002, "two jobs of the queue ran at once"


async def test_a_rate_limit_of_20_a_second_holds_over_5_seconds(
    broker: BrokerProcess, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    log = tmp_path / "spans"
    start_worker(
        broker.address, "metered", "handlers:record_span", "--concurrency", "32", env={"HANDLER_LOG": str(log)}
    )
    async with Client(broker.address, secret=SECRET) as client:
        await client.set_queue("metered", rate=20)
        await client.submit_many("metered", range(400))
        await asyncio.sleep(1.0)  # let the first second go by, then count over five
        before = len(log.read_text().splitlines()) if log.exists() else 0
        await asyncio.sleep(5.0)
        during = len(log.read_text().splitlines()) - before
        stats = (await client.stats())["queues"]["metered"]
    assert 90 <= during <= 110, f"{during} jobs in 5 s at 20 a second"
    assert stats["rate"] == 20.0


async def test_pause_stops_deliveries_and_resume_restarts_them_across_a_restart(
    start_broker: Callable[..., BrokerProcess],
    start_worker: Callable[..., Process],
    tmp_path: Path,
    secret_file: Path,
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        await client.pause("held")
        job_id = await client.submit("held", 4)
    broker.signal(9)
    broker.wait()
    broker = start_broker(data_dir=data_dir)
    start_worker(broker.address, "held")
    async with Client(broker.address, secret=SECRET) as client:
        await wait_until(lambda: _served(client, "held"), what="the worker")
        await asyncio.sleep(0.5)
        info = (await client.stats())["queues"]["held"]
        assert info["paused"] is True and info["pending"] == 1  # still paused after the restart
        shown = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "jobbroker", "queue", "resume", "held", "--connect", broker.address],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            env={"PATH": "/usr/bin:/bin", "JOBBROKER_SECRET_FILE": str(secret_file), "PYTHONPATH": str(REPO)},
        )
        assert shown.returncode == 0 and "queue held: delivering" in shown.stdout, shown.stderr
        assert await client.result(job_id, timeout=TIMEOUT) == 16


async def _served(client: Client, queue: str) -> bool:
    return any(queue in worker["queues"] for worker in (await client.stats())["workers"])


async def test_queue_controls_from_the_config_file(start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> None:
    config = tmp_path / "jobbroker.toml"
    config.write_text('[queues.mail]\nconcurrency = 2\nrate = "5/s"\n\n[queues.reports]\npaused = true\n')
    broker = start_broker("--config", str(config))
    async with Client(broker.address, secret=SECRET) as client:
        queues = (await client.stats())["queues"]
    assert (queues["mail"]["concurrency"], queues["mail"]["rate"], queues["reports"]["paused"]) == (2, 5.0, True)
