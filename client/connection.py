"""The asyncio shell around broker.protocol's ClientConnection: one TCP connection to the
broker, request id -> future, pushes handed to a callback, heartbeats both ways.

Loss has one idempotent path, _fail(): every pending future gets ConnectionClosed (with the
cause), the timers stop, the transport is closed and `closed` resolves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from jobbroker.broker.errors import (
    AuthenticationFailed,
    BrokerUnreachable,
    ConfigError,
    ConnectionClosed,
    FrameTooLarge,
    IntegrityError,
    ProtocolError,
    TlsMismatch,
    broker_error,
)
from jobbroker.broker.protocol.auth import DEFAULT_CREDENTIAL, resolve_secret
from jobbroker.broker.protocol.connection import ClientConnection, State
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

log = logging.getLogger("jobbroker.client")

DEFAULT_ADDRESS = "127.0.0.1:7878"


def default_address(environ: Mapping[str, str] | None = None) -> str:
    """$JOBBROKER_CONNECT; else the loopback on $JOBBROKER_PORT (where a broker started with
    that variable listens); else 127.0.0.1:7878."""
    environ = os.environ if environ is None else environ
    if environ.get("JOBBROKER_CONNECT"):
        return environ["JOBBROKER_CONNECT"]
    if environ.get("JOBBROKER_PORT"):
        return f"127.0.0.1:{environ['JOBBROKER_PORT']}"
    return DEFAULT_ADDRESS


__all__ = ["Connection", "Link", "backoff_delays", "client_tls", "is_retryable", "parse_address"]


def client_tls(tls: ssl.SSLContext | str | os.PathLike[str] | None) -> ssl.SSLContext | None:
    """A TLS context from what the caller gave: a context as is, or a CA file to verify the
    broker's certificate against, or None for plain TCP."""
    if tls is None or isinstance(tls, ssl.SSLContext):
        return tls
    try:
        return ssl.create_default_context(cafile=os.fspath(tls))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA file {tls}: {exc}") from exc


PushHandler = Callable[[Deliver | Results | Progressed | Revoked], None]

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
    if not future.cancelled() and future.exception() is not None:
        log.warning("request failed: %s", future.exception())


def backoff_delays(initial: float = 0.05, factor: float = 2.0, maximum: float = 5.0) -> Iterator[float]:
    """Reconnect delays: exponential, capped, with full jitter so that many clients that lost
    the broker at once do not all come back in the same instant."""
    ceiling = initial
    while True:
        yield random.uniform(ceiling / 2, ceiling)
        ceiling = min(ceiling * factor, maximum)


