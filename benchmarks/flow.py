"""Flow control (issue 11), on a broker in memory on 127.0.0.1:

1. Amplification: the broker's RSS before and at its peak (VmHWM) while one connection asks
   1,000 times for a job whose payload is 1 MiB (`job` requests, 20 bytes each), and while one
   `watch` names a finished job with a 1 MiB result 300 times (361 bytes).
2. A slow reader: `Client.map` of N jobs whose results are 128 KiB each, the client behind a
   loopback proxy that carries at most R MiB/s from the broker to it (the worker connects
   directly). Prints the time against the link's own time (N x 128 KiB / R), the results
   received and the connections the client had to make.

    python benchmarks/flow.py [--jobs 1000] [--rate-mib 4] [--timeout 150] [--broker-root DIR]

--broker-root runs the broker from another checkout (e.g. `git archive ce3abbc` unpacked in
/tmp) to measure "before"; the client side is this tree's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import kill, rss_mib, run_async, wait_for_port, write_secret  # noqa: E402
from jobbroker.broker.protocol.messages import JobInfo, Watch  # noqa: E402
from jobbroker.client.connection import Connection, parse_address  # noqa: E402

from jobbroker import Client, ResultTimeout, Worker  # noqa: E402
from tests.proxy import ThrottledProxy  # noqa: E402

MiB = 1024 * 1024
RESULT_SIZE = 128 * 1024


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_broker(root: Path, directory: Path, secret_file: Path, name: str) -> tuple[subprocess.Popen[bytes], str]:
    log = directory / f"{name}.log"
    argv = [sys.executable, "-m", "jobbroker", "serve", "--port", "0", "--memory", "--secret-file", str(secret_file)]
    env = {**os.environ, "PYTHONPATH": str(root)}
    process = subprocess.Popen(
        [*argv, "--log-level", "warning"], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=root
    )
    return process, f"127.0.0.1:{wait_for_port(log)}"


async def job_requests(address: str, secret: bytes, pid: int) -> None:
    host, port = parse_address(address)
    async with Client(address, secret=secret) as client:
        big = await client.submit("big", "z" * 1_000_000)
        before = rss_mib(pid)
        reader = await Connection.open(host, port, secret)
        replies = await asyncio.gather(
            *(reader.request(JobInfo, job_id=big) for _ in range(1000)), return_exceptions=True
        )
        reader.close()
        answered = sum(1 for r in replies if isinstance(r, dict))
        print(
            f"1,000 job requests on a 1 MiB payload: RSS {before:.0f} MiB before, peak {peak_rss_mib(pid):.0f} MiB; "
            f"{answered} answered"
        )


async def watch_request(address: str, secret: bytes, pid: int) -> None:
    host, port = parse_address(address)

    async def big_result(n: int) -> str:
        return "r" * 1_000_000

    async with Client(address, secret=secret) as client:
        done = await client.submit("done", 1)
        worker = Worker(address, secret=secret, queues=["done"], handler=big_result)
        running = asyncio.create_task(worker.run())
        await client.result(done, timeout=30)
        worker.stop()
        await running
        pushed: list[object] = []
        before = rss_mib(pid)
        watcher = await Connection.open(host, port, secret, on_push=pushed.append)
        try:
            await watcher.request(Watch, job_ids=[done] * 300)
            await asyncio.wait_for(watcher.request(JobInfo, job_id=done), 60)
            outcome = f"{sum(len(p.items) for p in pushed)} outcomes pushed"  # type: ignore[attr-defined]
        except Exception as exc:
            outcome = f"connection lost ({exc})"
        watcher.close()
        print(
            f"one watch naming a 1 MiB result 300 times: RSS {before:.0f} MiB before, "
            f"peak {peak_rss_mib(pid):.0f} MiB; {outcome}"
        )


async def slow_reader(address: str, secret: bytes, jobs: int, rate_mib: float, timeout: float) -> None:
    rate = rate_mib * MiB
    proxy = ThrottledProxy(address, rate)
    proxied = await proxy.start()

    async def large(n: int) -> bytes:
        return bytes([n % 256]) * RESULT_SIZE

    worker = Worker(address, secret=secret, queues=["large"], handler=large, concurrency=16)
    running = asyncio.create_task(worker.run())
    link = jobs * RESULT_SIZE / rate
    client = Client(proxied, secret=secret, reconnect_timeout=timeout)
    received = 0
    started = time.monotonic()
    try:
        await client.connect()
        try:
            received = len(await client.map("large", range(jobs), timeout=timeout))
        except ResultTimeout as exc:
            received = int(str(exc).split()[0])  # "N of M results within T s"
        elapsed = time.monotonic() - started
    finally:
        await client.close()
        worker.stop()
        await running
        await proxy.close()
    print(
        f"map of {jobs:,} x 128 KiB over {rate_mib:g} MiB/s: {received:,}/{jobs:,} results in {elapsed:.1f} s; "
        f"link time {link:.1f} s ({elapsed / link:.2f}x); {proxy.connections} connection(s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rate-mib", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds the map may take")
    parser.add_argument("--broker-root", type=Path, default=ROOT, help="run the broker from this checkout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        secret, secret_file = write_secret(directory)
        for name, run in (
            ("job-requests", lambda address, pid: job_requests(address, secret, pid)),
            ("watch", lambda address, pid: watch_request(address, secret, pid)),
            ("slow-reader", lambda address, pid: slow_reader(address, secret, args.jobs, args.rate_mib, args.timeout)),
        ):
            broker, address = start_broker(args.broker_root.resolve(), directory, secret_file, name)
            try:
                run_async(run(address, broker.pid))
            finally:
                kill(broker)


if __name__ == "__main__":
    main()
