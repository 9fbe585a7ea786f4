"""The asyncio shell around broker.protocol's ClientConnection: one TCP connection to the
broker, request id -> future, pushes handed to a callback, heartbeats both ways.

Loss has one idempotent path, _fail(): every pending future gets ConnectionClosed (with the
cause), the timers stop, the transport is closed and `closed` resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from jobbroker.broker.errors import (
    AuthenticationFailed,
    ConnectionClosed,
    FrameTooLarge,
    IntegrityError,
    NotLeader,
    ProtocolError,
    TlsMismatch,
    broker_error,
)
from jobbroker.broker.protocol.connection import ClientConnection, State
from jobbroker.broker.protocol.credentials import DEFAULT_CREDENTIAL
from jobbroker.broker.protocol.framing import DEFAULT_MAX_FRAME_SIZE
from jobbroker.broker.protocol.messages import (
    Deliver,
    ErrorReply,
    Heartbeat,
    Message,
    Progressed,
    Reply,
    Request,
    Results,
    Revoked,
    Welcome,
)
from jobbroker.client.settings import client_tls, default_address

log = logging.getLogger("jobbroker.client")

# client_tls and default_address live in client/settings.py, Link, Rotation, backoff_delays,
# is_retryable and parse_addresses in client/link.py; all kept importable from here.
__all__ = ["Connection", "Dial", "PushHandler", "client_tls", "default_address", "dial_tcp", "parse_address"]


PushHandler = Callable[[Deliver | Results | Progressed | Revoked], None]
# Opens the byte stream to host:port (over TLS with a context) and attaches the protocol the
# factory makes, as loop.create_connection does: the one place the client touches sockets, so
# that tests can join a client to a broker in memory (tests/unit/memory_broker.py).
Dial = Callable[[Callable[[], asyncio.Protocol], str, int, "ssl.SSLContext | None"], Awaitable[object]]


async def dial_tcp(
    protocol_factory: Callable[[], asyncio.Protocol], host: str, port: int, tls: ssl.SSLContext | None
) -> None:
    """The usual Dial: TCP, with TLS when given a context."""
    await asyncio.get_running_loop().create_connection(
        protocol_factory, host, port, ssl=tls, server_hostname=host if tls is not None else None
    )


_HEARTBEAT = Heartbeat()
# Connection-level error codes after which the broker closes the connection (docs/protocol.md).
_FATAL_CODES = frozenset(
    {
        AuthenticationFailed.code,
        FrameTooLarge.code,
        IntegrityError.code,
        ProtocolError.code,
        TlsMismatch.code,
        "unsupported_version",
    }
)
# What OpenSSL says when the peer answers a ClientHello with something that is not TLS.
_NOT_TLS_REASONS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"})
_TLS_PROBE_TIMEOUT = 2.0
_HEARTBEATS_MISSED_BEFORE_DEAD = 3


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _log_unanswered(future: asyncio.Future[dict[str, Any]]) -> None:
    # NotLeader needs no word: the connection to the standby closes and the Link moves on.
    if not future.cancelled() and not isinstance(future.exception(), NotLeader | None):
        log.warning("request failed: %s", future.exception())


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: Connection) -> None:
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.owner._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.owner._data_received(data)

    def eof_received(self) -> bool | None:
        self.owner._closed_before_data = not self.owner._received_any
        self.owner._fail(ConnectionClosed("broker closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._fail(ConnectionClosed("connection lost", exc))


class Connection:
    """An authenticated connection to the broker. Make one with `await Connection.open(...)`."""

    def __init__(
        self, secret: bytes, *, credential: str, client: str, on_push: PushHandler | None, max_frame_size: int
    ) -> None:
        self._protocol = ClientConnection(secret, credential=credential, client=client, max_frame_size=max_frame_size)
        self._on_push = on_push
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 1
        self._write_scheduled = False
        self._welcome: asyncio.Future[Welcome] = self._loop.create_future()
        self.closed: asyncio.Future[ConnectionClosed] = self._loop.create_future()
        self._last_received = self._loop.time()
        self._heartbeat_timer: asyncio.TimerHandle | None = None
        self._received_any = False
        self._closed_before_data = False  # the broker closed without a byte: a TLS port?
        self.heartbeat = 5.0
        self.session = 0
        # A standby (docs/protocol.md, "Standbys"): it named `leader` in its welcome, or refused
        # a request with not_leader. Not used for new requests; closed once none is pending.
        self.standby = False
        self.leader: str | None = None
        self.served = False  # a request succeeded: this broker led (for Link's search)

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        secret: bytes,
        *,
        credential: str = DEFAULT_CREDENTIAL,
        client: str = "client",
        on_push: PushHandler | None = None,
        timeout: float = 10.0,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        tls: ssl.SSLContext | None = None,
        dial: Dial = dial_tcp,
    ) -> Connection:
        """Connect (over TLS with `tls`, through `dial`) and authenticate as `credential`.

        Raises:
            OSError: the broker cannot be reached; ssl.SSLError: TLS failed (wrong CA).
            TlsMismatch: we speak TLS and the broker does not, or the reverse.
            AuthenticationFailed: the broker refused our proof or we refused its (wrong secret).
            ConnectionClosed: the connection was lost during the handshake.
            TimeoutError: no handshake within `timeout`.
        """
        self = cls(secret, credential=credential, client=client, on_push=on_push, max_frame_size=max_frame_size)
        try:
            async with asyncio.timeout(timeout):
                await dial(lambda: _Protocol(self), host, port, tls)
                self._protocol.initiate()
                self._write()
                try:
                    welcome = await self._welcome
                except BaseException:
                    self._fail(ConnectionClosed("handshake abandoned"))
                    raise
        except ssl.SSLError as exc:
            if exc.reason in _NOT_TLS_REASONS:
                raise TlsMismatch(
                    f"the broker at {host}:{port} does not speak TLS (it runs without --tls-cert): "
                    f"connect without tls= / --tls-ca / $JOBBROKER_TLS_CA ({exc})"
                ) from exc
            raise
        except ConnectionClosed:
            # A TLS broker closes at once, without a word, on a hello in the clear: ask it.
            if tls is None and self._closed_before_data and await _speaks_tls(host, port):
                raise TlsMismatch(
                    f"the broker at {host}:{port} speaks TLS only: connect with tls= (the CA file), "
                    "--tls-ca or $JOBBROKER_TLS_CA"
                ) from None
            raise
        self.heartbeat = welcome.heartbeat
        self.session = welcome.session
        if welcome.leader is not None:
            self.standby = True
            self.leader = welcome.leader
        self._heartbeat_timer = self._loop.call_later(self.heartbeat, self._on_heartbeat_timer)
        return self

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    def request(self, request_type: type[Request], **fields: Any) -> asyncio.Future[dict[str, Any]]:
        """Send a request; the future resolves to the reply's fields.

        The future fails with a BrokerError subclass if the broker refuses, or ConnectionClosed.
        """
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        if self.closed.done():
            future.set_exception(self.closed.result())
            return future
        request_id = self._next_id
        self._next_id += 1
        request: Message = request_type(id=request_id, **fields)  # type: ignore[call-arg]
        self._protocol.send(request)  # raises if unencodable
        self._pending[request_id] = future
        self._schedule_write()
        return future

    def request_nowait(self, request_type: type[Request], **fields: Any) -> None:
        """Send a request whose reply nobody awaits; a refusal or loss is only logged."""
        self.request(request_type, **fields).add_done_callback(_log_unanswered)

    def send(self, message: Message) -> None:
        """Send a message that has no reply (a heartbeat)."""
        if not self.closed.done():
            self._protocol.send(message)
            self._schedule_write()

    def close(self) -> None:
        """Close from our side. Idempotent."""
        self._fail(ConnectionClosed("closed by the client"))

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)

    # --- internals --------------------------------------------------------------------

    def _schedule_write(self) -> None:
        # One write per loop turn, however many requests were made in it (pipelining).
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._write_scheduled = False
        data = self._protocol.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _data_received(self, data: bytes) -> None:
        self._received_any = True
        self._last_received = self._loop.time()
        protocol = self._protocol
        for event in protocol.receive_data(data):
            if isinstance(event, Reply):
                self.served = True
                future = self._pending.pop(event.id, None)
                if future is not None and not future.done():
                    future.set_result(event.data)
            elif isinstance(event, ErrorReply):
                self._error_reply(event)
            elif isinstance(event, Deliver | Results | Progressed | Revoked):
                if self._on_push is not None:
                    self._on_push(event)
            elif isinstance(event, Welcome) and not self._welcome.done():
                self._welcome.set_result(event)
            # Heartbeat: _last_received is all it is for.
        if protocol.state is State.CLOSED:
            error = protocol.error
            self._write()  # our error frame, if any
            self._fail(ConnectionClosed("protocol error", error) if error else ConnectionClosed("closed"))
        elif self.standby and not self._pending and self._welcome.done():
            # Every request it had has its answer: nothing more to do on a standby.
            self._fail(ConnectionClosed("the broker is a standby", NotLeader("not the leader", self.leader)))
        else:
            self._schedule_write()

    def _error_reply(self, event: ErrorReply) -> None:
        if event.id is None:
            if event.code not in _FATAL_CODES:
                log.warning("broker could not read one of our frames: %s: %s", event.code, event.message)
                return
            # The broker closes the connection after this; keep the reason as the cause.
            cause: Exception = ProtocolError(f"{event.code}: {event.message}")
            if event.code == AuthenticationFailed.code:
                cause = AuthenticationFailed(event.message)
            elif event.code == TlsMismatch.code:
                cause = TlsMismatch(event.message)
            self._fail(ConnectionClosed("broker closed the connection", cause))
            return
        future = self._pending.pop(event.id, None)
        if event.code == NotLeader.code:
            # A standby applied nothing; the other requests in flight get their own answers
            # (in order) before _data_received closes the connection.
            self.standby = True
            self.leader = event.leader
        if future is not None and not future.done():
            future.set_exception(broker_error(event.code, event.message, event.leader))

    def _on_heartbeat_timer(self) -> None:
        silent_for = self._loop.time() - self._last_received
        if silent_for > self.heartbeat * _HEARTBEATS_MISSED_BEFORE_DEAD:
            self._fail(ConnectionClosed(f"broker silent for {silent_for:.1f}s: missed heartbeats"))
            return
        self.send(_HEARTBEAT)
        self._heartbeat_timer = self._loop.call_later(self.heartbeat, self._on_heartbeat_timer)

    def _fail(self, exc: ConnectionClosed) -> None:
        if self.closed.done():
            return
        self._protocol.close()
        if self._heartbeat_timer is not None:
            self._heartbeat_timer.cancel()
        if not self._welcome.done():
            # A refused proof is final; a connection lost mid-handshake (the broker at its
            # connection limit, restarting) is worth another try.
            cause = exc.cause
            self._welcome.set_exception(cause if isinstance(cause, AuthenticationFailed | TlsMismatch) else exc)
            with contextlib.suppress(BaseException):
                self._welcome.exception()  # retrieved: no "never retrieved" warning
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
        if self._transport is not None:
            self._transport.close()
        self.closed.set_result(exc)


async def _speaks_tls(host: str, port: int) -> bool:
    """Whether host:port completes a TLS handshake (certificate not checked: only asked)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(_TLS_PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    writer.close()
    return True


# Moved to client/link.py (which imports this module), kept importable from here: loaded on
# first use, so that importing either module first works.
_MOVED_TO_LINK = frozenset({"Link", "Rotation", "backoff_delays", "is_retryable", "parse_addresses"})


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_LINK:
        from jobbroker.client import link

        return getattr(link, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
