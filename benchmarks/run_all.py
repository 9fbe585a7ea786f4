"""`make bench`: every benchmark, one table.

    python benchmarks/run_all.py [--jobs 100000] [--workers 1 2 4] [--quick]

--quick: 20,000 jobs, 1 and 2 workers, 100,000 pending jobs: a few minutes instead of ten.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import baselines  # noqa: E402
import throughput  # noqa: E402

from tests.postgres import find_binaries  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    jobs, workers, pending = (20_000, [1, 2], 100_000) if args.quick else (args.jobs, args.workers, 1_000_000)

    print(f"== throughput, {jobs:,} jobs (n -> n*n), every result collected, loopback; jobs/s", flush=True)
    modes = ["memory", "durable"]
    if find_binaries() is not None:  # else said below, and left out
        modes.append("postgresql")
    else:
        print("(no PostgreSQL binaries: the postgresql store is left out; apt-get install postgresql)")
    ours = throughput.run(jobs, workers, modes)
    theirs = baselines.run(jobs, workers)
    columns = [f"W={w}" for w in workers]
    table: dict[str, dict[int, float | str]] = {}
    for storage, submits, w, rate in ours:
        table.setdefault(f"jobbroker {storage}, {submits}", {})[w] = rate
    for name, w, rate in theirs:
        table.setdefault(name, {})[w] = rate
    print(f"{'':48}" + "".join(f"{c:>12}" for c in columns))
    for name, by_workers in table.items():
        cells = [by_workers.get(w, "") for w in workers]
        print(f"{name:48}" + "".join(f"{c:12,.0f}" if isinstance(c, float) else f"{str(c)[:11]:>12}" for c in cells))
    print("\nratios, jobbroker / baseline at the same W:")
    for ours_name in (
        "jobbroker memory, batched (map)",
        "jobbroker durable, batched (map)",
        "jobbroker postgresql, batched (map)",
        "jobbroker memory, per-job submit",
    ):
        for name, _, _ in theirs[: len(theirs) // len(workers)]:
            ratios = []
            for w in workers:
                mine, base = table.get(ours_name, {}).get(w), table[name].get(w)
                ratios.append(
                    f"{mine / base:11.1f}x" if isinstance(mine, float) and isinstance(base, float) else f"{'-':>12}"
                )
            print(f"  {ours_name[10:]:32} / {name[:30]:30}" + "".join(ratios))
    for script, extra in (
        ("latency.py", []),
        ("scale.py", ["--pending", str(pending)]),
        ("recovery.py", ["--jobs", str(pending)]),
        ("frame_mac.py", []),
    ):
        print(f"\n== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *extra], check=True)


if __name__ == "__main__":
    main()
