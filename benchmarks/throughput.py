"""End-to-end throughput: N jobs (n -> n*n) submitted, run by W worker processes, every result
collected by the producer. A real broker process on 127.0.0.1, durable (SQLite, fsync always),
on PostgreSQL (--store, fsync always: synchronous_commit on, the server's fsync on) and in
memory side by side.

    python benchmarks/throughput.py [--jobs 20000] [--workers 1 2] [--modes durable postgresql memory]
        [--store-url postgresql://...]

The postgresql mode starts a PostgreSQL server of its own (Debian's initdb/pg_ctl, in a
temporary directory, as tests/postgres.py does) unless --store-url names one.

Prints jobs/s for batched submits (Client.map) and for per-job submits (one submit per job,
pipelined, then each result awaited).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import kill, run_async, start, start_broker, wait_for_workers, write_secret  # noqa: E402

from jobbroker import Client  # noqa: E402

PIPELINE = 2000  # per-job submits in flight at once


async def batched(client: Client, queue: str, jobs: int) -> float:
    started = time.perf_counter()
    results = await client.map(queue, range(jobs), timeout=600)
    elapsed = time.perf_counter() - started
    assert results == [n * n for n in range(jobs)], "wrong results"
    return jobs / elapsed


async def per_job(client: Client, queue: str, jobs: int) -> float:
    started = time.perf_counter()
    ids: list[int] = []
    for start_at in range(0, jobs, PIPELINE):
        chunk = range(start_at, min(jobs, start_at + PIPELINE))
        ids += await asyncio.gather(*(client.submit(queue, n) for n in chunk))
    results = await asyncio.gather(*(client.result(job_id, timeout=600) for job_id in ids))
    elapsed = time.perf_counter() - started
    assert list(results) == [n * n for n in range(jobs)], "wrong results"
    return jobs / elapsed


SUBMIT_MODES = {"batched (map)": batched, "per-job submit": per_job}


async def measure(address: str, secret: bytes, workers: int, jobs: int, submits: list[str]) -> dict[str, float]:
    async with Client(address, secret=secret, name="bench") as client:
        await wait_for_workers(client, workers)
        return {name: await SUBMIT_MODES[name](client, "bench", jobs) for name in submits}


@contextlib.contextmanager
def broker_and_workers(
    tmp_path: Path, mode: str, workers: int, store_url: str | None = None
) -> Iterator[tuple[str, bytes, list[Popen[bytes]]]]:
    """A broker (durable, on PostgreSQL at `store_url`, or in memory) and W worker processes
    running n -> n*n on queue "bench"; yields (address, secret, [broker, *workers]) and kills
    them all after."""
    secret, secret_file = write_secret(tmp_path)
    if mode == "memory":
        storage = ["--memory"]
    elif mode == "postgresql":
        assert store_url is not None
        storage = ["--store", store_url]
    else:
        storage = ["--data-dir", str(tmp_path / f"data-{mode}-{workers}")]
    broker, address = start_broker(tmp_path, secret_file, f"broker-{mode}-{workers}", *storage)
    children = [broker]
    try:
        for index in range(workers):
            argv = [sys.executable, "-m", "jobbroker", "worker", "handlers:square", "--queue", "bench"]
            argv += ["--connect", address, "--secret-file", str(secret_file), "--concurrency", "256"]
            argv += ["--log-level", "warning"]
            children.append(start(argv, tmp_path / f"worker-{mode}-{workers}-{index}.log"))
        yield address, secret, children
    finally:
        for child in children:
            kill(child)


def run(
    jobs: int,
    worker_counts: list[int],
    modes: list[str],
    submits: list[str] | None = None,
    store_url: str | None = None,
) -> list[tuple[str, str, int, float]]:
    rows: list[tuple[str, str, int, float]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        server = None
        if "postgresql" in modes and store_url is None:
            server = stack.enter_context(postgres_server())
        for index, (mode, workers) in enumerate([(m, w) for w in worker_counts for m in modes]):
            url = store_url
            if mode == "postgresql" and server is not None:
                url = server.create_database(f"bench_{index}")  # each run starts empty, as the others do
            with broker_and_workers(Path(tmp), mode, workers, url) as (address, secret, _):
                figures = run_async(measure(address, secret, workers, jobs, submits or list(SUBMIT_MODES)))
            rows += [(mode, submit_mode, workers, rate) for submit_mode, rate in figures.items()]
    return rows


@contextlib.contextmanager
def postgres_server() -> Iterator[Any]:
    """A PostgreSQL server of our own for the run, with fsync on (durable as SQLite's `--fsync
    always` is), stopped after."""
    from tests.postgres import PostgresServer, find_binaries

    binaries = find_binaries()
    if binaries is None:
        raise SystemExit("the postgresql mode needs PostgreSQL's initdb and pg_ctl (apt-get install postgresql)")
    server = PostgresServer(binaries, fsync=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--modes", nargs="+", default=["durable", "memory"], choices=["durable", "postgresql", "memory"]
    )
    parser.add_argument("--store-url", default=None, help="for the postgresql mode: this database, not one of ours")
    parser.add_argument("--submits", nargs="+", default=list(SUBMIT_MODES), choices=list(SUBMIT_MODES))
    args = parser.parse_args()
    print(f"jobbroker end to end, {args.jobs} jobs, loopback")
    print(f"{'storage':10} {'submits':16} {'workers':>7} {'jobs/s':>10}")
    for mode, submit_mode, workers, rate in run(args.jobs, args.workers, args.modes, args.submits, args.store_url):
        print(f"{mode:10} {submit_mode:16} {workers:7} {rate:10,.0f}")


if __name__ == "__main__":
    main()
