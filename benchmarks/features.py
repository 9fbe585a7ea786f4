"""What issue 14's features cost the broker, on a broker in memory on 127.0.0.1:

1. N jobs waiting for one job (`after`, the gate on a paused queue): broker RSS and idle CPU
   while they wait, then the time from resuming the gate's queue until all N are done.
2. 1,000 schedules: broker RSS and CPU between their ticks.
3. Throughput of a queue under a concurrency limit (one that never binds) against the same
   queue without one, in one run: the cost of the check on every delivery.

    python benchmarks/features.py [--dependents 10000] [--schedules 1000] [--jobs 30000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import kill, rss_mib, run_async, start, start_broker, wait_for_workers, write_secret  # noqa: E402
from scale import cpu_seconds  # noqa: E402

from jobbroker import Client  # noqa: E402


async def dependents(address: str, secret: bytes, count: int, broker_pid: int) -> list[tuple[str, str]]:
    """`count` jobs wait for one gate job on a paused queue; resumed, the gate runs and they all
    follow."""
    rows = []
    async with Client(address, secret=secret) as client:
        await wait_for_workers(client, 1)
        await client.pause("gate")
        before = rss_mib(broker_pid)
        gate = await client.submit("gate", 0)
        ids: list[int] = []
        for first in range(0, count, 10_000):
            ids += await client.submit_many("bench", range(first, min(count, first + 10_000)), after=[gate])
        rows.append((f"broker RSS growth with {count:,} jobs waiting", f"{rss_mib(broker_pid) - before:,.1f} MiB"))
        cpu = cpu_seconds(broker_pid)
        await asyncio.sleep(5)
        rows.append(
            (f"broker CPU while {count:,} jobs wait (5 s)", f"{(cpu_seconds(broker_pid) - cpu) / 5:.1%} of a core")
        )
        started = time.perf_counter()
        await client.resume("gate")
        await asyncio.gather(*(client.result(i, timeout=300) for i in ids))
        rows.append((f"the gate done -> all {count:,} dependents done", f"{time.perf_counter() - started:.2f} s"))
    return rows


async def schedules(address: str, secret: bytes, count: int, broker_pid: int) -> list[tuple[str, str]]:
    """`count` schedules (half cron, half intervals of a minute or more): RSS and idle CPU."""
    async with Client(address, secret=secret) as client:
        before = rss_mib(broker_pid)
        for n in range(count):
            if n % 2:
                await client.schedule(f"s{n}", "scheduled", n, cron=f"{n % 60} * * * *")
            else:
                await client.schedule(f"s{n}", "scheduled", n, every=60.0 + n)
        grown = rss_mib(broker_pid) - before
        cpu = cpu_seconds(broker_pid)
        await asyncio.sleep(5)
        busy = (cpu_seconds(broker_pid) - cpu) / 5
    return [
        (f"broker RSS growth with {count:,} schedules", f"{grown:,.1f} MiB"),
        (f"broker CPU with {count:,} schedules between ticks (5 s)", f"{busy:.1%} of a core"),
    ]


async def throughput(address: str, secret: bytes, jobs: int) -> tuple[float, float]:
    async with Client(address, secret=secret) as client:
        await wait_for_workers(client, 1)
        await client.map("plain", range(1000), timeout=60)  # warm up
        started = time.perf_counter()
        await client.map("plain", range(jobs), timeout=600)
        plain = jobs / (time.perf_counter() - started)
        await client.set_queue("limited", concurrency=100_000)
        started = time.perf_counter()
        await client.map("limited", range(jobs), timeout=600)
        limited = jobs / (time.perf_counter() - started)
        return plain, limited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dependents", type=int, default=10_000)
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--schedules", type=int, default=1000)
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        secret, secret_file = write_secret(tmp)
        broker, address = start_broker(tmp, secret_file, "features", "--memory")
        argv = [sys.executable, "-m", "jobbroker", "worker", "handlers:square", "--connect", address]
        for queue in ("plain", "limited", "gate", "bench"):
            argv += ["--queue", queue]
        argv += ["--secret-file", str(secret_file), "--concurrency", "256", "--log-level", "warning"]
        worker = start(argv, tmp / "worker.log")
        try:
            rows += run_async(dependents(address, secret, args.dependents, broker.pid))
            rows += run_async(schedules(address, secret, args.schedules, broker.pid))
            plain, limited = run_async(throughput(address, secret, args.jobs))
            rows.append((f"batched map of {args.jobs:,} jobs, no limit", f"{plain:,.0f} jobs/s"))
            rows.append((f"the same under a concurrency limit ({limited / plain:.2f}x)", f"{limited:,.0f} jobs/s"))
        finally:
            kill(worker)
            kill(broker)
    print("issue 14's features, broker in memory, loopback")
    for name, value in rows:
        print(f"  {name:58} {value:>18}")


if __name__ == "__main__":
    main()
