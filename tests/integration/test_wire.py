"""Bad peers against a real broker process: wrong secrets, garbage, oversized frames,
stale completions. The broker answers each with a typed error and keeps serving others."""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import msgpack
import pytest
from jobbroker.broker.protocol.framing import FrameDecoder, encode_frame
from jobbroker.broker.protocol.messages import (
    Complete,
    Deliver,
    ErrorReply,
    Reserve,
    Results,
    Revoked,
    Started,
    Submit,
    decode,
)
from jobbroker.client.connection import Connection, parse_address

from jobbroker import AuthenticationFailed, Client
from tests.helpers import SECRET, TIME_UNIT
from tests.integration.conftest import BrokerProcess


def raw_exchange(address: str, data: bytes) -> tuple[list[Any], bool]:
    """Send raw bytes; return the frames received and whether the broker closed."""
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=5 * TIME_UNIT) as sock:
        sock.sendall(data)
        received = b""
        closed = False
        try:
            while chunk := sock.recv(65536):
                received += chunk
            closed = True
        except TimeoutError:
            pass
    return [decode(frame) for frame in FrameDecoder().feed(received)], closed


async def test_wrong_secret_is_refused(broker: BrokerProcess) -> None:
    with pytest.raises(AuthenticationFailed):
        async with Client(broker.address, secret=b"not-the-secret-at-all"):
            pass
    broker.wait_for_output(r"authentication failed from 127\.0\.0\.1")


async def test_garbage_before_auth_gets_an_error_and_a_close(broker: BrokerProcess, client: Client) -> None:
    frames, closed = await asyncio.to_thread(raw_exchange, broker.address, encode_frame(b"\xc1 garbage"))
    assert closed
    (error,) = frames
    assert isinstance(error, ErrorReply) and error.code == "malformed"
    assert await client.submit("still-serving", 1) > 0


async def test_oversized_length_gets_an_error_and_a_close(broker: BrokerProcess, client: Client) -> None:
    frames, closed = await asyncio.to_thread(raw_exchange, broker.address, struct.pack(">I", 2**31) + b"xx")
    assert closed
    (error,) = frames
    assert isinstance(error, ErrorReply) and error.code == "frame_too_large" and "2147483648" in error.message
    assert (await client.stats())["sessions"] >= 1


async def test_a_version_1_hello_is_refused_in_clear_and_the_broker_serves_on(
    broker: BrokerProcess, client: Client
) -> None:
    """Protocol version 2 (opaque payloads): a version 1 client learns why at its hello."""
    hello = msgpack.packb({"op": "hello", "version": 1, "nonce": b"n" * 32, "client": "old", "credential": "default"})
    frames, closed = await asyncio.to_thread(raw_exchange, broker.address, encode_frame(hello))
    assert closed
    (error,) = frames
    assert isinstance(error, ErrorReply) and error.id is None and error.code == "unsupported_version"
    assert "protocol version 1 is not supported" in error.message and "version 2" in error.message
    broker.wait_for_output(r"protocol version 1 is not supported")
    assert await client.submit("still-serving", 1) > 0


async def test_silent_connection_is_cut_at_the_handshake_timeout(start_broker: Any) -> None:
    broker = start_broker("--handshake-timeout", "0.3")
    frames, closed = await asyncio.to_thread(raw_exchange, broker.address, b"")
    assert closed and frames == []
    broker.wait_for_output(r"no handshake within 0\.3s")


async def test_malformed_request_after_auth_is_answered_and_the_connection_lives(broker: BrokerProcess) -> None:
    host, port = parse_address(broker.address)
    connection = await Connection.open(host, port, SECRET)
    try:
        with pytest.raises(Exception, match="queue name"):
            await connection.request(Submit, queue="", payloads=[b"\x01"])
        protocol = connection._protocol
        assert protocol._signer is not None
        protocol._outgoing.append(encode_frame(protocol._signer.sign(msgpack.packb({"op": "warp", "id": 77}))))
        connection._write()
        reply = await connection.request(Submit, queue="fine", payloads=[b"\x01"])
        assert len(reply["job_ids"]) == 1
    finally:
        connection.close()


async def test_stale_completion_after_the_broker_takes_a_job_back_is_refused(
    broker: BrokerProcess, client: Client
) -> None:
    """A worker that ignores its job's time limit: past the limit and the worker's grace, the
    broker tells it (revoked), retries the job elsewhere and refuses the stale answer."""
    host, port = parse_address(broker.address)
    first_deliveries: list[list[Any]] = []
    second_deliveries: list[list[Any]] = []
    revoked: list[list[Any]] = []
    delivered = asyncio.Event()

    def collect(into: list[list[Any]]) -> Any:
        def on_push(message: Deliver | Results | Revoked) -> None:
            if isinstance(message, Deliver):
                into.extend(message.jobs)
                delivered.set()
            elif isinstance(message, Revoked):
                revoked.extend(message.items)

        return on_push

    stale = await Connection.open(host, port, SECRET, on_push=collect(first_deliveries))
    fresh = await Connection.open(host, port, SECRET, on_push=collect(second_deliveries))
    try:
        job_id = await client.submit("fenced", 21, timeout=0.3, backoff=0.0)
        await stale.request(Reserve, queues=["fenced"], prefetch=1)
        await asyncio.wait_for(delivered.wait(), 5 * TIME_UNIT)
        delivered.clear()
        ((_, token, _, _, attempt, _, limit, _),) = first_deliveries
        assert (attempt, limit) == (1, 0.3)
        stale.send(Started(items=[[job_id, token]]))
        await stale.request(Reserve, queues=["fenced"], prefetch=0)  # take nothing more
        await fresh.request(Reserve, queues=["fenced"], prefetch=1)
        await asyncio.wait_for(delivered.wait(), 10 * TIME_UNIT)  # taken back; `fresh` gets the job
        (new,) = second_deliveries
        assert new[0] == job_id and new[1] != token and new[4] == 2
        assert revoked == [(job_id, token, "time limit")]
        refused = await stale.request(Complete, items=[[job_id, token, b"stale"]])
        assert refused == {"refused": [[0, "lease_lost"]]}
        assert await fresh.request(Complete, items=[[job_id, new[1], msgpack.packb(441)]]) == {"refused": []}
        assert await client.result(job_id, timeout=5) == 441
        assert (await client.job(job_id))["error"]["type"] == "TimeLimitExceeded"
    finally:
        stale.close()
        fresh.close()
