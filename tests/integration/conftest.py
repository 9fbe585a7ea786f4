"""Real processes over loopback: the broker as `python -m jobbroker serve` on port 0, workers as
`python -m jobbroker worker`. Every process a test starts is stopped by its PID at teardown."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from jobbroker import Client
from tests.helpers import SECRET, TIME_UNIT

REPO = Path(__file__).resolve().parents[2]
HEARTBEAT = 0.5  # seconds; short so that dead-worker tests finish quickly
STUCK = {"HANDLER_SLEEP": "600"}  # environment of a worker that holds its jobs until killed


class Process:
    """A child process with its combined output in a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {
            **os.environ,
            "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests' / 'integration'}",
            "XDG_DATA_HOME": str(log_path.parent / "xdg"),  # never the user's own data directory
            **(env or {}),
        }
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
        self.pid = self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_output(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout * TIME_UNIT
        while time.monotonic() < deadline:
            match = re.search(pattern, self.output())
            if match:
                return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not seen; output:\n{self.output()}")

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float = 10.0) -> int:
        return self.popen.wait(timeout * TIME_UNIT)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGKILL)
            self.popen.wait(10)
        self._log.close()


class BrokerProcess(Process):
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def start_broker(tmp_path: Path, secret_file: Path, processes: list[Process]) -> Callable[..., BrokerProcess]:
    count = 0

    def start(*args: str, port: int = 0, data_dir: Path | None = None, faults: Path | None = None) -> BrokerProcess:
        """A broker with its own data directory (or `data_dir`, to restart on the same one);
        with `faults`, one whose commits that file slows down or fails (faults.py)."""
        nonlocal count
        count += 1
        module = "jobbroker" if faults is None else "faults"
        argv = [sys.executable, "-m", module, "serve", "--port", str(port), "--secret-file", str(secret_file)]
        argv += ["--heartbeat", str(HEARTBEAT * TIME_UNIT)]
        if "--memory" not in args and "--store" not in args:
            argv += ["--data-dir", str(data_dir or tmp_path / f"data-{count}")]
        argv += args
        env = None if faults is None else {"JOBBROKER_TEST_FAULTS": str(faults)}
        broker = BrokerProcess(argv, tmp_path / f"broker-{count}.log", env)
        processes.append(broker)
        broker.port = int(broker.wait_for_output(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        return broker

    return start


@pytest.fixture
def broker(start_broker: Callable[..., BrokerProcess]) -> BrokerProcess:
    return start_broker()


@pytest.fixture
def start_worker(tmp_path: Path, secret_file: Path, processes: list[Process]) -> Callable[..., Process]:
    count = 0

    def start(
        address: str,
        queue: str = "squares",
        handler: str = "handlers:square",
        *args: str,
        env: dict[str, str] | None = None,
    ) -> Process:
        nonlocal count
        count += 1
        argv = [sys.executable, "-m", "jobbroker", "worker", handler, "--connect", address, "--queue", queue]
        argv += ["--secret-file", str(secret_file), "--name", f"worker-{count}", *args]
        worker = Process(argv, tmp_path / f"worker-{count}.log", env)
        processes.append(worker)
        return worker

    return start


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[Client]:
    async with Client(broker.address, secret=SECRET, reconnect_timeout=5.0) as connected:
        yield connected


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll an async predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout * TIME_UNIT
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Faults:
    """The control file of a `faults` broker (faults.py): what its commits do, and a log of
    the commits that began, ended and failed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.set()

    def set(self, **faults: Any) -> None:
        """From the next commit on: delay=seconds, fail="fsync"|"full", quota=True; none: healthy."""
        temporary = self.path.with_suffix(".new")
        temporary.write_text(json.dumps(faults))
        temporary.replace(self.path)  # never half written when the broker reads it

    def count(self, event: str) -> int:
        """Commits so far that `event`: "begin", "end" or "failed"."""
        log = Path(f"{self.path}.log")
        return log.read_text().split().count(event) if log.exists() else 0

    async def wait_for(self, event: str, more_than: int, timeout: float = 10.0) -> None:
        async def seen() -> bool:
            return self.count(event) > more_than

        await wait_until(seen, timeout, what=f"a commit to {event}")


@pytest.fixture
def faults(tmp_path: Path) -> Faults:
    return Faults(tmp_path / "faults.json")
