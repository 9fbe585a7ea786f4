"""The command line and the README's examples, as a user runs them."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from jobbroker import Client
from tests.helpers import TIME_UNIT
from tests.integration.conftest import REPO, BrokerProcess, Process, wait_until


def run(argv: list[str], env: dict[str, str], timeout: float = 60, status: int = 0) -> str:
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout * TIME_UNIT,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        cwd=REPO,
    )
    assert result.returncode == status, result.stderr
    return result.stdout


def test_examples_run_as_shown(
    broker: BrokerProcess, secret_file: Path, processes: list[Process], tmp_path: Path
) -> None:
    env = {"JOBBROKER_CONNECT": broker.address, "JOBBROKER_SECRET_FILE": str(secret_file)}
    worker = Process([sys.executable, "examples/task_worker.py"], tmp_path / "example-worker.log", env)
    processes.append(worker)
    output = run([sys.executable, "examples/task_master.py"], env)
    lines = output.strip().splitlines()
    assert len(lines) == 10
    for line in lines:
        number, square = map(int, re.fullmatch(r"(\d+) squared is (\d+)", line).groups())  # type: ignore[union-attr]
        assert square == number * number
    worker.signal(signal.SIGINT)
    assert worker.wait(15) == 0


def test_readme_shows_the_examples_verbatim() -> None:
    readme = (REPO / "README.md").read_text()
    for example in ("task_master.py", "task_worker.py"):
        assert (REPO / "examples" / example).read_text().strip() in readme


def test_submit_wait_and_stats_from_the_shell(
    broker: BrokerProcess, secret_file: Path, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address)
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    output = run([sys.executable, "-m", "jobbroker", "submit", "squares", "3", "4", "--wait", *common], {})
    assert [line.split("\t")[1:] for line in output.strip().splitlines()] == [["3", "9"], ["4", "16"]]
    table = run([sys.executable, "-m", "jobbroker", "stats", *common], {})
    assert re.search(r"^squares\s+0\s+0\s+0\s+0\s+0\s+2\s", table, re.MULTILINE), table  # done: 2
    assert "worker-1" in table
    stats = json.loads(run([sys.executable, "-m", "jobbroker", "stats", "--json", *common], {}))
    assert stats["queues"]["squares"]["done"] == 2


async def test_serve_generates_a_private_secret_on_first_start(
    tmp_path: Path, processes: list[Process], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "JOBBROKER_SECRET_FILE": "", "JOBBROKER_SECRET": ""}
    broker = Process(
        [sys.executable, "-m", "jobbroker", "serve", "--port", "0"],
        tmp_path / "fresh-broker.log",
        {**env, "PYTHONPATH": str(REPO)},
    )
    processes.append(broker)
    port = broker.wait_for_output(r"listening on 127\.0\.0\.1:(\d+)").group(1)
    secret_path = tmp_path / "data" / "jobbroker" / "secret"
    assert f"generated a new secret in {secret_path}" in broker.output()
    assert secret_path.stat().st_mode & 0o777 == 0o600
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    async with Client(f"127.0.0.1:{port}") as client:  # finds the secret where the broker put it
        assert await client.submit("q", 1) > 0


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [("abc\n", 0o600, "at least 16"), ("a-long-enough-secret\n", 0o644, "readable by others: chmod 600")],
)
def test_bad_secret_file_is_a_clear_error(tmp_path: Path, content: str, mode: int, message: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(content)
    secret_file.chmod(mode)
    result = subprocess.run(
        [sys.executable, "-m", "jobbroker", "stats", "--secret-file", str(secret_file)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert result.returncode == 2 and message in result.stderr


def test_dead_letters_and_jobs_from_the_shell(
    broker: BrokerProcess, secret_file: Path, start_worker: Callable[..., Process]
) -> None:
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    jobbroker = [sys.executable, "-m", "jobbroker"]
    start_worker(broker.address, "fragile", "handlers:fail_always")
    (job_id,) = map(int, run([*jobbroker, "submit", "fragile", '{"n": 1}', "--max-attempts", "1", *common], {}).split())
    output = run(
        [*jobbroker, "submit", "fragile", "2", "--max-attempts", "1", "--wait", "--timeout", "20", *common],
        {},
        status=1,  # a job failed
    )
    assert "is dead" in output
    listed = run([*jobbroker, "dead", "list", "fragile", *common], {})
    assert re.search(rf"^{job_id}\s+1\s+ValueError\s+cannot handle", listed, re.MULTILINE), listed
    shown = run([*jobbroker, "job", "show", str(job_id), *common], {})
    assert re.search(r'^state\s+"dead"$', shown, re.MULTILINE) and '"n": 1' in shown, shown
    assert run([*jobbroker, "dead", "purge", "fragile", str(job_id), *common], {}).strip() == "purged 1"
    assert run([*jobbroker, "dead", "requeue", "fragile", *common], {}).strip() == "requeued 1"  # the other one
    # The broker logs one line for each: the job that died, and who purged or requeued which.
    broker.wait_for_output(rf"job {job_id} \(queue fragile\) is dead: .*cannot handle")
    broker.wait_for_output(rf"dead jobs of queue fragile purged by session \d+: \[{job_id}\]")
    broker.wait_for_output(r"dead jobs of queue fragile requeued by session \d+: \[\d+\]")
    purged = run([*jobbroker, "dead", "list", "fragile", "--json", *common], {})
    assert job_id not in [job["id"] for job in json.loads(purged)]


def test_json_logs(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker("--log-format", "json")
    lines = [line for line in broker.output().splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]
    assert any(e["logger"] == "jobbroker.broker" and e["message"].startswith("listening on") for e in entries)
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)


def test_drain_stops_deliveries_until_resumed(
    broker: BrokerProcess, secret_file: Path, start_worker: Callable[..., Process]
) -> None:
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    jobbroker = [sys.executable, "-m", "jobbroker"]
    assert "deliveries stopped; 0 jobs in flight" in run([*jobbroker, "drain", "--wait", *common], {})
    ids = run([*jobbroker, "submit", "squares", "5", "6", *common], {}).split()
    start_worker(broker.address)
    time.sleep(1.0)
    stats = json.loads(run([*jobbroker, "stats", "--json", *common], {}))
    assert stats["draining"] and stats["queues"]["squares"]["pending"] == 2
    assert "deliveries resumed" in run([*jobbroker, "drain", "--resume", *common], {})
    shown = run([*jobbroker, "submit", "squares", "7", "--wait", "--timeout", "20", *common], {})
    assert shown.split("\t")[1:] == ["7", "49\n"]
    for job_id in ids:  # held back while draining, delivered before the later job
        assert re.search(r'^state\s+"done"$', run([*jobbroker, "job", "show", job_id, *common], {}), re.MULTILINE)


async def test_sigterm_lets_jobs_in_flight_finish(
    broker: BrokerProcess, client: Client, start_worker: Callable[..., Process]
) -> None:
    start_worker(broker.address, env={"HANDLER_SLEEP": "1"})
    job_id = await client.submit("squares", 8)

    async def running() -> bool:
        return (await client.stats())["queues"]["squares"]["in_flight"] == 1

    await wait_until(running, what="the job to start")
    broker.signal(signal.SIGTERM)
    assert await client.result(job_id, timeout=10 * TIME_UNIT) == 64  # finished during the grace
    assert await asyncio.to_thread(broker.wait, 15) == 0
    assert "shutting down: 1 jobs in flight" in broker.output()


async def test_top_refreshes_until_told_and_shows_progress(
    broker: BrokerProcess, secret_file: Path, start_worker: Callable[..., Process], client: Client, tmp_path: Path
) -> None:
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    release = tmp_path / "release"
    start_worker(broker.address, "halves", "handlers:halfway", env={"HANDLER_RELEASE": str(release)})
    job_id = await client.submit("halves", "the work")
    await client.submit("watched", 1)

    async def reported() -> bool:
        return (await client.job(job_id))["progress"] is not None

    await wait_until(reported, what="the progress report")
    argv = [sys.executable, "-m", "jobbroker", "top", "--iterations", "2", "--interval", "0.1", *common]
    screen = await asyncio.to_thread(run, argv, {})
    release.touch()
    assert screen.count(f"jobbroker at {broker.address}") == 2
    assert len(re.findall(r"^watched\s+1\s", screen, re.MULTILINE)) == 2
    assert len(re.findall(rf"^{job_id}\s+halves\s+\d+\s+\[#+\.+\]\s+50%\s+half of the work", screen, re.MULTILINE)) == 2
    assert await client.result(job_id, timeout=10 * TIME_UNIT) == "the work"


def test_submit_from_json_lines_with_progress(
    broker: BrokerProcess, secret_file: Path, start_worker: Callable[..., Process], tmp_path: Path
) -> None:
    start_worker(broker.address)
    lines = tmp_path / "numbers.jsonl"
    lines.write_text("".join(f"{n}\n" for n in range(2500)))
    common = ["--connect", broker.address, "--secret-file", str(secret_file)]
    argv = [sys.executable, "-m", "jobbroker", "submit", "squares", "--file", str(lines), "--wait", *common]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60 * TIME_UNIT, cwd=REPO)
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [(int(payload), int(square)) for _, payload, square in rows] == [(n, n * n) for n in range(2500)]
    assert "submitted [" not in result.stderr  # not a terminal: no progress bar
    in_a_terminal = subprocess.run(
        ["script", "-qec", " ".join(map(shlex.quote, argv)), "/dev/null"],
        capture_output=True,
        text=True,
        timeout=60 * TIME_UNIT,
        cwd=REPO,
    )
    assert (
        in_a_terminal.returncode == 0 and "submitted [" in in_a_terminal.stdout and "2500/2500" in in_a_terminal.stdout
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text("1\n{oops\n")
    failed = subprocess.run([*argv[:5], "--file", str(bad), *common], capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 2 and "line 2: not JSON" in failed.stderr
