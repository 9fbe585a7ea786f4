"""Where the two cores go: CPU seconds of the broker, each worker and the producer during one
throughput run (from /proc; Linux only).

    python benchmarks/cpu_split.py [--jobs 100000] [--workers 2] [--mode memory|durable|postgresql]
        [--submits "batched (map)"|"per-job submit"]

The process whose CPU seconds come close to the wall-clock time is the one that sets the pace.
For a profile of the broker, run py-spy on its pid (printed) during the run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import run_async, wait_for_workers  # noqa: E402
from throughput import SUBMIT_MODES, broker_and_workers, postgres_server  # noqa: E402

from jobbroker import Client  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def server_pids(data: Path) -> list[int]:
    """A PostgreSQL server's processes: its postmaster and the postmaster's children."""
    postmaster = int((data / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue
    return [postmaster, *children]


async def measure(
    address: str, secret: bytes, pids: list[int], jobs: int, submits: str, database: list[int] | None = None
) -> None:
    async with Client(address, secret=secret, name="bench") as client:
        await wait_for_workers(client, len(pids) - 1)
        database = database or []
        before = [cpu_seconds(pid) for pid in pids]
        database_before = sum(cpu_seconds(pid) for pid in database)
        producer_before, started = time.process_time(), time.perf_counter()
        rate = await SUBMIT_MODES[submits](client, "bench", jobs)
        wall = time.perf_counter() - started
        used = [cpu_seconds(pid) - then for pid, then in zip(pids, before, strict=True)]
        producer = time.process_time() - producer_before
        if database:
            used.append(sum(cpu_seconds(pid) for pid in database) - database_before)
    print(f"{jobs:,} jobs, {submits}: {rate:,.0f} jobs/s, {wall:.2f} s wall clock")
    names = [f"broker (pid {pids[0]})"] + [f"worker {i}" for i in range(1, len(pids))]
    names += ["postgresql (all)"] * bool(database) + ["producer"]
    for name, seconds in zip(names, [*used, producer], strict=True):
        print(f"  {name:20} {seconds:6.2f} s CPU  {1e6 * seconds / jobs:6.1f} us/job  {seconds / wall:5.0%} busy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--mode", default="memory", choices=["memory", "durable", "postgresql"])
    parser.add_argument("--submits", default="batched (map)", choices=list(SUBMIT_MODES))
    args = parser.parse_args()
    print(f"jobbroker {args.mode}, {args.workers} workers")
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        url, database = None, None
        if args.mode == "postgresql":
            server = stack.enter_context(postgres_server())
            url = server.create_database("bench")
        running = stack.enter_context(broker_and_workers(Path(tmp), args.mode, args.workers, url))
        address, secret, children = running
        if args.mode == "postgresql":
            database = server_pids(server.data)
        run_async(measure(address, secret, [child.pid for child in children], args.jobs, args.submits, database))


if __name__ == "__main__":
    main()
