"""The per-connection adapter: an asyncio.Protocol that feeds a connection's bytes to the
protocol's ServerConnection, its requests to the broker, and writes what the broker sends.

Flow control (docs/protocol.md, "Flow control"): a connection's replies and pushes are built
only while its unsent output (in the transport, queued in the protocol, or held for a commit)
is under the broker's high-water mark. Above it, pushes wait in the connection's queue as
references to the jobs (not encoded) and its requests wait unread (reading paused), until the
peer has taken enough.

It talks to the broker through ConnectionHost only.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping
from typing import Any, Protocol, cast

import msgpack
from jobbroker.broker.access import PERMISSIONS, AuthThrottle, Role
from jobbroker.broker.config import BrokerConfig
from jobbroker.broker.core.clock import Clock
from jobbroker.broker.errors import ReplyTooLarge
from jobbroker.broker.protocol.auth import MAC_SIZE
from jobbroker.broker.protocol.connection import Authenticated, ServerConnection, State
from jobbroker.broker.protocol.credentials import Credential
from jobbroker.broker.protocol.messages import (
    ErrorReply,
    Message,
    Progressed,
    PushType,
    Reply,
    Request,
    Started,
    encode,
    encode_items,
)
from jobbroker.broker.reports import TrafficCounters

__all__ = ["BrokerProtocol", "ConnectionHost"]

log = logging.getLogger("jobbroker.broker")

# Deliveries and results are split into frames of at most this many jobs so that a frame stays
# far below the frame limit whatever the prefetch.
_JOBS_PER_FRAME = 256
_PUSH_FRAME_TARGET = 1024 * 1024  # pushes are cut into frames of about this size, or one item
# A peer whose output waits (writing paused) and that takes none of it for this many heartbeat
# intervals does not read at all: it is cut off. One that reads slowly is not.
_STALL_HEARTBEATS = 3


class ConnectionHost(Protocol):
    """What a connection needs of the broker."""

    @property
    def config(self) -> BrokerConfig: ...

    @property
    def credentials(self) -> Mapping[str, Credential]: ...

    @property
    def clock(self) -> Clock: ...

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def traffic(self) -> TrafficCounters: ...

    @property
    def auth_throttle(self) -> AuthThrottle: ...

    @property
    def high_water(self) -> int:
        """Unsent bytes above which a connection's output waits (see the module's docstring)."""
        ...

    @property
    def reply_budget(self) -> int:
        """The largest reply built for one request."""
        ...

    def admit(self, connection: BrokerProtocol) -> bool:
        """Take a new connection (False: refused, close it)."""
        ...

    def authenticated(self, connection: BrokerProtocol, client_name: str) -> None:
        """The handshake succeeded: open the connection's session."""
        ...

    def seen(self, session: int, now: float) -> None:
        """A sign of life from the session's peer."""
        ...

    def request(self, connection: BrokerProtocol, request: Request) -> None:
        """Handle a request (its reply comes back through send_reply or send)."""
        ...

    def started(self, connection: BrokerProtocol, notice: Started) -> None: ...

    def output_ready(self, connection: BrokerProtocol) -> None:
        """The connection has output to send at this turn's flush."""
        ...

    def lost(self, connection: BrokerProtocol, exc: Exception | None) -> None: ...

    def warn(self, what: str, connection: BrokerProtocol, detail: str) -> None:
        """A rate-limited warning about a peer."""
        ...


