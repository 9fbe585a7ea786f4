"""A fake broker in memory for the client's unit tests: broker.protocol's ServerConnection (the
real handshake, framing and MACs) joined to client.connection through a Dial, with no sockets.

Each dial makes a ServerSide; what the client writes is fed to it on the next loop turn, and
what it sends is fed to the client the same way, as a socket pair would. Requests are recorded
and answered by `answer` (default: an empty reply); a test can hold them and answer later.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from jobbroker.broker.protocol.connection import Authenticated, ServerConnection, State
from jobbroker.broker.protocol.credentials import Credential
from jobbroker.broker.protocol.messages import ErrorReply, Message, Reply, Request

SECRET = b"s" * 32
ADDRESS = "memory:7878"


class MemoryTransport(asyncio.Transport):
    """The client's end of the pair: writes go to the broker side, close() ends both ends."""

    def __init__(self, side: ServerSide) -> None:
        super().__init__()
        self._side = side
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            asyncio.get_running_loop().call_soon(self._side.receive, bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._side.lost(None)

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


class ServerSide:
    """The broker's end of one in-memory connection."""

    def __init__(self, broker: MemoryBroker, client: asyncio.Protocol, session: int) -> None:
        self.broker = broker
        self.client = client
        self.protocol = ServerConnection(broker.credentials, session=session, heartbeat=broker.heartbeat)
        self.transport = MemoryTransport(self)
        self.received: list[Message] = []  # requests and notices, in order
        self.authenticated: Authenticated | None = None
        self.closed = False

    def receive(self, data: bytes) -> None:
        if self.closed:
            return
        for event in self.protocol.receive_data(data):
            if isinstance(event, Authenticated):
                self.authenticated = event
                continue
            self.received.append(event)
            if isinstance(event, Request):
                self.broker.answer(self, event)
        self.flush()
        if self.protocol.state is State.CLOSED:
            self.drop()

    def send(self, message: Message) -> None:
        """Push a message (a delivery, results) to the client."""
        self.protocol.send(message)
        self.flush()

    def reply(self, request: Request, **data: Any) -> None:
        self.send(Reply(id=request.id, data=data))  # type: ignore[attr-defined]

    def refuse(self, request: Request, code: str, message: str) -> None:
        self.send(ErrorReply(id=request.id, code=code, message=message))  # type: ignore[attr-defined]

    def flush(self) -> None:
        data = self.protocol.data_to_send()
        if data and not self.closed:
            asyncio.get_running_loop().call_soon(self._deliver, data)

    def _deliver(self, data: bytes) -> None:
        if not self.closed:
            self.client.data_received(data)

    def drop(self) -> None:
        """The connection breaks, as a reset would."""
        self.lost(ConnectionResetError("reset by the memory broker"))

    def lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.transport._closing = True
        asyncio.get_running_loop().call_soon(self.client.connection_lost, exc)

    def requests(self, kind: type[Message]) -> list[Any]:
        return [message for message in self.received if isinstance(message, kind)]


class MemoryBroker:
    """Dial it (`dial=broker.dial`) to get a ServerSide per connection.

    Args:
        heartbeat: the interval the welcome announces.
        answer: called with each request; the default replies at once with no fields.
    """

    def __init__(
        self,
        *,
        heartbeat: float = 5.0,
        secret: bytes = SECRET,
        answer: Callable[[ServerSide, Request], None] | None = None,
    ) -> None:
        self.heartbeat = heartbeat
        self.credentials = {"default": Credential("default", "admin", (secret,))}
        self.answer = answer or (lambda side, request: side.reply(request))
        self.sides: list[ServerSide] = []
        self.dials: list[str] = []  # "refused" or "open", one per dial
        self.refuse_next = 0  # dials refused (nothing listens) before one is accepted
        self.connected = asyncio.Event()

    async def dial(self, protocol_factory: Callable[[], asyncio.Protocol], host: str, port: int, tls: object) -> None:
        if self.refuse_next > 0:
            self.refuse_next -= 1
            self.dials.append("refused")
            raise ConnectionRefusedError(111, "Connection refused")
        self.dials.append("open")
        client = protocol_factory()
        side = ServerSide(self, client, session=len(self.sides) + 1)
        self.sides.append(side)
        client.connection_made(side.transport)
        self.connected.set()

    @property
    def side(self) -> ServerSide:
        """The latest connection."""
        return self.sides[-1]
