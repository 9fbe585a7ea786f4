"""Live fuzzing: many connections throw random and mutated frames at a running broker, before
and after authenticating, for a bounded time. Afterwards the broker still serves, a normal
producer and worker run a batch to completion, and no job submitted before the fuzzing is lost."""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from jobbroker.broker.protocol.connection import ClientConnection, State
from jobbroker.broker.protocol.framing import encode_frame
from jobbroker.broker.protocol.messages import MESSAGE_TYPES
from jobbroker.client.connection import parse_address

from jobbroker import Client, Worker
from tests.helpers import TIME_UNIT
from tests.integration.conftest import BrokerProcess

FUZZ_SECONDS = 4.0
FUZZERS = 16
OWNER, FUZZ = b"owner-secret-0123456789ab", b"fuzz-secret-0123456789abc"


@pytest.fixture
def fuzzed_broker(start_broker: Callable[..., BrokerProcess], tmp_path: Path) -> BrokerProcess:
    for name, secret in (("owner", OWNER), ("fuzz", FUZZ)):
        path = tmp_path / f"{name}.secret"
        path.write_bytes(secret)
        path.chmod(0o600)
    credentials = tmp_path / "credentials.toml"
    credentials.write_text(
        '[owner]\nrole = "admin"\nsecret_files = ["owner.secret"]\n'
        '[fuzz-producer]\nrole = "producer"\nsecret_files = ["fuzz.secret"]\n'
        '[fuzz-worker]\nrole = "worker"\nsecret_files = ["fuzz.secret"]\n'
    )
    return start_broker("--credentials", str(credentials), "--handshake-timeout", "1", "--max-frame-size", "65536")


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**63 - 1, -(2**63), rng.randrange(-1000, 10**6)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, float("inf"), float("nan"), rng.random()])
    if kind == 4:
        return "".join(rng.choice("ab\x00\n\u00e9 -_/@q") for _ in range(rng.randrange(0, 30)))
    if kind == 5:
        return rng.randbytes(rng.randrange(0, 40))
    if kind in (6, 7):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {random_value(rng, 3) if rng.random() < 0.2 else str(i): random_value(rng, depth + 1) for i in range(3)}


def mutated_body(rng: random.Random) -> bytes:
    """A map that looks like a request: a real op, real and random field names, random values."""
    op = rng.choice(list(MESSAGE_TYPES))
    fields = ["id", "queue", "payloads", "items", "job_ids", "queues", "prefetch", "job_id", "keys", "delay"]
    wire = {"op": op, "id": rng.randrange(0, 2**40)}
    for name in rng.sample(fields, rng.randrange(0, len(fields))):
        wire[name] = random_value(rng)
    if rng.random() < 0.3:
        wire["queue"] = f"fz-{rng.randrange(100)}"
        wire["payloads"] = [random_value(rng) for _ in range(rng.randrange(1, 5))]
    body = msgpack.packb(wire, use_bin_type=True)
    if rng.random() < 0.2:  # flip bytes inside an otherwise valid body
        flipped = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        body = bytes(flipped)
    return body


async def fuzz_once(host: str, port: int, rng: random.Random) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        strategy = rng.randrange(5)
        if strategy == 0:  # noise before anything
            writer.write(rng.randbytes(rng.randrange(1, 2000)))
        elif strategy == 1:  # a header promising far too much
            writer.write(struct.pack(">I", rng.randrange(65537, 2**32)) + rng.randbytes(10))
        elif strategy == 2:  # a plausible frame of garbage before the handshake
            writer.write(encode_frame(mutated_body(rng)))
        else:  # authenticate, then misbehave
            credential = rng.choice(["fuzz-producer", "fuzz-worker"])
            connection = ClientConnection(FUZZ, credential=credential, client="fuzzer")
            connection.initiate()
            while connection.state not in (State.OPEN, State.CLOSED):
                writer.write(connection.data_to_send())
                data = await asyncio.wait_for(reader.read(65536), 2)
                if not data:
                    return
                connection.receive_data(data)
            writer.write(connection.data_to_send())
            signer = connection._signer
            if connection.state is not State.OPEN or signer is None:
                return
            for _ in range(rng.randrange(1, 30)):
                body = mutated_body(rng)
                frame = encode_frame(signer.sign(body))
                if strategy == 4 and rng.random() < 0.1:  # tamper after signing
                    frame = frame[:-1] + bytes([frame[-1] ^ 1])
                writer.write(frame)
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(65536), 0.2)
        except TimeoutError:
            pass
    except (ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()


async def fuzzer(address: str, seed: int, deadline: float) -> int:
    host, port = parse_address(address)
    rng = random.Random(seed)
    rounds = 0
    while time.monotonic() < deadline:
        await fuzz_once(host, port, rng)
        rounds += 1
    return rounds


async def test_the_broker_survives_live_fuzzing(fuzzed_broker: BrokerProcess) -> None:
    address = fuzzed_broker.address
    async with Client(address, secret=OWNER, credential="owner") as owner:
        before = await owner.submit_many("real", range(200))
        deadline = time.monotonic() + FUZZ_SECONDS
        rounds = await asyncio.gather(*(fuzzer(address, seed, deadline) for seed in range(FUZZERS)))
        assert sum(rounds) > 100
        assert fuzzed_broker.popen.poll() is None, fuzzed_broker.output()[-3000:]

        after = await owner.submit_many("real", range(200, 300))

        async def square(n: int) -> int:
            return n * n

        worker = Worker(address, secret=OWNER, credential="owner", queues=["real"], handler=square, concurrency=32)
        running = asyncio.create_task(worker.run())
        try:
            results = await asyncio.gather(*(owner.result(i, timeout=30 * TIME_UNIT) for i in before + after))
        finally:
            worker.stop()
            await running
        assert results == [n * n for n in range(300)]
        assert (await owner.stats())["queues"]["real"]["done"] == 300
    assert "Traceback" not in fuzzed_broker.output()
