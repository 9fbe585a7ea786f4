"""Durability at scale: a durable broker (SQLite, fsync always) on 127.0.0.1.

1. Submit N small jobs (batches of 10,000) with no worker: submit rate, broker RSS.
2. kill -9 the broker and start it again: time from start to serving (a stats reply), and
   RSS after recovery.
3. Run every job through a worker with a 1 s result TTL, wait for the results to expire:
   disk use of the data directory then, against disk use after the first 1,000 jobs.

    python benchmarks/recovery.py [--jobs 1000000]
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

from harness import kill, rss_mib, start, start_broker, wait_for_workers, write_secret  # noqa: E402
from jobbroker.broker.server import COMPACT_EVERY  # noqa: E402

from jobbroker import Client  # noqa: E402

BATCH = 10_000


def disk_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) / 2**20


class Broker:
    def __init__(self, tmp: Path, secret_file: Path, data_dir: Path, name: str) -> None:
        self.started_at = time.perf_counter()
        options = ["--data-dir", str(data_dir), "--result-ttl", "1"]
        self.process, self.address = start_broker(tmp, secret_file, name, *options, timeout=120)

    def kill(self) -> None:
        kill(self.process)


async def submit_all(address: str, secret: bytes, jobs: int) -> float:
    async with Client(address, secret=secret) as client:
        started = time.perf_counter()
        for first in range(0, jobs, BATCH):
            await client.submit_many("bulk", range(first, min(jobs, first + BATCH)))
        return jobs / (time.perf_counter() - started)


async def first_reply(address: str, secret: bytes) -> int:
    async with Client(address, secret=secret, reconnect_timeout=120) as client:
        return int((await client.stats())["queues"]["bulk"]["pending"])


async def drain(address: str, secret: bytes, jobs: int) -> float:
    async with Client(address, secret=secret) as client:
        await wait_for_workers(client, 1)
        async with asyncio.timeout(3600):
            while True:
                queue = (await client.stats())["queues"]["bulk"]
                if queue["done"] >= jobs:
                    break
                await asyncio.sleep(0.5)
            drained = time.perf_counter()
            # Results expire (TTL 1 s), their rows are deleted, the next compaction shrinks the files.
            await asyncio.sleep(COMPACT_EVERY + 3)
            return drained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        secret, secret_file = write_secret(tmp)
        data_dir = tmp / "data"

        broker = Broker(tmp, secret_file, data_dir, "first")
        rate = asyncio.run(submit_all(broker.address, secret, args.jobs))
        rss_before = rss_mib(broker.process.pid)
        disk_full = disk_mib(data_dir)
        broker.kill()

        broker = Broker(tmp, secret_file, data_dir, "recovered")
        pending = asyncio.run(first_reply(broker.address, secret))
        recovery = time.perf_counter() - broker.started_at
        rss_after = rss_mib(broker.process.pid)
        assert pending == args.jobs, f"{pending} of {args.jobs} jobs recovered"

        worker_argv = [sys.executable, "-m", "jobbroker", "worker", "handlers:square", "--queue", "bulk"]
        worker_argv += ["--connect", broker.address, "--secret-file", str(secret_file), "--concurrency", "256"]
        worker = start([*worker_argv, "--log-level", "warning"], tmp / "worker.log")
        try:
            started = time.perf_counter()
            drained = asyncio.run(drain(broker.address, secret, args.jobs)) - started
            disk_after = disk_mib(data_dir)
        finally:
            kill(worker)
            broker.kill()

        small_dir = tmp / "small"
        small = Broker(tmp, secret_file, small_dir, "small")
        asyncio.run(submit_all(small.address, secret, 1000))
        disk_small = disk_mib(small_dir)
        small.kill()

    print(f"durable broker, {args.jobs:,} pending jobs")
    print(f"  submit rate (batches of {BATCH:,})      {rate:12,.0f} jobs/s")
    print(f"  broker RSS with them pending          {rss_before:12,.0f} MiB")
    print(f"  data directory with them pending      {disk_full:12,.0f} MiB")
    print(f"  kill -9, restart to serving           {recovery:12.2f} s")
    print(f"  broker RSS after recovery             {rss_after:12,.0f} MiB")
    print(f"  all run through one worker in         {drained:12.1f} s")
    print(f"  data directory after all came and went {disk_after:11,.1f} MiB")
    print(f"  data directory after 1,000 jobs       {disk_small:12,.1f} MiB")


if __name__ == "__main__":
    main()
