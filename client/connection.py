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
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, cast

from jobbroker.broker.errors import (
    AuthenticationFailed,
    BrokerUnreachable,
    ConfigError,
    ConnectionClosed,
    FrameTooLarge,
    IntegrityError,
    NotLeader,
    ProtocolError,
    TlsMismatch,
    Unacknowledged,
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
from jobbroker.client.settings import ClientSettings, client_tls, default_address

log = logging.getLogger("jobbroker.client")

# client_tls and default_address live in client/settings.py; kept importable from here.
__all__ = [
    "Connection",
    "Dial",
    "Link",
    "Rotation",
    "backoff_delays",
    "client_tls",
    "default_address",
    "dial_tcp",
    "is_retryable",
    "parse_address",
    "parse_addresses",
]


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
    {AuthenticationFailed.code, FrameTooLarge.code, IntegrityError.code, ProtocolError.code, TlsMismatch.code}
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


def parse_addresses(addresses: str | Sequence[str]) -> list[str]:
    """The brokers to try, in order, as "HOST:PORT" strings: from "h1:7878,h2:7878" or a list of
    such strings (each item may itself hold commas). Repeats are dropped.

    Raises:
        ConfigError: no address, or one that is not HOST:PORT.
    """
    items = [addresses] if isinstance(addresses, str) else list(addresses)
    found: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"a broker address is a 'HOST:PORT' string, not {item!r}")
        for part in item.split(","):
            try:
                host, port = parse_address(part.strip())
            except ValueError:
                where = f" in {item!r}" if "," in item else ""
                raise ConfigError(
                    f"broker address {part.strip()!r}{where} is not HOST:PORT (several: HOST:PORT,HOST:PORT)"
                ) from None
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            if address not in found:
                found.append(address)
    if not found:
        raise ConfigError("no broker address given")
    return found


def _log_unanswered(future: asyncio.Future[dict[str, Any]]) -> None:
    # NotLeader needs no word: the connection to the standby closes and the Link moves on.
    if not future.cancelled() and not isinstance(future.exception(), NotLeader | None):
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


class Rotation:
    """Which broker address to try next (docs/protocol.md, "Standbys"): the leader a standby
    named, else the next address of the list, starting after the one last connected to. A
    round ends when every address, and every leader named during it, has been tried once;
    the caller then waits (backoff) and starts the next round. Pure: no I/O, no clock.

    A search (new_search) spans the rounds until a broker serves us; `errors` keeps the last
    failure of each address tried during it, for BrokerUnreachable.
    """

    def __init__(self, addresses: Sequence[str]) -> None:
        if not addresses:
            raise ValueError("no broker address given")
        self.addresses = list(addresses)
        self._start = 0  # index of the address a new search begins with
        self._queue: deque[str] = deque()
        self._tried: set[str] = set()
        self.errors: dict[str, BaseException] = {}
        self.hung_up = False  # a broker answered then hung up during this search
        self.new_search()

    def new_search(self) -> None:
        self.errors = {}
        self.hung_up = False
        self.new_round()

    def new_round(self) -> None:
        count = len(self.addresses)
        self._queue = deque(self.addresses[(self._start + step) % count] for step in range(count))
        self._tried = set()

    def next(self) -> str | None:
        """The address to try now, or None: this round is over."""
        while self._queue:
            address = self._queue.popleft()
            if address not in self._tried:
                self._tried.add(address)
                return address
        return None

    def follow(self, leader: str) -> None:
        """A standby named the leader: try it next (listed or not), unless tried this round."""
        if leader not in self._tried:
            self._queue.appendleft(leader)

    def failed(self, address: str, error: BaseException, *, hung_up: bool = False) -> None:
        self.errors[address] = error
        self.hung_up = self.hung_up or hung_up

    def connected(self, address: str) -> None:
        """A connection to `address` is up: when it is lost, the next search starts after it
        (a dead leader's machine is the slowest address to try)."""
        if address in self.addresses:
            self._start = (self.addresses.index(address) + 1) % len(self.addresses)


