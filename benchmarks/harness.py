"""What every benchmark script needs: start processes, find the broker's port, a secret file,
the fastest event loop, and process figures from /proc."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobbroker import Client  # noqa: E402


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A child process whose output goes to `log`, able to import the project and benchmarks/."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}"}
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def start_broker(
    directory: Path, secret_file: Path, name: str, *options: str, timeout: float = 15.0
) -> tuple[subprocess.Popen[bytes], str]:
    """`jobbroker serve` on a free loopback port with `options` (--memory, or --data-dir D, and
    so on), logging to directory/name.log. Returns the process and the address it listens on."""
    log = directory / f"{name}.log"
    argv = [sys.executable, "-m", "jobbroker", "serve", "--port", "0", "--secret-file", str(secret_file)]
    process = start([*argv, "--log-level", "warning", *options], log)
    try:
        address = f"127.0.0.1:{wait_for_port(log, timeout)}"
        profile_broker(process.pid, name)
        return process, address
    except BaseException:
        kill(process)
        raise


def profile_broker(pid: int, name: str) -> None:
    """With $JOBBROKER_PROFILE_DIR set, py-spy samples the broker until it exits and writes its
    stacks (collapsed, for flamegraph tools or `sort | head`) to DIR/NAME-PID.txt."""
    directory = os.environ.get("JOBBROKER_PROFILE_DIR")
    if not directory:
        return
    output = Path(directory) / f"{name}-{pid}.txt"
    command = ["py-spy", "record", "--pid", str(pid), "--rate", "500", "--format", "raw", "-o", str(output)]
    subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, and reap it."""
    process.send_signal(signal.SIGKILL)
    process.wait(30)


def wait_for_port(log: Path, timeout: float = 15.0) -> int:
    """The port a broker started with --port 0 says it listens on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        if match:
            return int(match.group(1))
        time.sleep(0.02)
    raise RuntimeError(f"broker did not start:\n{log.read_text()}")


async def wait_for_workers(client: Client, count: int) -> None:
    async with asyncio.timeout(30):
        while len((await client.stats())["workers"]) < count:
            await asyncio.sleep(0.05)


def write_secret(directory: Path) -> tuple[bytes, Path]:
    """A fresh secret in `directory`/secret, readable by its owner only."""
    secret = secrets.token_hex(32).encode()
    path = directory / "secret"
    path.write_bytes(secret)
    path.chmod(0o600)
    return secret, path


def run_async(coroutine: Any) -> Any:
    """Producers run on uvloop where it is installed, as the broker and workers do."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")
