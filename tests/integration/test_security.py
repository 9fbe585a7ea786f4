"""A broker exposed to a hostile network: credentials with roles, rotation, every way to fail
authentication, the throttle, TLS, limits, and peers that are slow, silent or greedy."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from jobbroker.broker.protocol.connection import ClientConnection, State
from jobbroker.broker.protocol.framing import FrameDecoder
from jobbroker.broker.protocol.messages import ErrorReply, JobInfo, Release, Reserve, Stats, Submit, decode
from jobbroker.client.connection import Connection, parse_address

from jobbroker import (
    AuthenticationFailed,
    Client,
    ConnectionClosed,
    Forbidden,
    InvalidRequest,
    JobDead,
    JobNotFound,
    LimitExceeded,
    TlsMismatch,
    Worker,
)
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import BrokerProcess

APP_OLD, APP_NEW = b"app-secret-old-0123456789", b"app-secret-new-0123456789"
OTHER, CREW, OPS = b"other-app-secret-01234567", b"crew-secret-0123456789ab", b"ops-secret-0123456789abcd"


@pytest.fixture
def credentials_file(tmp_path: Path) -> Path:
    for name, secret in (("app-old", APP_OLD), ("app-new", APP_NEW), ("other", OTHER), ("crew", CREW), ("ops", OPS)):
        path = tmp_path / f"{name}.secret"
        path.write_bytes(secret + b"\n")
        path.chmod(0o600)
    path = tmp_path / "credentials.toml"
    path.write_text(
        """
[app]
role = "producer"
secret_files = ["app-old.secret", "app-new.secret"]

[other-app]
role = "producer"
secret_files = ["other.secret"]

[crew]
role = "worker"
secret_files = ["crew.secret"]