class Link:
    """One live Connection to the leading broker, replaced with backoff when it is lost.

    Given several addresses, it follows the leader (docs/protocol.md, "Standbys"): on a lost
    or refused connection, or a standby's answer, it goes to the leader the standby named, else
    to the next address; after a whole round of addresses failed it waits (backoff_delays).

    Args:
        address: "HOST:PORT", several separated by commas, or a list of them.
        secret: the shared secret.
        client: a name for the broker's logs and stats.
        on_push: called with every delivery or result pushed by the broker.
        on_connect: called with each new connection (to watch or reserve again) before use.
        on_lost: called when a connection is lost (not when the link is closed).
        reconnect_timeout: how long to keep trying to reach a broker that went away (or to
            find the leader) before giving up with BrokerUnreachable.
        wait_for_broker: also keep trying (for reconnect_timeout) when no broker has ever
            been reached; else a first round of addresses that all refuse raises
            BrokerUnreachable at once.
        credential: the credential name to authenticate as.
        tls: a client TLS context, to speak TLS to the broker.
        dial: how to open the byte stream (default TCP; tests join a broker in memory).
        backoff: makes the delays between reconnect attempts (default backoff_delays()).

    Raises:
        ConfigError: an address that is not HOST:PORT.
    """

    def __init__(
        self,
        address: str | Sequence[str],
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
        dial: Dial = dial_tcp,
        backoff: Callable[[], Iterator[float]] = backoff_delays,
    ) -> None:
        self.addresses = parse_addresses(address)
        self._rotation = Rotation(self.addresses)
        self._dial = dial
        self._backoff = backoff
        self._delays = backoff()
        self._search_started = 0.0
        self.address = self.addresses[0]  # the broker connected to last (or to try first)
        self.host, self.port = parse_address(self.address)
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
        address: str | Sequence[str] | None,
        *,
        secret: bytes | str | None,
        secret_file: str | None,
        credential: str | None,
        tls: ssl.SSLContext | str | os.PathLike[str] | None,
        **options: Any,
    ) -> Link:
        """A link from a Client's or Worker's arguments, the environment filling the gaps
        (ClientSettings.resolve).

        Raises:
            ConfigError: no usable secret, or an unusable CA file.
        """
        settings = ClientSettings.resolve(
            address, secret=secret, secret_file=secret_file, credential=credential, tls=tls
        )
        return cls(settings.address, settings.secret, credential=settings.credential, tls=settings.tls, **options)

    @property
    def current(self) -> Connection | None:
        """The live connection to the leader, if any (not one to a standby)."""
        connection = self._connection
        if connection is None or connection.is_closed or connection.standby:
            return None
        return connection

    async def get(self) -> Connection:
        """The live connection, connecting first if there is none.

        Raises:
            ConnectionClosed: the link was closed.
            AuthenticationFailed: the broker refused our secret.
            BrokerUnreachable: no broker at any address, naming each (at once if none was ever
            reached and not wait_for_broker; else after reconnect_timeout).
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
        rotation = self._rotation
        previous = self._connection
        standby = previous is not None and previous.standby
        # A standby that never served us: still looking for the leader, so the search, its
        # rounds and their backoff go on (no busy loop while no broker leads).
        if not (standby and previous is not None and not previous.served):
            rotation.new_search()
            self._delays = self._backoff()
            self._search_started = loop.time()
        if standby and previous is not None:
            rotation.failed(self.address, NotLeader("a standby", previous.leader))
            self._follow(previous.leader)
        while True:
            if self._closed:
                raise ConnectionClosed("closed by the client")
            address = rotation.next()
            if address is None:  # every address failed this round
                await self._between_rounds(loop)
                rotation.new_round()
                continue
            host, port = parse_address(address)
            first = not (self._reached or self.wait_for_broker)
            try:
                connection = await Connection.open(
                    host,
                    port,
                    self._secret,
                    credential=self._credential,
                    tls=self._tls,
                    client=self._client,
                    on_push=self._on_push,
                    timeout=min(self.connect_timeout, FIRST_CONNECT_TIMEOUT) if first else self.connect_timeout,
                    dial=self._dial,
                )
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                # Nothing listens there (refused, no such host, no answer) or what answers does
                # not speak our protocol; a broker that answered and then hung up (at its
                # connection limit, restarting) is worth a few more tries even if never reached.
                hung_up = isinstance(exc, ConnectionClosed) and not isinstance(_root_cause(exc), ProtocolError)
                rotation.failed(address, _root_cause(exc), hung_up=hung_up)
                continue
            self._reached = True
            if connection.standby:  # its welcome named the leader: go there before any request
                connection.close()
                rotation.failed(address, NotLeader("a standby", connection.leader))
                log.info("the broker at %s is a standby; going to the leader at %s", address, connection.leader)
                self._follow(connection.leader)
                continue
            rotation.connected(address)
            self.address, self.host, self.port = address, host, port
            connection.closed.add_done_callback(self._connection_closed)
            if self._on_connect is not None:
                self._on_connect(connection)
            return connection

    def _follow(self, leader: str | None) -> None:
        if leader is None:
            return
        try:
            [address] = parse_addresses(leader)
        except (ConfigError, ValueError):
            log.warning("a standby named the leader %r, which is not HOST:PORT: ignored", leader)
            return
        self._rotation.follow(address)

    async def _between_rounds(self, loop: asyncio.AbstractEventLoop) -> None:
        """After a round in which every address failed: give up (BrokerUnreachable naming each
        address tried), or wait the next backoff delay."""
        rotation = self._rotation
        never_reached = not (self._reached or self.wait_for_broker)
        # A broker never reached: a wrong address should say so in seconds.
        patience = FIRST_CONNECT_PATIENCE if never_reached else self.reconnect_timeout
        give_up_at = self._search_started + patience
        if (never_reached and not rotation.hung_up) or loop.time() >= give_up_at:
            raise self._unreachable()
        now = loop.time()
        if now - self._last_complaint >= 10.0:  # at most once every 10 s while retrying
            self._last_complaint = now
            log.warning("%s; retrying", self._unreachable())
        await asyncio.sleep(min(next(self._delays), max(0.0, give_up_at - now)))

    def _unreachable(self) -> BrokerUnreachable:
        errors = self._rotation.errors
        if not errors:
            return BrokerUnreachable(",".join(self.addresses))
        if len(errors) == 1:
            [(address, error)] = errors.items()
            return BrokerUnreachable(address, error)
        return BrokerUnreachable(",".join(errors), list(errors.values())[-1], tried=dict(errors))

    def _connection_closed(self, closed: asyncio.Future[ConnectionClosed]) -> None:
        if not self._closed and self._on_lost is not None:
            self._on_lost(closed.result())

    async def call(self, request_type: type[Request], *, retry: bool = True, **fields: Any) -> dict[str, Any]:
        """Send a request to the leader and await its reply. A request a standby refused
        (NotLeader: it applied nothing) is always sent again, to the leader. With retry, a
        request lost with its connection is sent again on the next one (use it only where
        that is harmless); without, that loss raises Unacknowledged.

        Raises:
            Unacknowledged: without retry, the connection was lost before the reply: the
                request may or may not have been applied.
            BrokerUnreachable, ConnectionClosed, BrokerError: as get(), or the broker refused.
        """
        while True:
            connection = await self.get()  # nothing is sent before this returns
            try:
                return await connection.request(request_type, **fields)
            except NotLeader:
                continue
            except ConnectionClosed as exc:
                if retry and not self._closed and is_retryable(exc):
                    continue
                if retry:
                    raise
                raise Unacknowledged(
                    f"the connection to the broker was lost before it answered {request_type.op!r}: "
                    "it may or may not have been applied",
                    exc.cause,
                ) from exc

    def close(self) -> None:
        """Close the connection and stop reconnecting. Idempotent."""
        self._closed = True
        if self._connection is not None:
            self._connection.close()

    async def wait_closed(self) -> None:
        if self._connection is not None:
            await self._connection.wait_closed()