class BrokerProtocol(asyncio.Protocol):
    """One client connection. Thin: bytes to the ServerConnection, events to the broker
    (through ConnectionHost)."""

    def __init__(self, broker: ConnectionHost, session: int) -> None:
        self.broker = broker
        self.session = session
        self.connection = ServerConnection(
            broker.credentials,
            session=session,
            heartbeat=broker.config.heartbeat,
            max_frame_size=broker.config.max_frame_size,
        )
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.address = "?"  # the peer's IP, for the authentication throttle
        self.authenticated = False
        self.allowed: frozenset[str] = frozenset()  # ops the credential's role may send
        self.owner: str | None = None  # the credential, for producers and workers; None for admins
        self.close_when_sent = False  # after a fatal protocol error: send the error frame, then close
        self.evicted = False  # closed unauthenticated to make room: not an authentication failure
        self._throttled: list[bytes] | None = None  # input held back while the throttle delays us
        self._frames_counted = 0  # frames of this connection already in the traffic counters
        # Output that must wait for a commit: made this turn (needs_commit), or behind output
        # already waiting (held, counted, so that frames leave in order).
        self.needs_commit = False
        self.held = 0
        self.held_bytes = 0  # bytes of that held output, part of the unsent output
        self._handshake_timer: asyncio.TimerHandle | None = None
        # Flow control (see _HIGH_WATER): requests read but not handled, pushes not yet encoded.
        self._backlog: deque[Request] = deque()
        self._pushes: deque[_Pushes] = deque()
        self._reading_paused = False
        self._writing_paused = False
        self._resume_scheduled = False
        self._bytes_written = 0
        self._bytes_taken = 0  # bytes the peer had taken at the last progress check
        self._stalled_checks = 0

    @property
    def credential(self) -> str | None:
        return self.connection.claimed_credential

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        self.address = str(peername[0]) if isinstance(peername, tuple) else self.peer
        broker = self.broker
        if not broker.admit(self):
            self.transport.abort()
            return
        if self.transport.get_write_buffer_limits()[1] > broker.high_water:
            # A mark below the transport's own limit (a tiny --max-write-buffer): the transport
            # must say when it drains below it, or output would wait for the next heartbeat.
            self.transport.set_write_buffer_limits(high=broker.high_water, low=broker.high_water // 4)
        delay = broker.auth_throttle.delay(self.address, broker.clock.now())
        if delay > 0:  # this address failed to authenticate lately: its input waits
            self._throttled = []
            broker.loop.call_later(delay, self._end_throttle)
        else:
            self._start_handshake_timer()

    def _start_handshake_timer(self) -> None:
        self._handshake_timer = self.broker.loop.call_later(
            self.broker.config.handshake_timeout, self._handshake_expired
        )

    def _end_throttle(self) -> None:
        held, self._throttled = self._throttled, None
        if self.transport is None or self.transport.is_closing():
            return
        self._start_handshake_timer()  # the wait does not count against the handshake
        if held:
            self.data_received(b"".join(held))

    def data_received(self, data: bytes) -> None:
        if self._throttled is not None:
            if sum(map(len, self._throttled)) < 65536:  # a handshake is small; more is dropped
                self._throttled.append(data)
            return
        connection = self.connection
        broker = self.broker
        traffic = broker.traffic
        traffic.bytes_in += len(data)
        frames_before = connection.frames_received
        events = connection.receive_data(data)
        traffic.frames_in += connection.frames_received - frames_before
        if self.authenticated:
            broker.seen(self.session, broker.clock.now())
        high_water = broker.high_water
        for event in events:
            if isinstance(event, Request):
                # Over the mark, requests wait (in order) until the peer takes its output.
                if self._backlog or self.unsent() > high_water:
                    self._backlog.append(event)
                else:
                    broker.request(self, event)
            elif isinstance(event, Started):
                broker.started(self, event)
            elif isinstance(event, Authenticated):
                self._authenticated(event)
            # Heartbeat: its arrival was the point (seen() above)
        if self._backlog and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        if connection.state is State.CLOSED:
            self._close_after_error()
        else:
            broker.output_ready(self)

    def eof_received(self) -> bool | None:
        self.connection.receive_eof()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        if (
            not self.authenticated
            and not self.evicted
            and self.connection.claimed_credential
            and self.connection.error is None
        ):
            # The client gave up after our challenge: it could not verify our proof.
            self._auth_failed(f"handshake abandoned (wrong secret for {self.connection.claimed_credential!r}?)")
        self.connection.close()
        self.broker.lost(self, exc)

    def _auth_failed(self, reason: object) -> None:
        self.broker.warn("authentication failed from", self, f": {reason}")
        self.broker.traffic.auth_failures += 1
        self.broker.auth_throttle.failed(self.address, self.broker.clock.now())

    def write(self, data: bytes) -> None:
        """Put bytes on the wire (called by the broker's flush, in frame order)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if data:
            traffic = self.broker.traffic
            traffic.bytes_out += len(data)
            traffic.frames_out += self.connection.frames_sent - self._frames_counted
            self._frames_counted = self.connection.frames_sent
            transport.write(data)
            self._bytes_written += len(data)
            # A backstop: flow control keeps the buffer near the high-water mark (one reply or
            # push frame above it at most), so only a tiny --max-write-buffer gets here.
            if transport.get_write_buffer_size() > self.broker.config.max_write_buffer:
                log.warning("session %d (%s) does not read its replies; disconnecting", self.session, self.peer)
                transport.abort()
                return
        if self.close_when_sent:
            transport.close()
        elif self._pushes or self._backlog:
            self._schedule_resume()  # the peer may have room for more already

    # --- flow control -----------------------------------------------------------------

    def unsent(self) -> int:
        """Bytes of output built for this peer and not yet taken by the kernel: in the
        transport's buffer, queued in the protocol, or held for a commit."""
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return buffered + self.connection.bytes_to_send + self.held_bytes

    @property
    def stalled(self) -> bool:
        """Output waits for the peer (writing paused) and it took none at the last check."""
        return self._writing_paused and self._stalled_checks > 0

    # The transport keeps its own (small) limits: it pauses writing when its buffer holds more
    # than 64 KiB and resumes once that has mostly drained, which is when more is built (its
    # limits set to the high-water mark cost a quarter of the throughput on uvloop).
    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._schedule_resume()

    def _schedule_resume(self) -> None:
        if not self._resume_scheduled:
            self._resume_scheduled = True
            self.broker.loop.call_soon(self._resume_output)

    def _resume_output(self) -> None:
        """The output may be under the mark again: encode waiting pushes, then handle waiting
        requests, as far as the mark allows; read again once no request waits."""
        self._resume_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing() or self.unsent() > self.broker.high_water:
            return
        self.pump()
        broker = self.broker
        while self._backlog and self.unsent() <= broker.high_water:
            broker.request(self, self._backlog.popleft())
        if not self._backlog and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        broker.output_ready(self)

    def queue_push(
        self,
        message_type: PushType,
        items: list[list[Any]],
        needs_commit: bool,
    ) -> None:
        """Push items to this peer: encoded now as far as the high-water mark allows, the rest
        when the peer has taken its output (pump). Progress reports that wait are coalesced:
        only a job's latest is sent, so a fast reporter cannot grow a slow reader's queue."""
        if message_type is Progressed and self._pushes:
            waiting = self._pushes[-1]
            if waiting.progress is None:
                waiting = _Pushes(Progressed, [], False)
                waiting.progress = {}
                self._pushes.append(waiting)
            for item in items:
                waiting.progress[item[0]] = item
        else:
            self._pushes.append(_Pushes(message_type, items, needs_commit))
        self.pump()

    def pump(self) -> None:
        """Encode waiting pushes into frames (at most _JOBS_PER_FRAME items, about
        _PUSH_FRAME_TARGET bytes, each) while the unsent output is under the mark."""
        pushes = self._pushes
        connection = self.connection
        if connection.state is not State.OPEN:
            pushes.clear()  # nothing more goes out on this connection
            return
        high_water = self.broker.high_water
        frame_limit = connection.peer_max_frame_size - MAC_SIZE
        target = min(frame_limit, _PUSH_FRAME_TARGET)
        while pushes and self.unsent() <= high_water:
            batch = pushes[0]
            if batch.progress is not None:  # the latest reports, gathered while waiting
                batch.items, batch.progress = list(batch.progress.values()), None
            chunk = batch.items[batch.start : batch.start + _JOBS_PER_FRAME]
            body, count = encode_items(batch.message_type, chunk, target)
            if count == 0:  # one item over the target: alone in its frame, if the limit takes it
                body, count = encode_items(batch.message_type, chunk[:1], frame_limit)
                if count == 0:  # the limits on payloads and results prevent it
                    log.error(
                        "session %d: a %s item does not fit in a frame; dropped", self.session, batch.message_type.op
                    )
                    count = 1
            if body:
                connection.send_encoded(body)
                if batch.needs_commit:
                    self.needs_commit = True
            batch.start += count
            if batch.start >= len(batch.items):
                pushes.popleft()
        self.broker.output_ready(self)

    def check_progress(self, now: float) -> None:
        """Once a heartbeat interval: has the peer taken any of its output since the last
        check? Taking it proves the peer alive while its own frames wait unread (reading
        paused); taking none while output waits, _STALL_HEARTBEATS times in a row, means it
        does not read at all: it is cut off."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        buffered = transport.get_write_buffer_size()
        taken = self._bytes_written - buffered
        if taken != self._bytes_taken:
            # The peer took output since the last check. While we read nothing from it (its
            # heartbeats wait unread behind its requests), that is the only sign of life we
            # can see: a slow reader is alive. A frozen peer's kernel takes bytes too, but only
            # until its buffers fill (a few MiB): then nothing moves, and it is cut off below or
            # expires like any silent session.
            if self._reading_paused and self.authenticated:
                self.broker.seen(self.session, now)
            self._bytes_taken = taken
            self._stalled_checks = 0
        elif self._writing_paused:
            self._stalled_checks += 1
            if self._stalled_checks >= _STALL_HEARTBEATS:
                log.warning("session %d (%s) does not read its replies; disconnecting", self.session, self.peer)
                transport.abort()
        else:
            self._stalled_checks = 0

    def send_reply(self, request_id: int, data: dict[str, Any]) -> None:
        """Answer a request; a reply over the frame limit, or over what the broker holds for one
        connection above the mark, is refused (reply_too_large) rather than built further."""
        limit = min(self.connection.peer_max_frame_size - MAC_SIZE, self.broker.reply_budget)
        # A list of jobs (dead_list, job_list) is measured job by job first: one over the limit
        # is refused before the whole reply is built.
        jobs = data.get("jobs")
        size = _measured(jobs, limit) if isinstance(jobs, list) else 0
        body = b"" if size > limit else encode(Reply(id=request_id, data=data))
        if size > limit or len(body) > limit:
            error = ReplyTooLarge(f"the reply would take over {limit} bytes, the limit: ask for less")
            self.send(ErrorReply(id=request_id, code=error.code, message=str(error)))
        elif self.connection.state is State.OPEN:
            self.connection.send_encoded(body)
            self.broker.output_ready(self)

    def send(self, message: Message) -> None:
        # A later frame of the same read may have broken the connection (a bad MAC): the
        # replies to the authentic requests before it are then dropped, as if lost in transit.
        if self.connection.state is State.OPEN:
            self.connection.send(message)
            self.broker.output_ready(self)

    def _authenticated(self, event: Authenticated) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.authenticated = True
        self.allowed = PERMISSIONS[event.role]
        self.owner = None if event.role == Role.ADMIN else event.credential
        self.broker.authenticated(self, event.client)
        log.info(
            "session %d authenticated: %s as %s (%s) from %s",
            self.session,
            event.client or "client",
            event.credential,
            event.role,
            self.peer,
        )

    def take_output(self) -> bytes:
        """The bytes built for the peer since the last call (group commit sends or holds them)."""
        return self.connection.data_to_send()

    def abort(self) -> None:
        """Close the connection at once (its output is lost)."""
        if self.transport is not None:
            self.transport.abort()

    def _close_after_error(self) -> None:
        error = self.connection.error
        if error is not None:
            if self.authenticated:
                log.warning("session %d (%s): %s; closing", self.session, self.peer, error)
            else:
                self._auth_failed(error)
        self.close_when_sent = True
        self.broker.output_ready(self)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.authenticated and self.transport is not None:
            # Logged, not throttled: a silent connection guesses no secret, and the throttle
            # would punish every client behind the same address.
            self.broker.warn(
                "authentication failed from", self, f": no handshake within {self.broker.config.handshake_timeout:.1f}s"
            )
            self.broker.traffic.auth_failures += 1
            self.connection.close()
            self.transport.abort()


def _measured(items: list[Any], limit: int) -> int:
    """The encoded size of `items`, counted one by one and no further than past `limit`."""
    size = 0
    for item in items:
        size += len(msgpack.packb(item, use_bin_type=True))
        if size > limit:
            break
    return size


class _Pushes:
    """Items of one push waiting for a connection to take its output; `start`: the first not
    yet encoded. They refer to the jobs' payloads and results, which costs nothing more."""

    __slots__ = ("items", "message_type", "needs_commit", "progress", "start")

    def __init__(self, message_type: PushType, items: list[list[Any]], needs_commit: bool) -> None:
        self.message_type = message_type
        self.items = items
        self.needs_commit = needs_commit
        self.start = 0
        # Progress reports still gathering, by job id (the last batch of the queue only).
        self.progress: dict[int, list[Any]] | None = None
