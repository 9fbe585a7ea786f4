"""The asyncio shell of the broker: accept connections, feed their bytes to the protocol and
their requests to the scheduler, and send the scheduler's effects back out.

Output is batched per loop turn: replies and pushes are queued on each connection and one
flush callback per turn dispatches jobs and writes every connection's buffer at once; with a
durable store, that output is held until the turn's changes are committed (group commit, one
commit in flight at a time). Timers: one call_at for the scheduler's next deadline, one for
heartbeats, and for a durable store the compaction (and fsync interval) timers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from typing import Any, cast

import msgpack
from jobbroker.broker.access import PERMISSIONS, AuthThrottle, Role, WarningLimiter, default_credentials
from jobbroker.broker.config import BrokerConfig
from jobbroker.broker.core.clock import Clock, MonotonicClock
from jobbroker.broker.core.scheduler import (
    Deliver as DeliverEffect,
)
from jobbroker.broker.core.scheduler import (
    Effect,
    JobBuried,
    ProgressReady,
    ResultsReady,
    Revoke,
    Scheduler,
    SessionExpired,
    TimeLimitHit,
    WorkerLost,
)
from jobbroker.broker.core.schedules import schedule_from_settings
from jobbroker.broker.errors import (
    ReplyTooLarge,
    UsageError,
)
from jobbroker.broker.metrics import TrafficCounters
from jobbroker.broker.protocol.auth import MAC_SIZE
from jobbroker.broker.protocol.connection import Authenticated, ServerConnection, State
from jobbroker.broker.protocol.credentials import Credential
from jobbroker.broker.protocol.messages import (
    Deliver,
    ErrorReply,
    Heartbeat,
    Message,
    Progressed,
    PushType,
    Reply,
    Request,
    Results,
    Revoked,
    Started,
    encode,
    encode_items,
)
from jobbroker.broker.server.commit import COMPACT_EVERY, GroupCommit
from jobbroker.broker.server.dispatch import Dispatcher, ids_text
from jobbroker.broker.store import (
    FsyncMode,
    MemoryStore,
    SqliteStore,
    Store,
)
from jobbroker.broker.web import WebServer

__all__ = ["COMPACT_EVERY", "Broker", "serve"]

log = logging.getLogger("jobbroker.broker")

# Deliveries and results are split into frames of at most this many jobs so that a frame stays
# far below the frame limit whatever the prefetch.
_JOBS_PER_FRAME = 256

_HEARTBEAT = Heartbeat()

try:
    _VERSION = importlib.metadata.version("jobbroker")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    _VERSION = "unknown"
_LAST_COMMIT_WAIT = 5.0  # seconds a shutting-down broker waits for its last commit
_DASHBOARD_DEAD_LETTERS = 100  # the latest dead letters the dashboard lists
_LISTEN_BACKLOG = 4096  # bursts of connecting workers wait in the kernel, not in SYN retries

# Flow control (docs/protocol.md, "Flow control"). A connection's replies and pushes are built
# only while its unsent output (in the transport, queued in the protocol, or held for a
# commit) is under the high-water mark: min(this, --max-write-buffer / 4). Above it, pushes
# wait in the connection's queue as references to the jobs (not encoded) and its requests
# wait unread (reading paused), until the peer has taken enough.
_HIGH_WATER = 4 * 1024 * 1024
_PUSH_FRAME_TARGET = 1024 * 1024  # pushes are cut into frames of about this size, or one item
# A peer whose output waits (writing paused) and that takes none of it for this many heartbeat
# intervals does not read at all: it is cut off. One that reads slowly is not.
_STALL_HEARTBEATS = 3
# Slots of --max-connections that unauthenticated connections cannot take (one in ten).
_RESERVED_FOR_AUTHENTICATED = 10


class _BrokerProtocol(asyncio.Protocol):
    """One client connection. Thin: bytes to the ServerConnection, events to the Broker."""

    def __init__(self, broker: Broker, session: int) -> None:
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
        if not broker._admit(self):
            self.transport.abort()
            return
        if self.transport.get_write_buffer_limits()[1] > broker.high_water:
            # A mark below the transport's own limit (a tiny --max-write-buffer): the transport
            # must say when it drains below it, or output would wait for the next heartbeat.
            self.transport.set_write_buffer_limits(high=broker.high_water, low=broker.high_water // 4)
        broker._connections[self.session] = self
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
            broker.scheduler.seen(self.session, broker.clock.now())
        high_water = broker.high_water
        for event in events:
            if isinstance(event, Request):
                # Over the mark, requests wait (in order) until the peer takes its output.
                if self._backlog or self.unsent() > high_water:
                    self._backlog.append(event)
                else:
                    broker._dispatch.handle(self, event)
            elif isinstance(event, Started):
                broker._dispatch.started(self, event)
            elif isinstance(event, Authenticated):
                self._authenticated(event)
            # Heartbeat: its arrival was the point (seen() above)
        if self._backlog and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        if connection.state is State.CLOSED:
            self._close_after_error()
        else:
            broker._mark_dirty(self)

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
        self.broker._connection_lost(self, exc)

    def _auth_failed(self, reason: object) -> None:
        self.broker._warn("authentication failed from", self, f": {reason}")
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
            broker._dispatch.handle(self, self._backlog.popleft())
        if not self._backlog and self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        broker._mark_dirty(self)

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
        self.broker._mark_dirty(self)

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
                self.broker.scheduler.seen(self.session, now)
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
            self.broker._mark_dirty(self)

    def send(self, message: Message) -> None:
        # A later frame of the same read may have broken the connection (a bad MAC): the
        # replies to the authentic requests before it are then dropped, as if lost in transit.
        if self.connection.state is State.OPEN:
            self.connection.send(message)
            self.broker._mark_dirty(self)

    def _authenticated(self, event: Authenticated) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.authenticated = True
        self.broker._handshake_done(self)
        self.allowed = PERMISSIONS[event.role]
        self.owner = None if event.role == Role.ADMIN else event.credential
        self.broker.auth_throttle.succeeded(self.address)
        self.broker.scheduler.open_session(self.session, self.broker.clock.now(), name=event.client, peer=self.peer)
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
        self.broker._mark_dirty(self)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.authenticated and self.transport is not None:
            # Logged, not throttled: a silent connection guesses no secret, and the throttle
            # would punish every client behind the same address.
            self.broker._warn(
                "authentication failed from", self, f": no handshake within {self.broker.config.handshake_timeout:.1f}s"
            )
            self.broker.traffic.auth_failures += 1
            self.connection.close()
            self.transport.abort()


class Broker:
    """The broker: a listening socket, its connections and one Scheduler.

    Use `async with Broker(config, secret) as broker:` or start()/close()/wait_closed().
    Signal handling is the caller's (the CLI installs it); an embedded broker installs none.

    Args:
        config: listening address, limits and job-core settings.
        secret: the shared secret of the one credential, "default" (admin), when no
            `credentials` are given.
        credentials: the named credentials clients authenticate as, with their roles.
        store: where jobs are kept; default: SQLite in config.data_dir, or memory if that is None.
        clock: the one source of time (monotonic and wall) of the broker and its scheduler;
            default: the system's (time.monotonic(), time.time()).
    """

    def __init__(
        self,
        config: BrokerConfig,
        secret: bytes | None = None,
        *,
        credentials: Mapping[str, Credential] | None = None,
        store: Store | None = None,
        clock: Clock | None = None,
    ) -> None:
        if credentials is None:
            if secret is None:
                raise UsageError("a broker needs a secret or credentials")
            credentials = default_credentials(secret)
        self.config = config
        self.clock: Clock = clock or MonotonicClock()
        self.credentials = credentials
        self.auth_throttle = AuthThrottle()
        self.warnings = WarningLimiter()
        self.traffic = TrafficCounters()
        self.high_water = min(_HIGH_WATER, max(1, config.max_write_buffer // 4))
        # The largest reply built for one request: the part of --max-write-buffer above the mark.
        self.reply_budget = max(config.max_write_buffer - self.high_water, 1)
        # Connections not yet authenticated, oldest first: all of them, and by address.
        self._unauthenticated: OrderedDict[_BrokerProtocol, None] = OrderedDict()
        self._unauthenticated_by_address: dict[str, OrderedDict[_BrokerProtocol, None]] = {}
        self._web: WebServer | None = None
        self._given_store = store
        self.store: Store = store or MemoryStore()  # opened in start() when config.data_dir is set
        durable = store.durable if store is not None else config.data_dir is not None
        self.scheduler = Scheduler(config.scheduler, track_changes=durable)
        self._commit = GroupCommit(self.scheduler, self.clock, _CommitHost(self))
        self._connections: dict[int, _BrokerProtocol] = {}
        self._dirty: dict[_BrokerProtocol, None] = {}
        self._flush_scheduled = False
        self._next_session = 1
        self._server: asyncio.Server | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._tick_at = float("inf")
        self._heartbeat_handle: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_at = 0.0
        self._dispatch = Dispatcher(
            self.scheduler,
            config,
            self.clock,
            self._commit,
            arm_ticker=self._arm_ticker,
            schedule_flush=self._schedule_flush,
        )

    # --- lifecycle --------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "broker not started"
        return self._loop

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        assert self._server is not None and self._server.sockets, "broker not started"
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Open the store, recover its jobs, bind and start accepting connections.

        Raises:
            StorageError: the data directory cannot be used.
            OSError: the address cannot be bound.
        """
        self._loop = loop = asyncio.get_running_loop()
        clock = self.clock
        if self.scheduler.track_changes:
            started = time.perf_counter()
            if self._given_store is None:
                assert self.config.data_dir is not None
                self.store = SqliteStore(self.config.data_dir, self.config.fsync)
            try:
                recovered = self.store.load(clock.now(), clock.wall())
            except BaseException:
                self.store.close()
                raise
            self.scheduler.restore(recovered.jobs, recovered.next_job_id, clock.now(), next_token=recovered.next_token)
            self.scheduler.restore_controls(recovered.controls, clock.now())
            self.scheduler.restore_schedules(recovered.schedules, self.clock.wall())
            self._next_session = recovered.next_session
            self._commit.open(loop, self.store, recovered.ceilings, sync_every=self.config.fsync is FsyncMode.INTERVAL)
            log.info(
                "data in %s (fsync %s): recovered %d jobs in %.2fs",
                self.config.data_dir or self.store,
                self.config.fsync,
                len(recovered.jobs),
                time.perf_counter() - started,
            )
        else:
            log.info("in memory only (--memory): jobs are lost when the broker stops")
        for name, settings in self.config.queues.items():  # the config file's, at every start
            self.scheduler.configure_queue(name, clock.now(), **settings)
        for name, settings in self.config.schedules.items():  # likewise; a stored one keeps its last tick
            self.scheduler.set_schedule(schedule_from_settings(name, settings), self.clock.wall())
        self._closed = loop.create_future()
        try:
            tls = self.config.tls_context()
            self._server = await loop.create_server(
                self._new_protocol,
                self.config.host,
                self.config.port,
                ssl=tls,
                backlog=min(self.config.max_connections, _LISTEN_BACKLOG),
            )
            if self.config.metrics_port is not None:
                self._web = WebServer(
                    loop,
                    self.metrics,
                    self.overview,
                    self.config.metrics_host,
                    self.config.metrics_port,
                    token=self.config.metrics_token,
                    tls=tls,
                )
        except BaseException:
            if self._server is not None:
                self._server.close()
            self._close_store()
            raise
        self._started_at = clock.now()
        self._heartbeat_handle = loop.call_later(self.config.heartbeat, self._send_heartbeats)
        if self._web is not None:
            where = f"{'https' if tls else 'http'}://{self.config.metrics_host}:{self._web.port}"
            log.info("metrics on %s/metrics, dashboard on %s/", where, where)
        self._schedule_flush()  # deliver recovered jobs, arm the ticker
        log.info("listening on %s:%d%s", self.config.host, self.port, " (TLS)" if self.config.tls_cert else "")

    async def serve_forever(self) -> None:
        """Start if needed and serve until close(); cancellation closes the broker."""
        if self._server is None:
            await self.start()
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            self.close()
            raise

    def close(self) -> None:
        """Stop accepting, close every connection. Idempotent. Acknowledgements whose commit
        is still in flight are not sent: their clients see the connection close instead."""
        if self._server is None or self._closed is None or self._closed.done():
            return
        self._server.close()
        for handle in (self._tick_handle, self._heartbeat_handle):
            if handle is not None:
                handle.cancel()
        self._commit.cancel_timers()
        if not self._commit.in_flight and self._commit.fatal is None:
            self._flush_now()
        for protocol in list(self._connections.values()):
            if protocol.transport is not None:
                protocol.transport.close()
        self._closed.set_result(None)

    def metrics(self) -> dict[str, Any]:
        """The figures /metrics shows: the scheduler's counts and the traffic counters."""
        return {**self.scheduler.metrics(), "traffic": dataclasses.asdict(self.traffic)}

    def overview(self) -> dict[str, Any]:
        """What the dashboard shows: the broker, its queues with rates, its workers with their
        running jobs, the latest dead letters with their errors (not their payloads)."""
        now = self.clock.now()
        stats = self.scheduler.stats(now)
        for worker in stats["workers"]:
            worker["in_flight"] = len(worker["in_flight"])
        dead = [
            {"queue": name, **{k: job[k] for k in ("id", "attempts", "max_attempts", "error")}}
            for name, counts in sorted(stats["queues"].items())
            if counts["dead"]
            for job in self.scheduler.dead_list(name, _DASHBOARD_DEAD_LETTERS)
        ]
        broker = {
            "address": f"{self.config.host}:{self.port}",
            "version": _VERSION,
            "durable": self.store.durable,
            "uptime_seconds": round(now - self._started_at, 1),
            "draining": stats.pop("draining"),
            "sessions": stats.pop("sessions"),
            "jobs": stats.pop("jobs"),
        }
        traffic = dataclasses.asdict(self.traffic)
        return {**stats, "broker": broker, "dead": dead[:_DASHBOARD_DEAD_LETTERS], "traffic": traffic}

    @property
    def metrics_port(self) -> int | None:
        return None if self._web is None else self._web.port

    async def shutdown(self, grace: float) -> None:
        """Stop accepting connections and delivering jobs, give jobs in flight up to `grace`
        seconds to finish, then close (saving everything). Jobs still leased then are
        pending again at the next start (leases are not written)."""
        if self._server is None or self._closed is None or self._closed.done():
            return
        self._server.close()
        in_flight = self.scheduler.drain()
        log.warning("shutting down: %d jobs in flight, waiting up to %.0fs", in_flight, grace)
        deadline = self.clock.now() + grace
        while self.scheduler.in_flight and self.clock.now() < deadline and not self._closed.done():
            await asyncio.sleep(0.05)
        # The results of the jobs that just finished wait for their commit: let it land.
        deadline = self.clock.now() + _LAST_COMMIT_WAIT
        while self._commit.in_flight and self.clock.now() < deadline and not self._closed.done():
            await asyncio.sleep(0.01)
        self.close()

    async def wait_closed(self) -> None:
        """Wait until close() and every pending write have finished."""
        assert self._closed is not None, "broker not started"
        await asyncio.shield(self._closed)
        if self._server is not None:
            await self._server.wait_closed()
        if self._web is not None:
            web, self._web = self._web, None
            await self.loop.run_in_executor(None, web.close)
        if self._commit.active:
            await self._commit.close()  # raises what stopped the broker, if the store failed
            log.info("broker closed; data saved")
        elif self.store.durable is False:
            log.info("broker closed")

    def _close_store(self) -> None:
        self._commit.abandon()
        self.store.close()

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # --- connections ------------------------------------------------------------------

    def _new_protocol(self) -> _BrokerProtocol:
        session = self._next_session
        self._next_session += 1
        return _BrokerProtocol(self, session)

    def _admit(self, protocol: _BrokerProtocol) -> bool:
        """Take a new connection, or refuse it. Unauthenticated connections are capped per
        address (--max-handshakes-per-ip) and in all (all but a tenth of --max-connections):
        past a cap the oldest of them is closed to make room, so idle sockets cannot lock
        authenticating clients out. Authenticated connections are never closed for room."""
        config = self.config
        address = protocol.address
        same_address = self._unauthenticated_by_address.get(address)
        if same_address is not None and len(same_address) >= config.max_handshakes_per_ip:
            self._evict(next(iter(same_address)), "handshakes from one address")
        reserved = config.max_connections // _RESERVED_FOR_AUTHENTICATED
        if self._unauthenticated and len(self._unauthenticated) >= max(1, config.max_connections - reserved):
            self._evict(next(iter(self._unauthenticated)), "unauthenticated connections")
        if len(self._connections) >= config.max_connections:
            if not self._unauthenticated:
                self._warn("refusing", protocol, f": {len(self._connections)} connections, the limit")
                return False
            self._evict(next(iter(self._unauthenticated)), "connections")
        self._unauthenticated[protocol] = None
        self._unauthenticated_by_address.setdefault(address, OrderedDict())[protocol] = None
        return True

    def _evict(self, protocol: _BrokerProtocol, limit: str) -> None:
        self._warn("closing the oldest unauthenticated connection from", protocol, f" to make room ({limit})")
        self._handshake_done(protocol)
        self._connections.pop(protocol.session, None)
        protocol.evicted = True
        protocol.connection.close()
        if protocol.transport is not None:
            protocol.transport.abort()

    def _handshake_done(self, protocol: _BrokerProtocol) -> None:
        """The connection authenticated, or went: it no longer counts as unauthenticated."""
        if self._unauthenticated.pop(protocol, 0) is None:
            same_address = self._unauthenticated_by_address[protocol.address]
            del same_address[protocol]
            if not same_address:
                del self._unauthenticated_by_address[protocol.address]

    def _warn(self, what: str, protocol: _BrokerProtocol, detail: str) -> None:
        """A warning about a peer, at most one line per address and kind per interval."""
        count = self.warnings.hit(what, protocol.address, self.clock.now())
        if count == 1:
            log.warning("%s %s%s", what, protocol.peer, detail)
        elif count:
            log.warning(
                "%s %s%s (and %d more from %s since the last line)",
                what,
                protocol.peer,
                detail,
                count - 1,
                protocol.address,
            )

    def _connection_lost(self, protocol: _BrokerProtocol, exc: Exception | None) -> None:
        self._handshake_done(protocol)
        self._connections.pop(protocol.session, None)
        self._dirty.pop(protocol, None)
        if protocol.authenticated:
            log.info("session %d (%s) disconnected%s", protocol.session, protocol.peer, f": {exc}" if exc else "")
            self.scheduler.close_session(protocol.session, self.clock.now())
            self._schedule_flush()

    def _mark_dirty(self, protocol: _BrokerProtocol) -> None:
        self._dirty[protocol] = None
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    # --- the per-turn flush and timers ------------------------------------------------

    def _flush(self) -> None:
        # The flag stays set while flushing, so sends made here join this flush.
        if self._closed is not None and self._closed.done():
            self._flush_scheduled = False
            return
        self._flush_now()
        self._flush_scheduled = False
        self._arm_ticker()

    def _flush_now(self) -> None:
        """Dispatch, collect every connection's output, and send it, or hold it until the
        changes behind it are committed. Group commit: while one commit is in flight, the
        changes and output of the turns that follow gather into the next, so a slow disk makes
        commits larger rather than more numerous.

        What waits: acknowledgements of submits, cancels and dead-letter changes, and results,
        so that a producer or an operator never sees what a crash could undo. What does not:
        deliveries and acknowledgements to workers, since after a crash the job is simply
        delivered again (at least once); so a job often runs and completes within one commit
        window, and is written once, in its final state. Output leaves each connection in the
        order it was made (frames carry sequence numbers)."""
        now = self.clock.now()
        self._apply(self.scheduler.flush(now))
        dirty, self._dirty = self._dirty, {}
        self._commit.send(dirty, now)

    def _apply(self, effects: list[Effect]) -> None:
        connections = self._connections
        for effect in effects:
            if isinstance(effect, DeliverEffect | ResultsReady | ProgressReady | Revoke):
                protocol = connections.get(effect.session)
                if protocol is not None:
                    needs_commit = (
                        isinstance(effect, ResultsReady)
                        and self._commit.active
                        and self._commit.unwritten(item[0] for item in effect.items)
                    )
                    if needs_commit:
                        protocol.needs_commit = True
                    items = effect.jobs if isinstance(effect, DeliverEffect) else effect.items
                    protocol.queue_push(_PUSHES[type(effect)], items, needs_commit)
            elif isinstance(effect, SessionExpired):
                protocol = connections.get(effect.session)
                if protocol is not None and protocol.stalled:  # its heartbeats wait behind its output
                    log.warning(
                        "session %d (%s) does not read its replies; disconnecting", protocol.session, protocol.peer
                    )
                else:
                    log.warning("session %d missed its heartbeats: dead", effect.session)
                if protocol is not None and protocol.transport is not None:
                    protocol.transport.abort()
            elif isinstance(effect, WorkerLost):
                self.traffic.dead_workers += 1
                log.warning(
                    "worker session %d (%s) lost holding %d jobs: requeued %s, dead %s",
                    effect.session,
                    effect.name or "worker",
                    len(effect.requeued) + len(effect.buried),
                    ids_text(effect.requeued),
                    ids_text(effect.buried),
                )
            elif isinstance(effect, TimeLimitHit):
                log.warning(
                    "job %d (queue %s, session %s) ran past its time limit and was taken back: %s",
                    effect.job_id,
                    effect.queue,
                    effect.session,
                    "dead" if effect.buried else "retried",
                )
            elif isinstance(effect, JobBuried):
                log.warning("job %d (queue %s) is dead: %s", effect.job_id, effect.queue, effect.error)

    def _arm_ticker(self) -> None:
        deadline = self.scheduler.next_deadline()
        tick_wall = self.scheduler.schedules.next_due()
        now = self.clock.now()
        if tick_wall is not None:  # a schedule's tick, in wall-clock time, on the monotonic scale
            tick_at = now + max(0.0, tick_wall - self.clock.wall())
            deadline = tick_at if deadline is None else min(deadline, tick_at)
        if deadline is None or deadline >= self._tick_at:
            return
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._tick_at = deadline
        # A delay, not loop.call_at: the deadline is on the broker's clock, which need not be the loop's.
        self._tick_handle = self.loop.call_later(max(0.0, deadline - now), self._on_tick)

    def _on_tick(self) -> None:
        self._tick_handle = None
        self._tick_at = float("inf")
        now = self.clock.now()
        self.scheduler.tick(now)
        if self._commit.storage_error is None:  # a tick's job waits for storage to work again
            for name, tick, error in self.scheduler.fire_schedules(now, self.clock.wall()):
                if error is not None:
                    log.warning("schedule %s could not submit its job of tick %.3f: %s", name, tick, error)
        self._flush()

    def _send_heartbeats(self) -> None:
        now = self.clock.now()
        for protocol in list(self._connections.values()):
            protocol.send(_HEARTBEAT)
            protocol.check_progress(now)
        for what, address, count in self.warnings.flush(now):
            log.warning("%s %s: %d more in the last %.0fs", what, address, count, self.warnings.interval)
        self._heartbeat_handle = self.loop.call_later(self.config.heartbeat, self._send_heartbeats)


# The push message that carries each kind of effect to its session.
_PUSHES: dict[type[Effect], PushType] = {
    DeliverEffect: Deliver,
    ResultsReady: Results,
    ProgressReady: Progressed,
    Revoke: Revoked,
}


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


class _CommitHost:
    """The broker as group commit sees it (see commit.CommitHost)."""

    __slots__ = ("_broker",)

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    @property
    def running(self) -> bool:
        closed = self._broker._closed
        return closed is not None and not closed.done()

    @property
    def next_session(self) -> int:
        return self._broker._next_session

    def flush_now(self) -> None:
        self._broker._flush_now()

    def schedule_flush(self) -> None:
        self._broker._schedule_flush()

    def storage_failed(self) -> None:
        broker = self._broker
        for protocol in list(broker._connections.values()):
            protocol.abort()
        broker.close()


async def serve(
    config: BrokerConfig, secret: bytes | None = None, *, credentials: Mapping[str, Credential] | None = None
) -> None:
    """Run a broker until cancelled."""
    broker = Broker(config, secret, credentials=credentials)
    await broker.serve_forever()
