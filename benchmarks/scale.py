"""Scale, on a broker in memory on 127.0.0.1:

1. 1,000,000 pending small jobs: submit rate (batches of 10,000) and broker RSS.
2. 1,000 connected idle workers for 20 s, each holding 10 started jobs (a long handler each):
   the broker's CPU use (the cost of heartbeats and of holding the leases).
3. A worker holding 10,000 leased jobs dies: (a) kill -9, the connection closes; (b) SIGSTOP,
   silent until it misses 3 heartbeats (interval 1 s here). Time until another worker has
   received all 10,000 again.

    python benchmarks/scale.py [--pending 1000000] [--idle-workers 1000] [--held-per-worker 10] [--leased 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import kill, rss_mib, run_async, start, start_broker, write_secret  # noqa: E402
from jobbroker.broker.protocol.messages import Deliver, Reserve, Results, Started  # noqa: E402
from jobbroker.client.connection import Connection, parse_address  # noqa: E402

from jobbroker import Client  # noqa: E402

BATCH = 10_000
HEARTBEAT = 1.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Broker:
    def __init__(self, tmp: Path, secret_file: Path, name: str, *extra: str) -> None:
        self.process, self.address = start_broker(tmp, secret_file, name, "--memory", *extra)

    def stop(self) -> None:
        kill(self.process)


async def pending(address: str, secret: bytes, jobs: int) -> float:
    async with Client(address, secret=secret) as client:
        started = time.perf_counter()
        for first in range(0, jobs, BATCH):
            await client.submit_many("bulk", [{"n": n} for n in range(first, min(jobs, first + BATCH))])
        return jobs / (time.perf_counter() - started)


async def idle_workers(address: str, secret: bytes, count: int, held: int, broker_pid: int, seconds: float) -> float:
    """Workers that each hold `held` started jobs and send nothing but heartbeats."""
    host, port = parse_address(address)
    counters = [DeliveryCounter(held, keep=True) for _ in range(count)]
    connections = [await Connection.open(host, port, secret, client="idle", on_push=c) for c in counters]
    try:
        async with Client(address, secret=secret) as client:
            for first in range(0, count * held, BATCH):
                await client.submit_many("idle", range(first, min(count * held, first + BATCH)))
        await asyncio.gather(*(c.request(Reserve, queues=["idle"], prefetch=held) for c in connections))
        await asyncio.wait_for(asyncio.gather(*(c.all_here.wait() for c in counters)), 60)
        for connection, counter in zip(connections, counters, strict=True):
            connection.send(Started(items=[job[:2] for job in counter.jobs]))
        await asyncio.sleep(1)
        before = cpu_seconds(broker_pid)
        await asyncio.sleep(seconds)
        return (cpu_seconds(broker_pid) - before) / seconds
    finally:
        for connection in connections:
            connection.close()


class DeliveryCounter:
    """An on_push callback that sets `all_here` once `count` jobs were delivered."""

    def __init__(self, count: int, *, keep: bool = False) -> None:
        self.count = count
        self.keep = keep  # keep the delivered rows (to say they started)
        self.received = 0
        self.jobs: list[list[Any]] = []
        self.all_here = asyncio.Event()

    def __call__(self, message: Deliver | Results) -> None:
        if isinstance(message, Deliver):
            self.received += len(message.jobs)
            if self.keep:
                self.jobs.extend(message.jobs)
            if self.received >= self.count:
                self.all_here.set()


async def hold(address: str, secret: bytes, count: int) -> None:
    """The doomed worker: takes `count` jobs and never answers."""
    host, port = parse_address(address)
    counter = DeliveryCounter(count)
    connection = await Connection.open(host, port, secret, client="doomed", on_push=counter)
    await connection.request(Reserve, queues=["leased"], prefetch=count)
    await counter.all_here.wait()
    print("holding", flush=True)
    await asyncio.sleep(3600)


async def takeover(address: str, secret: bytes, count: int, doomed: Any, how: int) -> float:
    host, port = parse_address(address)
    counter = DeliveryCounter(count)
    async with Client(address, secret=secret) as client:
        await client.submit_many("leased", range(count))
        while doomed.poll() is None and "holding" not in doomed.log_path.read_text():
            await asyncio.sleep(0.05)
        heir = await Connection.open(host, port, secret, client="heir", on_push=counter)
        try:
            await heir.request(Reserve, queues=["leased"], prefetch=count)
            started = time.perf_counter()
            doomed.send_signal(how)
            await asyncio.wait_for(counter.all_here.wait(), 60)
            return time.perf_counter() - started
        finally:
            heir.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pending", type=int, default=1_000_000)
    parser.add_argument("--idle-workers", type=int, default=1000)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--held-per-worker", type=int, default=10)
    parser.add_argument("--leased", type=int, default=10_000)
    parser.add_argument("--hold", nargs=3, metavar=("ADDRESS", "SECRET_FILE", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold:
        address, secret_file, count = args.hold
        run_async(hold(address, Path(secret_file).read_bytes(), int(count)))
        return
    raise_file_limit()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        secret, secret_file = write_secret(tmp)

        broker = Broker(tmp, secret_file, "pending")
        rate = run_async(pending(broker.address, secret, args.pending))
        rows.append((f"submit rate, {args.pending:,} pending jobs (batches of {BATCH:,})", f"{rate:,.0f} jobs/s"))
        rows.append((f"broker RSS with {args.pending:,} pending jobs", f"{rss_mib(broker.process.pid):,.0f} MiB"))
        broker.stop()

        broker = Broker(tmp, secret_file, "idle")
        load = run_async(
            idle_workers(
                broker.address, secret, args.idle_workers, args.held_per_worker, broker.process.pid, args.idle_seconds
            )
        )
        held = f"{args.idle_workers:,} idle workers holding {args.held_per_worker} jobs each"
        rows.append((f"broker CPU with {held} (heartbeat 5 s)", f"{load:.1%} of a core"))
        broker.stop()

        for how, name in ((signal.SIGKILL, "kill -9"), (signal.SIGSTOP, "SIGSTOP, 3 missed heartbeats of 1 s")):
            broker = Broker(tmp, secret_file, "dead", "--heartbeat", str(HEARTBEAT))
            hold_argv = [sys.executable, __file__, "--hold", broker.address, str(secret_file), str(args.leased)]
            doomed = start(hold_argv, tmp / "doomed.log")
            doomed.log_path = tmp / "doomed.log"  # type: ignore[attr-defined]
            try:
                took = run_async(takeover(broker.address, secret, args.leased, doomed, how))
            finally:
                kill(doomed)
                broker.stop()
            rows.append((f"{args.leased:,} leased jobs of a dead worker redelivered ({name})", f"{took:.2f} s"))

    print("scale, broker in memory, loopback")
    for name, value in rows:
        print(f"  {name:62} {value:>16}")


if __name__ == "__main__":
    main()
