"""Flow control and hostile input (issue 11): memory per connection bounded whatever the
request, slow readers served at the speed of their link rather than cut off, queues freed,
idle sockets that cannot lock others out, TLS on one side only failing at once."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import trustme
from jobbroker.broker.protocol.messages import JobInfo, Reserve, Watch
from jobbroker.client.connection import Connection, parse_address

from jobbroker import Client, LimitExceeded, ReplyTooLarge, TlsMismatch, Worker
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import REPO, BrokerProcess, wait_until
from tests.proxy import ThrottledProxy

MiB = 1024 * 1024


def memory_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


async def test_many_job_requests_on_a_big_payload_keep_the_broker_small(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker("--memory")
    host, port = parse_address(broker.address)
    async with Client(broker.address, secret=SECRET) as client:
        big = await client.submit("q", "z" * 1_000_000)
        await client.stats()
        before = memory_kib(broker.pid, "VmRSS")
        reader = await Connection.open(host, port, SECRET)
        try:
            # 300 requests of 20 bytes each in one write: 300 MB of replies if built at once.
            replies = await asyncio.wait_for(
                asyncio.gather(*(reader.request(JobInfo, job_id=big) for _ in range(300))), 60 * TIME_UNIT
            )
        finally:
            reader.close()
    assert all(reply["job"]["payload"] == msgpack.packb("z" * 1_000_000) for reply in replies)  # opaque bytes
    grown_mib = (memory_kib(broker.pid, "VmHWM") - before) / 1024
    assert grown_mib < 64, f"the broker's peak RSS grew by {grown_mib:.0f} MiB"


async def test_a_watch_naming_a_big_result_many_times_keeps_the_broker_small(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker("--memory")
    host, port = parse_address(broker.address)

    async def big_result(n: int) -> str:
        return "r" * 1_000_000

    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("big", 1)
        worker = Worker(broker.address, secret=SECRET, queues=["big"], handler=big_result)
        running = asyncio.create_task(worker.run())
        try:
            assert len(await client.result(job_id, timeout=20 * TIME_UNIT)) == 1_000_000
        finally:
            worker.stop()
            await running
        before = memory_kib(broker.pid, "VmRSS")
        pushed: list[object] = []
        watcher = await Connection.open(host, port, SECRET, on_push=pushed.append)
        try:
            await watcher.request(Watch, job_ids=[job_id] * 300)  # 361 bytes asking for 300 MB
            await watcher.request(JobInfo, job_id=job_id)  # answered after the outcome is pushed
        finally:
            watcher.close()
    assert len(pushed) == 1  # one outcome per job
    grown_mib = (memory_kib(broker.pid, "VmHWM") - before) / 1024
    assert grown_mib < 64, f"the broker's peak RSS grew by {grown_mib:.0f} MiB"


async def test_a_reply_over_the_connections_budget_is_refused_with_a_typed_error(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker("--memory", "--max-write-buffer", "400000")
    async with Client(broker.address, secret=SECRET) as client:
        job_id = await client.submit("q", "z" * 500_000)
        with pytest.raises(ReplyTooLarge, match="ask for less"):
            await client.job(job_id)
        assert (await client.job(await client.submit("q", "small")))["payload"] == "small"


@pytest.mark.parametrize("storage", [["--memory"], []], ids=["memory", "durable"])
async def test_a_slow_reader_gets_every_result_at_the_speed_of_its_link(
    start_broker: Callable[..., BrokerProcess], storage: list[str]
) -> None:
    # 100 results of 128 KiB through 2 MiB/s: 6.25 s of link. Before flow control the broker
    # cut the reader off at --max-write-buffer, it reconnected, watched again, was cut off again.
    broker = start_broker(*storage, "--max-write-buffer", str(2 * MiB))
    rate, count, size = 2 * MiB, 100, 128 * 1024
    link_seconds = count * size / rate
    proxy = ThrottledProxy(broker.address, rate)
    address = await proxy.start()

    async def large(n: int) -> bytes:
        return bytes([n % 256]) * size

    worker = Worker(broker.address, secret=SECRET, queues=["large"], handler=large, concurrency=8)
    running = asyncio.create_task(worker.run())
    try:
        async with Client(address, secret=SECRET, name="throttled") as client:
            started = time.monotonic()
            results = await client.map("large", range(count), timeout=60 * TIME_UNIT)
            elapsed = time.monotonic() - started
    finally:
        worker.stop()
        await running
        await proxy.close()
    assert [r[:1] for r in results] == [bytes([n % 256]) for n in range(count)]
    assert proxy.connections == 1, "the reader was cut off and reconnected"
    assert "does not read" not in broker.output()
    assert elapsed < (1.5 * link_seconds + 3.0) * TIME_UNIT, f"{elapsed:.1f}s for {link_seconds:.2f}s of link"


async def test_queues_that_nothing_uses_any_more_are_freed(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker("--memory", "--max-queues", "3")
    host, port = parse_address(broker.address)
    async with Client(broker.address, secret=SECRET) as client:
        greedy = await Connection.open(host, port, SECRET)
        await greedy.request(Reserve, queues=["a", "b", "c"], prefetch=1)
        with pytest.raises(LimitExceeded, match="queues"):
            await client.submit("d", 1)
        greedy.close()

        async def submitted() -> bool:
            # The unused queues make room: swept lazily, at most once a second at the limit.
            try:
                return await client.submit("d", 1) > 0
            except LimitExceeded:
                return False

        await wait_until(submitted, timeout=5, what="room for a new queue")
        assert set((await client.stats())["queues"]) == {"d"}


async def test_idle_unauthenticated_sockets_do_not_lock_clients_out(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker(
        "--memory", "--max-connections", "40", "--max-handshakes-per-ip", "10", "--handshake-timeout", "60"
    )
    host, port = parse_address(broker.address)
    async with Client(broker.address, secret=SECRET) as early:
        idle = [socket.create_connection((host, port)) for _ in range(100)]  # more than the limit
        try:
            async with Client(broker.address, secret=SECRET, reconnect_timeout=3) as late:
                assert await late.submit("q", 1) > 0
            assert await early.submit("q", 2) > 0  # an authenticated connection is never closed for room
            assert (await early.stats())["queues"]["q"]["pending"] == 2
        finally:
            for sock in idle:
                sock.close()
    lines = [line for line in broker.output().splitlines() if "WARNING" in line and "127.0.0.1" in line]
    assert 1 <= len(lines) <= 3, "\n".join(lines)  # one line per address and kind, with a count


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    authority.cert_pem.write_to_path(str(ca_file))
    return cert_file, key_file, ca_file


async def test_a_plaintext_client_at_a_tls_port_fails_at_once_saying_so(
    start_broker: Callable[..., BrokerProcess], tls_files: tuple[Path, Path, Path], secret_file: Path
) -> None:
    cert_file, key_file, _ = tls_files
    broker = start_broker("--memory", "--tls-cert", str(cert_file), "--tls-key", str(key_file))
    started = time.monotonic()
    with pytest.raises(TlsMismatch, match="speaks TLS only"):
        async with Client(broker.address, secret=SECRET):  # reconnect_timeout: 30 s
            pass
    worker = Worker(broker.address, secret=SECRET, queues=["q"], handler=abs)  # reconnect_timeout: 1 h
    with pytest.raises(TlsMismatch):
        await asyncio.wait_for(worker.run(), 20 * TIME_UNIT)
    assert time.monotonic() - started < 5 * TIME_UNIT
    argv = [sys.executable, "-m", "jobbroker", "stats", "--connect", broker.address, "--secret-file", str(secret_file)]
    cli = await asyncio.to_thread(subprocess.run, argv, cwd=REPO, capture_output=True, text=True, timeout=20)
    assert cli.returncode == 3 and "speaks TLS only" in cli.stderr and "--tls-ca" in cli.stderr  # could not reach


async def test_a_tls_client_at_a_plaintext_port_fails_at_once_saying_so(
    broker: BrokerProcess, tls_files: tuple[Path, Path, Path]
) -> None:
    _, _, ca_file = tls_files
    started = time.monotonic()
    with pytest.raises(TlsMismatch, match="does not speak TLS"):
        async with Client(broker.address, secret=SECRET, tls=str(ca_file)):
            pass
    assert time.monotonic() - started < 5 * TIME_UNIT
    broker.wait_for_output(r"a TLS client at a plaintext port")


async def test_a_flood_of_failing_connections_makes_a_few_log_lines(
    start_broker: Callable[..., BrokerProcess],
) -> None:
    broker = start_broker("--memory", "--handshake-timeout", "0.5", "--max-handshakes-per-ip", "1000")
    host, port = parse_address(broker.address)
    silent = [socket.create_connection((host, port)) for _ in range(300)]
    try:

        async def all_closed() -> bool:
            return all(_closed_by_peer(sock) for sock in silent)

        await wait_until(all_closed, what="the broker to close every silent connection")
    finally:
        for sock in silent:
            sock.close()
    lines = [line for line in broker.output().splitlines() if "no handshake within" in line]
    assert 1 <= len(lines) <= 3, "\n".join(lines)  # 300 failures: one line, then one with a count


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


async def test_a_reconnecting_client_watches_again_in_bounded_batches(
    broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with Client(broker.address, secret=SECRET) as client:
        ids = await client.submit_many("nobody-works-here", list(range(1200)))
        waiting = [asyncio.ensure_future(client.result(job_id, timeout=30 * TIME_UNIT)) for job_id in ids]
        await client.stats()  # the first watch has gone out
        watches: list[tuple[int, int]] = []  # (ids in the watch, requests still unanswered)
        request = Connection.request

        def spy(self: Connection, request_type: type, **fields: object) -> asyncio.Future[dict[str, object]]:
            if request_type is Watch:
                watches.append((len(fields["job_ids"]), len(self._pending)))  # type: ignore[arg-type]
            return request(self, request_type, **fields)  # type: ignore[arg-type]

        monkeypatch.setattr(Connection, "request", spy)
        client._link.current._transport.abort()  # type: ignore[union-attr]  # the connection drops

        async def watched_again() -> bool:
            return sum(n for n, _ in watches) == 1200

        await wait_until(watched_again, what="every job watched again")
        assert watches == [(500, 0), (500, 0), (200, 0)]  # each batch after the reply to the last
        for future in waiting:
            future.cancel()
