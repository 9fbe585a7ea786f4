"""Periodic jobs kept by the broker: a 1-second schedule fires once per tick, across a kill -9
and restart; the CLI and the config file set them too."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jobbroker import Client
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import REPO, BrokerProcess, Process, wait_until


async def _keys(client: Client, queue: str) -> list[str]:
    done: list[str] = []
    after = 0
    for state in ("pending", "running"):
        after = 0
        while page := await client.jobs(queue, state, after=after, limit=1000):
            done += [job["key"] for job in page]
            after = page[-1]["id"]
    return done


async def test_a_one_second_schedule_fires_once_per_tick_across_a_restart(
    start_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    data_dir = tmp_path / "kept"
    broker = start_broker(data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        record = await client.schedule("tick", "ticks", "ping", every=1.0)
        assert record["every"] == 1.0 and record["next_tick"] > time.time()
        await wait_until(lambda: _at_least(client, 2), what="two ticks")
    broker.signal(9)  # kill -9: down for a few ticks
    broker.wait()
    down_from = time.time()
    await asyncio.sleep(2.5)
    broker = start_broker(data_dir=data_dir)
    async with Client(broker.address, secret=SECRET) as client:
        await wait_until(lambda: _at_least(client, 5), what="more ticks after the restart")
        keys = await _keys(client, "ticks")
        (schedule,) = await client.schedules()
    ticks = sorted(float(key.rsplit(":", 1)[1]) for key in keys)
    assert len(ticks) == len(set(ticks)), f"a tick fired twice: {ticks}"
    assert all(tick == int(tick) for tick in ticks)  # ticks on whole seconds
    missed = [t for t in ticks if down_from < t < down_from + 2.5]
    assert len(missed) <= 1  # the ticks missed while down ran once, on start, not each
    assert schedule["name"] == "tick" and schedule["last_tick"] == ticks[-1]


async def _at_least(client: Client, count: int) -> bool:
    return (await client.stats())["queues"].get("ticks", {}).get("pending", 0) >= count


def test_schedules_from_the_command_line_and_the_config_file(
    start_broker: Callable[..., BrokerProcess],
    start_worker: Callable[..., Process],
    secret_file: Path,
    tmp_path: Path,
) -> None:
    config = tmp_path / "jobbroker.toml"
    config.write_text('[schedules.nightly]\nqueue = "reports"\npayload = "night"\ncron = "0 3 * * *"\n')
    broker = start_broker("--config", str(config))
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def jobbroker(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "jobbroker", *argv, *common], capture_output=True, text=True, timeout=60, env=env
        )

    added = jobbroker("schedule", "add", "often", "ticks", '{"n": 1}', "--every", "1")
    assert added.returncode == 0 and "schedule often: next tick" in added.stdout, added.stderr
    listed = jobbroker("schedule", "list").stdout
    assert "nightly" in listed and "0 3 * * *" in listed and "often" in listed and "every 1 s" in listed
    log = tmp_path / "ticks"
    start_worker(broker.address, "ticks", "handlers:record_tick", env={"HANDLER_LOG": str(log)})
    deadline = time.monotonic() + 20 * TIME_UNIT
    while (not log.exists() or len(log.read_text().splitlines()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(log.read_text().splitlines()) >= 2 and "{'n': 1}" in log.read_text()
    assert jobbroker("schedule", "remove", "often").stdout.strip() == "schedule often: removed"
    assert jobbroker("schedule", "remove", "often").returncode == 4
    bad = tmp_path / "bad.toml"
    bad.write_text('[schedules.x]\nqueue = "q"\ncron = "61 * * * *"\n')
    refused = subprocess.run(
        [sys.executable, "-m", "jobbroker", "serve", "--config", str(bad), "--memory", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert refused.returncode == 2 and "[schedules.x]" in refused.stderr