def is_retryable(exc: BaseException) -> bool:
    """Worth reconnecting after: the broker was unreachable or the connection dropped.
    Not: a refused handshake (wrong secret), a failed TLS check, or TLS on one side only,
    which no retry will mend."""
    if isinstance(exc, AuthenticationFailed | TlsMismatch | ssl.SSLError | ssl.CertificateError):
        return False
    if isinstance(exc, ConnectionClosed):
        return not isinstance(exc.cause, AuthenticationFailed | TlsMismatch)
    return isinstance(exc, OSError | TimeoutError)


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
    ) -> Connection:
        """Connect (over TLS with `tls`) and authenticate as `credential`.

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
                await self._loop.create_connection(
                    lambda: _Protocol(self), host, port, ssl=tls, server_hostname=host if tls is not None else None
                )
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
        if future is not None and not future.done():
            future.set_exception(broker_error(event.code, event.message))

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


FIRST_CONNECT_PATIENCE = 2.0  # seconds of retries for a broker never reached that hangs up
FIRST_CONNECT_TIMEOUT = 5.0  # seconds for a broker never reached to answer the handshake


def _root_cause(error: BaseException) -> BaseException:
    """The OS-level reason under a ConnectionClosed (refused, reset...), for messages."""
    while isinstance(error, ConnectionClosed) and error.cause is not None:
        error = error.cause
    return error


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


class Link:
    """One live Connection to the broker, replaced with backoff when it is lost.

    Args:
        address: "HOST:PORT".
        secret: the shared secret.
        client: a name for the broker's logs and stats.
        on_push: called with every delivery or result pushed by the broker.
        on_connect: called with each new connection (to watch or reserve again) before use.
        on_lost: called when a connection is lost (not when the link is closed).
        reconnect_timeout: how long to keep trying to reach a broker that went away before
            giving up with the last error.
        wait_for_broker: also keep trying (for reconnect_timeout) when the broker has never
            been reached; else a first connection that fails raises BrokerUnreachable at once.
        credential: the credential name to authenticate as.
        tls: a client TLS context, to speak TLS to the broker.
    """

    def __init__(
        self,
        address: str,
        secret: bytes,
        *,
        client: str,
        on_push: PushHandler | None = None,
        on_connect: Callable[[Connection], None] | None = None,
        on_lost: Callable[[ConnectionClosed], None] | None = None,
        reconnect_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        credential: str = DEFAULT_CREDENTIAL,
        tls: ssl.SSLContext | None = None,
        wait_for_broker: bool = False,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.address = f"{self.host}:{self.port}"
        self.wait_for_broker = wait_for_broker
        self._reached = False  # a broker answered once: worth waiting for when it goes away
        self._last_complaint = float("-inf")
        self._credential = credential
        self._tls = tls
        self._secret = secret
        self._client = client
        self._on_push = on_push
        self._on_connect = on_connect
        self._on_lost = on_lost
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = connect_timeout
        self._connection: Connection | None = None
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    @classmethod
    def from_settings(
        cls,
        address: str | None,
        *,
        secret: bytes | str | None,
        secret_file: str | None,
        credential: str | None,
        tls: ssl.SSLContext | str | os.PathLike[str] | None,
        **options: Any,
    ) -> Link:
        """A link from a Client's or Worker's arguments, the environment filling the gaps: the
        address as default_address() finds it, the secret as resolve_secret() finds it,
        $JOBBROKER_CREDENTIAL (else "default"), $JOBBROKER_TLS_CA (else plain TCP)."""
        return cls(
            address or default_address(),
            resolve_secret(secret, secret_file),
            credential=credential or os.environ.get("JOBBROKER_CREDENTIAL") or DEFAULT_CREDENTIAL,
            tls=client_tls(tls if tls is not None else os.environ.get("JOBBROKER_TLS_CA") or None),
            **options,
        )

    @property
    def current(self) -> Connection | None:
        """The live connection, if any."""
        connection = self._connection
        return connection if connection is not None and not connection.is_closed else None

    async def get(self) -> Connection:
        """The live connection, connecting first if there is none.

        Raises:
            ConnectionClosed: the link was closed.
            AuthenticationFailed: the broker refused our secret.
            BrokerUnreachable: no broker at the address (at once if never reached and not
            wait_for_broker; else after reconnect_timeout).
        """
        connection = self.current
        if connection is not None:
            return connection
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            connection = self.current
            if connection is not None:
                return connection
            self._connection = connection = await self._connect()
            return connection

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.reconnect_timeout
        first = not (self._reached or self.wait_for_broker)
        if first:  # a broker never reached: a wrong address should say so in seconds
            give_up_at = loop.time() + FIRST_CONNECT_PATIENCE
        delays = backoff_delays()
        while True:
            if self._closed:
                raise ConnectionClosed("closed by the client")
            try:
                connection = await Connection.open(
                    self.host,
                    self.port,
                    self._secret,
                    credential=self._credential,
                    tls=self._tls,
                    client=self._client,
                    on_push=self._on_push,
                    timeout=min(self.connect_timeout, FIRST_CONNECT_TIMEOUT) if first else self.connect_timeout,
                )
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                # Nothing listens there (refused, no such host, no answer) or what answers does
                # not speak our protocol: say so now. A broker that answered and then hung up
                # (at its connection limit, restarting) is worth a few more tries.
                hung_up = isinstance(exc, ConnectionClosed) and not isinstance(_root_cause(exc), ProtocolError)
                if (first and not hung_up) or loop.time() >= give_up_at:
                    raise BrokerUnreachable(self.address, _root_cause(exc)) from exc
                self._complain(exc, loop.time())
                await asyncio.sleep(min(next(delays), max(0.0, give_up_at - loop.time())))
                continue
            self._reached = True
            connection.closed.add_done_callback(self._connection_closed)
            if self._on_connect is not None:
                self._on_connect(connection)
            return connection

    def _complain(self, error: BaseException, now: float) -> None:
        """Say that the broker is unreachable, at most once every 10 s while retrying."""
        if now - self._last_complaint >= 10.0:
            self._last_complaint = now
            log.warning("%s; retrying", BrokerUnreachable(self.address, _root_cause(error)))

    def _connection_closed(self, closed: asyncio.Future[ConnectionClosed]) -> None:
        if not self._closed and self._on_lost is not None:
            self._on_lost(closed.result())

    async def call(self, request_type: type[Request], *, retry: bool = True, **fields: Any) -> dict[str, Any]:
        """Send a request and await its reply. With retry, a request lost with its connection
        is sent again on the next one (use it only where that is harmless)."""
        while True:
            connection = await self.get()
            try:
                return await connection.request(request_type, **fields)
            except ConnectionClosed as exc:
                if not retry or self._closed or not is_retryable(exc):
                    raise

    def close(self) -> None:
        """Close the connection and stop reconnecting. Idempotent."""
        self._closed = True
        if self._connection is not None:
            self._connection.close()

    async def wait_closed(self) -> None:
        if self._connection is not None:
            await self._connection.wait_closed()
