"""Single-job round trip: submit one job, await its result, one at a time, while a second
process keeps a light background load (about 500 jobs/s) on the same broker and worker.
Prints p50, p99 and p99.9 in microseconds, in memory and durable (fsync always).

    python benchmarks/latency.py [--samples 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import kill, run_async, start, start_broker, wait_for_workers, write_secret  # noqa: E402

from jobbroker import Client  # noqa: E402

BACKGROUND_RATE = 500  # jobs per second


async def background(address: str, secret: bytes, seconds: float) -> None:
    async with Client(address, secret=secret, name="background") as client:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await client.submit_many("background", range(BACKGROUND_RATE // 50))
            await asyncio.sleep(1 / 50)


async def measure(address: str, secret: bytes, samples: int) -> list[float]:
    async with Client(address, secret=secret, name="latency") as client:
        await wait_for_workers(client, 1)
        for n in range(200):  # warm up
            await client.result(await client.submit("latency", n), timeout=10)
        times: list[float] = []
        for n in range(samples):
            started = time.perf_counter()
            job_id = await client.submit("latency", n)
            assert await client.result(job_id, timeout=10) == n * n
            times.append((time.perf_counter() - started) * 1e6)
        return times


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def run(samples: int, storage: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        secret, secret_file = write_secret(tmp)
        options = ["--memory"] if storage == "memory" else ["--data-dir", str(tmp / "data")]
        broker, address = start_broker(tmp, secret_file, "broker", *options)
        children = [broker]
        try:
            worker = [sys.executable, "-m", "jobbroker", "worker", "handlers:square", "--queue", "latency"]
            worker += ["--queue", "background", "--connect", address, "--secret-file", str(secret_file)]
            children.append(start([*worker, "--log-level", "warning"], tmp / "worker.log"))
            load = [sys.executable, __file__, "--background", address, "--secret-file", str(secret_file)]
            children.append(start(load, tmp / "background.log"))
            times = sorted(run_async(measure(address, secret, samples)))
        finally:
            for child in children:
                kill(child)
    return {
        "p50": percentile(times, 0.50),
        "p99": percentile(times, 0.99),
        "p99.9": percentile(times, 0.999),
        "mean": statistics.fmean(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--background", metavar="ADDRESS", help=argparse.SUPPRESS)
    parser.add_argument("--secret-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.background:
        run_async(background(args.background, Path(args.secret_file).read_bytes(), 3600))
        return
    print(f"single-job round trip, {args.samples} samples, {BACKGROUND_RATE} jobs/s background load")
    for storage in ("memory", "durable"):
        figures = run(args.samples, storage)
        print(f"{storage:8} " + "  ".join(f"{name} {value:8,.0f} us" for name, value in figures.items()))


if __name__ == "__main__":
    main()