[ops]
role = "admin"
secret_files = ["ops.secret"]
"""
    )
    return path


@pytest.fixture
def secured(start_broker: Callable[..., BrokerProcess], credentials_file: Path) -> BrokerProcess:
    return start_broker("--credentials", str(credentials_file))


def as_(broker: BrokerProcess, credential: str, secret: bytes, **options: Any) -> Client:
    return Client(broker.address, secret=secret, credential=credential, reconnect_timeout=2, **options)


async def test_each_role_may_do_its_part_and_nothing_else(secured: BrokerProcess) -> None:
    async with as_(secured, "app", APP_NEW) as app, as_(secured, "ops", OPS) as ops:
        job_id = await app.submit("work", 6)
        with pytest.raises(Forbidden, match="'stats' is not allowed for credential 'app'"):
            await app.stats()
        with pytest.raises(Forbidden):
            await app.dead_letters("work")
        host, port = parse_address(secured.address)
        crew = await Connection.open(host, port, CREW, credential="crew")
        try:
            with pytest.raises(Forbidden):
                await crew.request(Submit, queue="work", payloads=[b"\x01"])
            with pytest.raises(Forbidden):
                await crew.request(Stats)
        finally:
            crew.close()
        producer_side = await Connection.open(host, port, APP_NEW, credential="app")
        try:
            with pytest.raises(Forbidden):
                await producer_side.request(Reserve, queues=["work"], prefetch=1)
            with pytest.raises(Forbidden):
                await producer_side.request(Release, items=[])
        finally:
            producer_side.close()

        async def triple(n: int) -> int:
            return 3 * n

        worker = Worker(secured.address, secret=CREW, credential="crew", queues=["work"], handler=triple)
        running = asyncio.create_task(worker.run())
        try:
            assert await app.result(job_id, timeout=10 * TIME_UNIT) == 18
        finally:
            worker.stop()
            await running
        stats = await ops.stats()
        assert stats["queues"]["work"]["done"] == 1
        assert await ops.purge_dead("work") == 0


async def test_producers_see_only_their_own_jobs(secured: BrokerProcess) -> None:
    async with as_(secured, "app", APP_OLD) as app, as_(secured, "other-app", OTHER) as other:
        mine = await app.submit("work", "mine")
        with pytest.raises(JobNotFound):
            await other.job(mine)
        assert await other.cancel_many([mine]) == {mine: "not_found"}
        with pytest.raises(JobNotFound):
            await other.result(mine, timeout=5)
        assert (await app.job(mine))["state"] == "pending"
        await app.cancel(mine)


async def test_both_secrets_of_a_rotating_credential_work(secured: BrokerProcess) -> None:
    for secret in (APP_OLD, APP_NEW):
        async with as_(secured, "app", secret) as app:
            assert await app.submit("work", 1) > 0


@pytest.mark.parametrize(
    ("credential", "secret"),
    [("app", b"a-wrong-secret-for-app-123"), ("nobody", APP_NEW), ("crew", OPS)],
    ids=["wrong secret", "unknown name", "another's secret"],
)
async def test_authentication_failures(secured: BrokerProcess, credential: str, secret: bytes) -> None:
    with pytest.raises(AuthenticationFailed):
        async with as_(secured, credential, secret):
            pass
    secured.wait_for_output(r"authentication failed from 127\.0\.0\.1")


def test_a_recorded_handshake_cannot_be_replayed(secured: BrokerProcess) -> None:
    host, port = parse_address(secured.address)
    recorded = b""
    with socket.create_connection((host, port), timeout=5) as sock:
        client = ClientConnection(APP_NEW, credential="app")
        client.initiate()
        while client.state is not State.OPEN:
            outgoing = client.data_to_send()
            recorded += outgoing
            sock.sendall(outgoing)
            client.receive_data(sock.recv(65536))
    assert b"hello" in recorded and b"authenticate" in recorded
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(recorded)  # the old proof answers a challenge with a new nonce
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    frames = [decode(f) for f in FrameDecoder().feed(received)]
    assert isinstance(frames[-1], ErrorReply) and frames[-1].code == "auth_failed"


async def test_repeated_failures_slow_that_address_down(secured: BrokerProcess) -> None:
    for _ in range(4):
        with pytest.raises(AuthenticationFailed):
            async with as_(secured, "app", b"a-wrong-secret-for-app-123"):
                pass
    started = time.monotonic()
    async with as_(secured, "app", APP_NEW) as app:
        await app.submit("work", 1)
    assert time.monotonic() - started >= 0.35  # 0.1 s doubled per failure: 0.8 s after four


async def test_tls_happy_path_wrong_ca_and_plain_tcp(
    start_broker: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    authority.cert_pem.write_to_path(str(ca_file))
    broker = start_broker("--tls-cert", str(cert_file), "--tls-key", str(key_file))
    broker.wait_for_output(r"\(TLS\)")

    async with Client(broker.address, secret=SECRET, tls=str(ca_file)) as client:
        assert await client.submit("tls", 1) > 0
    context = ssl.create_default_context()
    authority.configure_trust(context)
    async with Client(broker.address, secret=SECRET, tls=context) as client:
        assert (await client.stats())["queues"]["tls"]["pending"] == 1

    stranger = trustme.CA()
    stranger_file = tmp_path / "stranger.pem"
    stranger.cert_pem.write_to_path(str(stranger_file))
    with pytest.raises(ssl.SSLCertVerificationError):
        async with Client(broker.address, secret=SECRET, tls=str(stranger_file), reconnect_timeout=1):
            pass
    with pytest.raises(TlsMismatch):
        async with Client(broker.address, secret=SECRET, reconnect_timeout=1):
            pass


async def test_limits_answer_with_typed_errors(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker("--max-payload-size", "1000", "--max-result-size", "1000", "--max-queues", "3")
    async with Client(broker.address, secret=SECRET) as client:
        with pytest.raises(LimitExceeded, match="payload 1 is over the limit of 1000 bytes"):
            await client.submit_many("q1", ["small", "x" * 2000])
        with pytest.raises(LimitExceeded, match="the limit is 10000"):
            await client.submit_many("q1", range(10_001))
        with pytest.raises(InvalidRequest, match="queue name"):
            await client.submit("bad name\n", 1)
        with pytest.raises(InvalidRequest, match="idempotency key"):
            await client.submit("q1", 1, key="k" * 201)
        for name in ("q1", "q2", "q3"):
            await client.submit(name, 1)
        with pytest.raises(LimitExceeded, match="queues"):
            await client.submit("q4", 1)
        host, port = parse_address(broker.address)
        greedy = await Connection.open(host, port, SECRET)
        try:
            with pytest.raises(InvalidRequest, match="prefetch"):
                await greedy.request(Reserve, queues=["q1"], prefetch=10_001)
        finally:
            greedy.close()

        async def huge(n: int) -> str:
            return "y" * 5000

        job_id = await client.submit("q2", 1, max_attempts=1)
        worker = Worker(broker.address, secret=SECRET, queues=["q2"], handler=huge)
        running = asyncio.create_task(worker.run())
        try:
            with pytest.raises(JobDead) as info:
                await client.result(job_id, timeout=10 * TIME_UNIT)
            assert info.value.error["type"] == "ResultTooLarge"
        finally:
            worker.stop()
            await running


async def test_connection_limit(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker("--max-connections", "3")
    async with Client(broker.address, secret=SECRET) as first, Client(broker.address, secret=SECRET):
        async with Client(broker.address, secret=SECRET):
            with pytest.raises((AuthenticationFailed, ConnectionClosed, OSError, TimeoutError)):
                async with Client(broker.address, secret=SECRET, reconnect_timeout=0.5):
                    pass
        async with Client(broker.address, secret=SECRET) as again:  # room again
            assert await again.submit("q", 1) > 0
        assert await first.submit("q", 2) > 0
    broker.wait_for_output(r"refusing 127\.0\.0\.1:\d+: 3 connections, the limit")


async def test_a_peer_that_never_reads_is_cut_off(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker("--max-write-buffer", "1000000")
    host, port = parse_address(broker.address)
    async with Client(broker.address, secret=SECRET) as client:
        big = await client.submit("q", "z" * 100_000)
        hog = await Connection.open(host, port, SECRET)
        hog._transport.pause_reading()  # type: ignore[union-attr]  # reads nothing from now on
        hog._heartbeat_timer.cancel()  # type: ignore[union-attr]  # nor gives up on a silent broker
        requests = [hog.request(JobInfo, job_id=big) for _ in range(400)]  # 40 MB of replies
        await asyncio.to_thread(broker.wait_for_output, r"does not read its replies; disconnecting", 30)
        hog.close()
        await asyncio.gather(*requests, return_exceptions=True)
        assert (await client.job(big))["state"] == "pending"  # others are served as before


async def test_slow_and_idle_connections_do_not_starve_others(start_broker: Callable[..., BrokerProcess]) -> None:
    broker = start_broker("--handshake-timeout", "1")
    host, port = parse_address(broker.address)
    idle = [socket.create_connection((host, port)) for _ in range(1000)]
    trickle = socket.create_connection((host, port))
    try:
        async with Client(broker.address, secret=SECRET) as client:
            started = time.monotonic()
            for byte in struct.pack(">I", 40):  # one byte at a time, slowly
                trickle.send(bytes([byte]))
                assert await client.submit("busy", 1) > 0
                await asyncio.sleep(0.3)
            assert time.monotonic() - started < 8 * TIME_UNIT
            await asyncio.sleep(1.5)
            trickle.settimeout(2)
            assert trickle.recv(100) == b""  # cut at the handshake timeout
            assert (await client.stats())["queues"]["busy"]["pending"] == 4
    finally:
        for sock in [*idle, trickle]:
            sock.close()


async def test_big_payloads_travel_in_frames_under_the_limit(broker: BrokerProcess) -> None:
    async with Client(broker.address, secret=SECRET) as client:
        big = "p" * 900_000  # under the payload limit; twenty of them are over the frame limit
        with pytest.raises(LimitExceeded, match="submit fewer at a time"):
            await client.submit_many("big", [big] * 20)
        ids = []
        for _ in range(4):
            ids += await client.submit_many("big", [big] * 5)

        async def size(payload: str) -> int:
            return len(payload)

        worker = Worker(broker.address, secret=SECRET, queues=["big"], handler=size, concurrency=20, prefetch=20)
        running = asyncio.create_task(worker.run())
        try:  # the 20 deliveries (18 MB) must come in several frames
            assert await asyncio.gather(*(client.result(i, timeout=30 * TIME_UNIT) for i in ids)) == [900_000] * 20
        finally:
            worker.stop()
            await running
