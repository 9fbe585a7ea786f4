"""The designs jobbroker replaces, measured the same way: N numbers handed out, squared by W
worker processes, every result collected by the master. All on 127.0.0.1.

- managers: the classic tutorial design. A multiprocessing.managers.BaseManager serves a
  task queue.Queue and a result queue.Queue; the master puts N numbers, workers get, square
  and put the results back, the master gets N results.
- beanstalkd: Debian's beanstalkd with the greenstalk client: a "tasks" tube and a "results"
  tube; workers reserve, delete, and put the square. Also with its binlog (-b), beanstalkd's
  durable mode. Skipped, and said so, where beanstalkd or greenstalk is missing.

    python benchmarks/baselines.py [--jobs 20000] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import shutil
import socket
import subprocess
import tempfile
import time
from multiprocessing.managers import BaseManager
from typing import Any

AUTHKEY = b"benchmark-authkey"  # the tutorials use b'abc'

_task_queue: queue.Queue[Any] = queue.Queue()
_result_queue: queue.Queue[Any] = queue.Queue()


def _tasks() -> queue.Queue[Any]:
    return _task_queue


def _results() -> queue.Queue[Any]:
    return _result_queue


class QueueManager(BaseManager):
    pass


QueueManager.register("get_task_queue", callable=_tasks)
QueueManager.register("get_result_queue", callable=_results)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the classic managers design ------------------------------------------------------------


def _managers_worker(port: int) -> None:
    manager = QueueManager(address=("127.0.0.1", port), authkey=AUTHKEY)
    manager.connect()
    tasks, results = manager.get_task_queue(), manager.get_result_queue()  # type: ignore[attr-defined]
    while True:
        try:
            n = tasks.get(timeout=1)
        except queue.Empty:
            return
        if n is None:
            return
        results.put(n * n)


def managers(jobs: int, workers: int) -> float:
    port = free_port()
    server = QueueManager(address=("127.0.0.1", port), authkey=AUTHKEY)
    server.start()
    try:
        tasks, results = server.get_task_queue(), server.get_result_queue()  # type: ignore[attr-defined]
        processes = [multiprocessing.Process(target=_managers_worker, args=(port,)) for _ in range(workers)]
        for process in processes:
            process.start()
        started = time.perf_counter()
        for n in range(jobs):
            tasks.put(n)
        total = 0
        for _ in range(jobs):
            total += results.get(timeout=60)
        elapsed = time.perf_counter() - started
        assert total == sum(n * n for n in range(jobs)), "wrong results"
        for _ in processes:
            tasks.put(None)
        for process in processes:
            process.join(10)
        return jobs / elapsed
    finally:
        server.shutdown()


# --- beanstalkd -----------------------------------------------------------------------------


def beanstalkd_available() -> str | None:
    """None if beanstalkd and greenstalk are there, else why not."""
    if shutil.which("beanstalkd") is None:
        return "beanstalkd not installed (Debian package beanstalkd)"
    try:
        import greenstalk  # noqa: F401
    except ImportError:
        return "greenstalk not installed (pip install greenstalk)"
    return None


def _beanstalk_worker(port: int) -> None:
    import greenstalk

    with greenstalk.Client(("127.0.0.1", port), use="results", watch="tasks") as client:
        while True:
            try:
                job = client.reserve(timeout=1)
            except greenstalk.TimedOutError:
                return
            client.delete(job)
            if job.body == "stop":
                return
            n = int(job.body)
            client.put(str(n * n))


def beanstalkd(jobs: int, workers: int, binlog: bool) -> float:
    import greenstalk

    port = free_port()
    with tempfile.TemporaryDirectory() as binlog_dir:
        argv = ["beanstalkd", "-l", "127.0.0.1", "-p", str(port)]
        if binlog:
            argv += ["-b", binlog_dir]
        server = subprocess.Popen(argv)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            processes = [multiprocessing.Process(target=_beanstalk_worker, args=(port,)) for _ in range(workers)]
            for process in processes:
                process.start()
            with greenstalk.Client(("127.0.0.1", port), use="tasks", watch="results") as client:
                started = time.perf_counter()
                for n in range(jobs):
                    client.put(str(n))
                total = 0
                for _ in range(jobs):
                    job = client.reserve(timeout=60)
                    total += int(job.body)
                    client.delete(job)
                elapsed = time.perf_counter() - started
                for _ in processes:
                    client.put("stop")
            assert total == sum(n * n for n in range(jobs)), "wrong results"
            for process in processes:
                process.join(10)
            return jobs / elapsed
        finally:
            server.terminate()
            server.wait(10)


def run(jobs: int, worker_counts: list[int]) -> list[tuple[str, int, float | str]]:
    rows: list[tuple[str, int, float | str]] = []
    missing = beanstalkd_available()
    for workers in worker_counts:
        rows.append(("managers (BaseManager + queue.Queue)", workers, managers(jobs, workers)))
        for binlog in (False, True):
            name = "beanstalkd + greenstalk" + (" (binlog)" if binlog else "")
            rows.append((name, workers, missing or beanstalkd(jobs, workers, binlog)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"baselines, {args.jobs} jobs, loopback")
    for name, workers, rate in run(args.jobs, args.workers):
        shown = f"{rate:10,.0f}" if isinstance(rate, float) else rate
        print(f"{name:40} {workers:3} {shown}")


if __name__ == "__main__":
    main()
