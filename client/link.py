"""The link to the leading broker: one live Connection (client/connection.py), replaced with
jittered backoff when it is lost, following the leader a standby names (docs/protocol.md,
"Standbys"). Rotation is the pure part (which address next); Link the asyncio part
(connect, wait between rounds, call with retry). The Client and the Worker each hold one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from jobbroker.broker.errors import (
    AuthenticationFailed,
    BrokerUnreachable,
    ConfigError,
    ConnectionClosed,
    NotLeader,
    ProtocolError,
    TlsMismatch,
    Unacknowledged,
)
from jobbroker.broker.protocol.credentials import DEFAULT_CREDENTIAL
from jobbroker.broker.protocol.messages import Request
from jobbroker.client.connection import Connection, Dial, PushHandler, dial_tcp, parse_address
from jobbroker.client.settings import ClientSettings

log = logging.getLogger("jobbroker.client")

__all__ = ["Link", "Rotation", "backoff_delays", "is_retryable", "parse_addresses"]


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


FIRST_CONNECT_PATIENCE = 2.0  # seconds of retries for a broker never reached that hangs up
FIRST_CONNECT_TIMEOUT = 5.0  # seconds for a broker never reached to answer the handshake


def _root_cause(error: BaseException) -> BaseException:
    """The OS-level reason under a ConnectionClosed (refused, reset...), for messages."""
    while isinstance(error, ConnectionClosed) and error.cause is not None:
        error = error.cause
    return error


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
