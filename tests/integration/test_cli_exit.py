"""The command line as a Unix tool: exit statuses that say what happened, sentences for
errors, quiet on a closed pipe, and the commands to manage queues and jobs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers import TIME_UNIT
from tests.integration.conftest import REPO, BrokerProcess, Process


def jobbroker(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobbroker", *argv],
        capture_output=True,
        text=True,
        timeout=timeout * TIME_UNIT,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests' / 'integration'}", **(env or {})},
        cwd=REPO,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_version_and_an_unreachable_broker_in_a_second(secret_file: Path) -> None:
    version = jobbroker("--version")
    assert version.returncode == 0 and version.stdout.startswith("jobbroker ")
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = jobbroker("stats", "--connect", address, "--secret-file", str(secret_file))
    assert time.monotonic() - started < 10  # the interpreter's start included; not 30 s of retries
    assert result.returncode == 3
    assert f"cannot reach the broker at {address}: connection refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_busy_port_is_a_start_fault(broker: BrokerProcess, secret_file: Path, tmp_path: Path) -> None:
    result = jobbroker(
        "serve", "--port", str(broker.port), "--secret-file", str(secret_file), "--data-dir", str(tmp_path / "other")
    )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{broker.port}: address already in use" in result.stderr.lower()


def test_exit_statuses_of_submit_wait(
    broker: BrokerProcess, secret_file: Path, start_worker: Callable[..., Process]
) -> None:
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    nobody = jobbroker("submit", "nobody", "1", "--wait", "--timeout", "0.5", *common)
    assert nobody.returncode == 5
    assert "no worker serves queue 'nobody' yet" in nobody.stderr
    start_worker(broker.address, "fragile", "handlers:fail_always")
    deadline = time.monotonic() + 10 * TIME_UNIT
    while "fragile" not in jobbroker("stats", "--json", *common).stdout and time.monotonic() < deadline:
        time.sleep(0.1)
    typo = jobbroker("submit", "fragil", "1", *common)
    assert typo.returncode == 0 and "no worker serves queue 'fragil' yet (did you mean 'fragile'?)" in typo.stderr
    dead = jobbroker("submit", "fragile", '"x"', "--max-attempts", "1", "--wait", *common)
    assert dead.returncode == 1
    assert "error: job" in dead.stdout and "is dead: ValueError: cannot handle 'x'" in dead.stdout
    assert "{" not in dead.stdout.split("error:")[1]  # a sentence, not a dict
    wrong = jobbroker("stats", "--connect", broker.address, "--secret-file", str(Path(__file__)))
    assert wrong.returncode in (2, 4)  # a secret file of the wrong mode, or the wrong secret: never 0


def test_a_closed_pipe_ends_quietly(broker: BrokerProcess, secret_file: Path) -> None:
    script = (
        f"{sys.executable} -m jobbroker stats --json --connect {broker.address} --secret-file {secret_file} | head -c 1"
    )
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        cwd=REPO,
    )
    assert result.stdout == "{" and result.stderr == ""


def test_cancel_queue_and_job_list_commands(broker: BrokerProcess, secret_file: Path) -> None:
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    ids = jobbroker("submit", "backlog", "1", "2", "3", "4", *common).stdout.split()
    assert len(ids) == 4
    delayed = jobbroker("submit", "backlog", "5", "--delay", "600", *common).stdout.split()
    listed = jobbroker("job", "list", "backlog", "--state", "pending", "--limit", "2", *common)
    assert listed.returncode == 0 and f"--after {ids[1]}" in listed.stdout
    page = jobbroker("job", "list", "backlog", "--after", ids[1], *common).stdout
    assert ids[2] in page and ids[3] in page and ids[0] not in page.split("\n", 1)[1]
    assert delayed[0] in jobbroker("job", "list", "backlog", "--state", "delayed", *common).stdout
    cancelled = jobbroker("cancel", ids[0], "999999", *common)
    assert cancelled.returncode == 4
    assert f"job {ids[0]}: cancelled" in cancelled.stdout
    assert "jobbroker: job 999999 not cancelled: no such job" in cancelled.stderr
    assert jobbroker("queue", "list", *common).stdout.split() == ["backlog"]
    shown = jobbroker("queue", "show", "backlog", *common).stdout
    assert "pending" in shown and "delayed" in shown
    missing = jobbroker("queue", "show", "backlgo", *common)
    assert missing.returncode == 2 and "no queue named 'backlgo'" in missing.stderr
    purged = jobbroker("queue", "purge", "backlog", *common)
    assert purged.stdout.strip() == "cancelled 4 waiting jobs of backlog"
    assert "(no pending jobs in backlog)" in jobbroker("job", "list", "backlog", *common).stdout


def test_job_show_names_the_worker_and_says_a_done_payload_is_not_kept(
    broker: BrokerProcess, secret_file: Path, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    start_worker(broker.address, "squares")
    (line,) = jobbroker("submit", "squares", "3", "--wait", *common).stdout.splitlines()
    job_id = line.split("\t")[0]
    shown = jobbroker("job", "show", job_id, *common).stdout
    assert "(not kept once the job is done)" in shown and "payload  null" not in shown
    slow = jobbroker("submit", "slow", '"x"', *common).stdout.strip()
    start_worker(broker.address, "slow", "handlers:halfway", env={"HANDLER_RELEASE": str(tmp_path / "never")})
    deadline = time.monotonic() + 20 * TIME_UNIT
    while "worker-2" not in (shown := jobbroker("job", "show", slow, *common).stdout) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert re.search(r"^worker\s+worker-2 \(127\.0\.0\.1:\d+\), session \d+$", shown, re.MULTILINE), shown


def test_the_listening_line_follows_the_json_log_format(secret_file: Path, tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "jobbroker", "serve", "--port", "0", "--memory", "--secret-file", str(secret_file)]
    process = subprocess.Popen(
        [*argv, "--log-format", "json"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stderr is not None
        lines = []
        deadline = time.monotonic() + 20 * TIME_UNIT
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            lines.append(line)
            if "listening on" in line:
                break
        for line in lines:
            if line.strip():
                json.loads(line)  # every line an object, the listening line included
        assert "listening on 127.0.0.1:" in json.loads(lines[-1])["message"]
    finally:
        process.kill()
        process.wait(10)
