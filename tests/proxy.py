"""A slow link for tests and benchmarks: a loopback relay whose broker-to-client direction is
throttled (tests/integration/test_flow.py, benchmarks/flow.py)."""

from __future__ import annotations

import asyncio

from jobbroker.client.connection import parse_address

__all__ = ["ThrottledProxy"]


class ThrottledProxy:
    """A loopback relay to the broker whose broker-to-client direction carries at most `rate`
    bytes a second: a slow link in front of a client that reads as fast as it can."""

    def __init__(self, target: str, rate: float) -> None:
        self.target = parse_address(target)
        self.rate = rate
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        broker_reader, broker_writer = await asyncio.open_connection(*self.target)
        tasks = [
            asyncio.ensure_future(self._pipe(client_reader, broker_writer, None)),
            asyncio.ensure_future(self._pipe(broker_reader, client_writer, self.rate)),
        ]
        self._tasks.update(tasks)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        client_writer.close()
        broker_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rate: float | None) -> None:
        loop = asyncio.get_running_loop()
        started, sent = loop.time(), 0
        try:
            while data := await reader.read(16384):
                writer.write(data)
                await writer.drain()
                if rate is not None:
                    sent += len(data)
                    ahead = started + sent / rate - loop.time()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        except (ConnectionError, OSError):
            pass  # one side went away: the relay ends

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
