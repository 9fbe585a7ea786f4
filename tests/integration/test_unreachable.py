"""A wrong address says so in seconds: nothing listening, something else answering, a port that
accepts and hangs up."""

from __future__ import annotations

import asyncio
import time

import pytest

from jobbroker import BrokerUnreachable, Client
from tests.helpers import SECRET, TIME_UNIT


async def _serve(behaviour: str) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if behaviour == "http":
            await reader.read(100)
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("behaviour", ["http", "close"])
async def test_something_else_at_the_address_fails_in_seconds(behaviour: str) -> None:
    server = await _serve(behaviour)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnreachable, match=f"cannot reach the broker at {address}") as failed:
            async with Client(address, secret=SECRET):
                pass
    finally:
        server.close()
    assert time.monotonic() - started < 5 * TIME_UNIT
    if behaviour == "http":
        assert "does not speak jobbroker's protocol" in str(failed.value)
