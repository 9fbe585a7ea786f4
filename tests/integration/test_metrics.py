"""Prometheus metrics, scraped during a run: the numbers move as the run did."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request
from collections.abc import Callable

import pytest

from jobbroker import AuthenticationFailed, Client, JobDead
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import BrokerProcess, Process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(jobbroker_[^ ]+) ([0-9.e+-]+|\+Inf|NaN)", line)
        if match:
            samples[match.group(1)] = float(match.group(2))
    return samples


async def test_metrics_follow_the_run(
    start_broker: Callable[..., BrokerProcess], start_worker: Callable[..., Process]
) -> None:
    port = free_port()
    broker = start_broker("--metrics-port", str(port))
    broker.wait_for_output(rf"metrics on http://127\.0\.0\.1:{port}/metrics")
    before = await asyncio.to_thread(scrape, port)
    assert before["jobbroker_workers_connected"] == 0

    start_worker(broker.address)
    start_worker(broker.address, "fragile", "handlers:fail_always")
    async with Client(broker.address, secret=SECRET) as client:
        assert await client.map("squares", range(10), timeout=20 * TIME_UNIT) == [n * n for n in range(10)]
        with pytest.raises(JobDead):
            await client.result(await client.submit("fragile", 1, max_attempts=1), timeout=20 * TIME_UNIT)
        await client.submit("idle", 1)
        with pytest.raises(AuthenticationFailed):
            async with Client(broker.address, secret=b"not-the-secret-at-all"):
                pass
        after = await asyncio.to_thread(scrape, port)

    assert after['jobbroker_jobs_submitted_total{queue="squares"}'] == 10
    assert after['jobbroker_jobs_completed_total{queue="squares"}'] == 10
    assert after['jobbroker_job_run_seconds_count{queue="squares"}'] == 10
    assert after['jobbroker_jobs_failed_total{queue="fragile"}'] == 1
    assert after['jobbroker_jobs_buried_total{queue="fragile"}'] == 1
    assert after['jobbroker_jobs_dead{queue="fragile"}'] == 1
    assert after['jobbroker_jobs_pending{queue="idle"}'] == 1
    assert after["jobbroker_workers_connected"] == 2
    assert after["jobbroker_auth_failures_total"] >= 1
    assert after["jobbroker_frames_in_total"] > before["jobbroker_frames_in_total"] + 10
    assert after["jobbroker_bytes_out_total"] > before["jobbroker_bytes_out_total"]
