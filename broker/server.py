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
import concurrent.futures
import dataclasses
import importlib.metadata
import logging
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import msgpack
from jobbroker.broker.access import PERMISSIONS, AuthThrottle, Role, WarningLimiter, default_credentials
from jobbroker.broker.config import BrokerConfig
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
    BrokerError,
    Forbidden,
    InvalidRequest,
    LimitExceeded,
    ReplyTooLarge,
    StorageError,
    StorageFailed,
    StorageUnavailable,
    UsageError,
)
from jobbroker.broker.metrics import TrafficCounters
from jobbroker.broker.protocol.auth import MAC_SIZE, Credential
from jobbroker.broker.protocol.connection import Authenticated, ServerConnection, State
from jobbroker.broker.protocol.messages import (
    Cancel,
    Complete,
    DeadList,
    DeadPurge,
    DeadRequeue,
    Deliver,
    Drain,
    ErrorReply,
    Fail,
    Heartbeat,
    JobInfo,
    JobList,
    Message,
    Progress,
    Progressed,
    PushType,
    QueuePurge,
    QueueSet,
    Release,
    Reply,
    Request,
    Reserve,
    Results,
    Revoked,
    ScheduleList,
    ScheduleRemove,
    ScheduleSet,
    Started,
    Stats,
    Submit,
    Touch,
    Watch,
    encode,
    encode_items,
    packed,
)
from jobbroker.broker.store import (
    SESSION_BLOCK,
    TOKEN_BLOCK,
    FsyncMode,
    IdCeilings,
    MemoryStore,
    Store,
    WriteBatch,
    open_store,
    serialize,
)
from jobbroker.broker.web import WebServer

__all__ = ["Broker", "serve"]

log = logging.getLogger("jobbroker.broker")

# Deliveries and results are split into frames of at most this many jobs so that a frame stays
# far below the frame limit whatever the prefetch.
_JOBS_PER_FRAME = 256

_HEARTBEAT = Heartbeat()

# Seconds between checkpoints that fold the SQLite WAL into the database and truncate it, so
# that disk use follows the live jobs rather than the traffic.
COMPACT_EVERY = 10.0
_WRITER_SWITCH_INTERVAL = 0.0005
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
        delay = broker.auth_throttle.delay(self.address, broker.loop.time())
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
            broker.scheduler.seen(self.session, broker.loop.time())
        high_water = broker.high_water
        for event in events:
            if isinstance(event, Request):
                # Over the mark, requests wait (in order) until the peer takes its output.
                if self._backlog or self.unsent() > high_water:
                    self._backlog.append(event)
                else:
                    broker._handle_request(self, event)
            elif isinstance(event, Started):
                broker._on_started(self, event)
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
        self.broker.auth_throttle.failed(self.address, self.broker.loop.time())

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
            broker._handle_request(self, self._backlog.popleft())
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
        self.broker.scheduler.open_session(self.session, self.broker.loop.time(), name=event.client, peer=self.peer)
        log.info(
            "session %d authenticated: %s as %s (%s) from %s",
            self.session,
            event.client or "client",
            event.credential,
            event.role,
            self.peer,
        )

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
        store: where jobs are kept; default: PostgreSQL at config.store_url, else SQLite in
            config.data_dir, or memory if that is None.
    """

    def __init__(
        self,
        config: BrokerConfig,
        secret: bytes | None = None,
        *,
        credentials: Mapping[str, Credential] | None = None,
        store: Store | None = None,
    ) -> None:
        if credentials is None:
            if secret is None:
                raise UsageError("a broker needs a secret or credentials")
            credentials = default_credentials(secret)
        self.config = config
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
        self.store: Store = store or MemoryStore()  # opened in start() when config names a store
        durable = store.durable if store is not None else (config.data_dir or config.store_url) is not None
        self.scheduler = Scheduler(config.scheduler, track_changes=durable)
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writing: _Batch | None = None  # the group commit in flight: at most one
        self._held: list[tuple[_BrokerProtocol, bytes]] = []  # output waiting for the next commit
        self._unsaved: _Batch | None = None  # rows of a failed commit, to write again
        self._storage_error: StorageError | None = None
        self._fatal: StorageFailed | None = None  # the store failed for good: the broker stops
        self._ceilings = IdCeilings(1 << 62, 1 << 62)  # tokens and sessions below are stored
        self._retry_handle: asyncio.TimerHandle | None = None
        self._retry_due = False
        self._sync_handle: asyncio.TimerHandle | None = None
        self._compact_handle: asyncio.TimerHandle | None = None
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
        self._handlers: dict[type[Request], Callable[[_BrokerProtocol, Any, float], dict[str, Any]]] = {
            Submit: self._on_submit,
            Reserve: self._on_reserve,
            Complete: self._on_complete,
            Fail: self._on_fail,
            Touch: self._on_touch,
            Release: self._on_release,
            Progress: self._on_progress,
            Watch: self._on_watch,
            Cancel: self._on_cancel,
            Stats: self._on_stats,
            JobInfo: self._on_job_info,
            JobList: self._on_job_list,
            QueuePurge: self._on_queue_purge,
            QueueSet: self._on_queue_set,
            ScheduleSet: self._on_schedule_set,
            ScheduleRemove: self._on_schedule_remove,
            ScheduleList: self._on_schedule_list,
            DeadList: self._on_dead_list,
            DeadRequeue: self._on_dead_requeue,
            DeadPurge: self._on_dead_purge,
            Drain: self._on_drain,
        }

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
        if self.scheduler.track_changes:
            started = time.perf_counter()
            if self._given_store is None:
                self.store = open_store(self.config)
            try:
                recovered = self.store.load(loop.time(), time.time())
            except BaseException:
                self.store.close()
                raise
            self.scheduler.restore(recovered.jobs, recovered.next_job_id, loop.time(), next_token=recovered.next_token)
            self.scheduler.restore_controls(recovered.controls, loop.time())
            self.scheduler.restore_schedules(recovered.schedules, time.time())
            self._next_session = recovered.next_session
            self._ceilings = recovered.ceilings
            self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jobbroker-store")
            # The writer thread needs the GIL between SQLite calls; with the default 5 ms switch
            # interval a busy event loop makes every commit wait for it several times over.
            sys.setswitchinterval(min(sys.getswitchinterval(), _WRITER_SWITCH_INTERVAL))
            log.info(
                "data in %s (fsync %s): recovered %d jobs in %.2fs",
                (self.config.store_url is None and self.config.data_dir) or self.store,
                self.config.fsync,
                len(recovered.jobs),
                time.perf_counter() - started,
            )
            if self.config.fsync is FsyncMode.INTERVAL:
                self._sync_handle = loop.call_later(1.0, self._sync)
            self._compact_handle = loop.call_later(COMPACT_EVERY, self._compact)
        else:
            log.info("in memory only (--memory): jobs are lost when the broker stops")
        for name, settings in self.config.queues.items():  # the config file's, at every start
            self.scheduler.configure_queue(name, loop.time(), **settings)
        for name, settings in self.config.schedules.items():  # likewise; a stored one keeps its last tick
            self.scheduler.set_schedule(schedule_from_settings(name, settings), time.time())
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
        self._started_at = loop.time()
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
        for handle in (
            self._tick_handle,
            self._heartbeat_handle,
            self._sync_handle,
            self._compact_handle,
            self._retry_handle,
        ):
            if handle is not None:
                handle.cancel()
        if self._writing is None and self._fatal is None:
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
        now = self.loop.time()
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
        deadline = self.loop.time() + grace
        while self.scheduler.in_flight and self.loop.time() < deadline and not self._closed.done():
            await asyncio.sleep(0.05)
        # The results of the jobs that just finished wait for their commit: let it land.
        deadline = self.loop.time() + _LAST_COMMIT_WAIT
        while self._writing is not None and self.loop.time() < deadline and not self._closed.done():
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
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await self.loop.run_in_executor(writer, self.store.close)  # after every queued write
            writer.shutdown(wait=True)
            if self._fatal is not None:
                raise self._fatal
            log.info("broker closed; data saved")
        elif self.store.durable is False:
            log.info("broker closed")

    def _close_store(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
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
        count = self.warnings.hit(what, protocol.address, self.loop.time())
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
            self.scheduler.close_session(protocol.session, self.loop.time())
            self._schedule_flush()

    def _mark_dirty(self, protocol: _BrokerProtocol) -> None:
        self._dirty[protocol] = None
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    # --- requests ---------------------------------------------------------------------

    def _handle_request(self, protocol: _BrokerProtocol, request: Request) -> None:
        handler = self._handlers.get(type(request))
        try:
            if handler is None:
                raise InvalidRequest(f"op {request.op!r} is not handled")
            if request.op not in protocol.allowed:
                raise Forbidden(
                    f"op {request.op!r} is not allowed for credential {protocol.connection.claimed_credential!r}"
                )
            data = handler(protocol, request, self.loop.time())
        except BrokerError as exc:
            protocol.send(ErrorReply(id=request.id, code=exc.code, message=str(exc)))
        except Exception:
            # A bug of ours must not take the connection (or the broker) down with it.
            log.exception("internal error handling %s from session %d", request.op, protocol.session)
            protocol.send(ErrorReply(id=request.id, code="internal", message="internal broker error"))
        else:
            protocol.send_reply(request.id, data)
            if self._writer is not None and not protocol.needs_commit:
                protocol.needs_commit = self._reflects_unwritten(request, data)

    def _reflects_unwritten(self, request: Request, data: dict[str, Any]) -> bool:
        """Whether a reply tells of a change not yet committed, so that it must wait for it
        (docs/protocol.md, "Durability"): what a submit created or found by its key, what a
        cancel changed, the state a `job` reply or a dead list shows. A refusal changes
        nothing and waits for nothing."""
        kind = type(request)
        if kind is Submit:
            return self._unwritten(data["job_ids"])
        if isinstance(request, Cancel | Watch):
            return self._unwritten(request.job_ids)
        if isinstance(request, JobInfo):
            return self._unwritten([request.job_id])
        if kind is DeadList or kind is JobList:
            return self._unwritten([job["id"] for job in data["jobs"]])
        return kind in _DURABLE_REPLIES

    def _unwritten(self, job_ids: Iterable[int]) -> bool:
        """Whether any of these jobs has a change that is not committed: not yet taken for a
        commit, in the commit in flight, or in a failed one waiting to be written again."""
        changed = self.scheduler.changed
        others: list[int] = []
        for job_id in job_ids:
            if changed(job_id):  # the common case (a new job, a completion): no set is made
                return True
            others.append(job_id)
        return any(
            batch is not None and not batch.job_ids().isdisjoint(others) for batch in (self._writing, self._unsaved)
        )

    def _on_submit(self, client: _BrokerProtocol, request: Submit, now: float) -> dict[str, Any]:
        if self._storage_error is not None:
            raise StorageUnavailable(f"the broker cannot store new jobs: {self._storage_error}")
        # Payloads are held packed (the broker never looks inside): a payload costs its encoded
        # size, is measured by it, stored as it is and spliced into deliveries.
        payloads = [packed(payload) for payload in request.payloads]
        limit = self.config.max_payload_size
        for index, payload in enumerate(payloads):
            if len(payload) > limit:
                raise LimitExceeded(f"payload {index} is over the limit of {limit} bytes")
        ids = self.scheduler.submit(
            client.session,
            request.queue,
            payloads,
            now,
            priority=request.priority,
            delay=request.delay,
            max_attempts=request.max_attempts,
            lease=request.lease,
            backoff=request.backoff,
            keys=request.keys,
            watch=request.watch,
            owner=client.owner,
            timeout=request.timeout,
            result_ttl=request.result_ttl,
            max_backoff=request.max_backoff,
            after=request.after,
            run_anyway=_run_anyway(request.after_policy),
        )
        return {"job_ids": ids}

    def _on_reserve(self, client: _BrokerProtocol, request: Reserve, now: float) -> dict[str, Any]:
        self.scheduler.reserve(client.session, request.queues, request.prefetch, now)
        return {}

    def _on_complete(self, client: _BrokerProtocol, request: Complete, now: float) -> dict[str, Any]:
        limit = self.config.max_result_size
        oversized = _too_large([item[2] for item in request.items], limit, every=True)
        if not oversized:
            return _refusals(self.scheduler.complete(client.session, request.items, now))
        # A result over the limit fails its job (retried, then dead) rather than vanishing.
        items = [item for index, item in enumerate(request.items) if index not in oversized]
        codes = iter(self.scheduler.complete(client.session, items, now))
        failures = [[item[0], item[1], "ResultTooLarge", f"result over {limit} bytes"] for item in request.items]
        self.scheduler.fail(client.session, [failures[index] for index in sorted(oversized)], now)
        return _refusals(["result_too_large" if i in oversized else next(codes) for i in range(len(request.items))])

    def _on_fail(self, client: _BrokerProtocol, request: Fail, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.fail(client.session, request.items, now))

    def _on_started(self, client: _BrokerProtocol, notice: Started) -> None:
        """A notice (no reply): the worker began these jobs. Items it no longer holds are
        ignored: the broker has told it already (revoked) or its session is gone."""
        if Started.op in client.allowed:
            self.scheduler.started(client.session, notice.items, self.loop.time())
        else:
            client.send(ErrorReply(id=None, code=Forbidden.code, message="op 'started' is not allowed"))

    def _on_touch(self, client: _BrokerProtocol, request: Touch, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.touch(client.session, request.items, now))

    def _on_release(self, client: _BrokerProtocol, request: Release, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.release(client.session, request.items, now))

    def _on_progress(self, client: _BrokerProtocol, request: Progress, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.progress(client.session, request.items, now))

    def _on_watch(self, client: _BrokerProtocol, request: Watch, now: float) -> dict[str, Any]:
        # One outcome per job however often the request names it: a job's result is pushed once.
        self.scheduler.watch(client.session, list(dict.fromkeys(request.job_ids)), owner=client.owner)
        return {}

    def _on_cancel(self, client: _BrokerProtocol, request: Cancel, now: float) -> dict[str, Any]:
        return _refusals(self.scheduler.cancel(request.job_ids, now, owner=client.owner))

    def _on_stats(self, client: _BrokerProtocol, request: Stats, now: float) -> dict[str, Any]:
        return self.scheduler.stats(now)

    def _on_job_info(self, client: _BrokerProtocol, request: JobInfo, now: float) -> dict[str, Any]:
        return {"job": self.scheduler.job_info(request.job_id, owner=client.owner)}

    def _on_job_list(self, client: _BrokerProtocol, request: JobList, now: float) -> dict[str, Any]:
        jobs = self.scheduler.job_list(
            request.queue, request.state, after=request.after, limit=request.limit, owner=client.owner
        )
        return {"jobs": jobs}

    def _on_queue_set(self, client: _BrokerProtocol, request: QueueSet, now: float) -> dict[str, Any]:
        settings = self.scheduler.configure_queue(
            request.queue, now, paused=request.paused, concurrency=request.concurrency, rate=request.rate
        )
        log.warning("queue %s set by session %d: %s", request.queue, client.session, settings)
        return settings

    def _on_schedule_set(self, client: _BrokerProtocol, request: ScheduleSet, now: float) -> dict[str, Any]:
        settings = {
            "queue": request.queue,
            "payload": request.payload,
            "cron": request.cron,
            "every": request.every,
            "tz": request.tz,
            "catch_up": request.catch_up,
            **(request.options or {}),
        }
        record = self.scheduler.set_schedule(schedule_from_settings(request.name, settings), time.time())
        log.warning("schedule %s set by session %d: %s", request.name, client.session, record)
        self._arm_ticker()
        return record

    def _on_schedule_remove(self, client: _BrokerProtocol, request: ScheduleRemove, now: float) -> dict[str, Any]:
        removed = self.scheduler.remove_schedule(request.name)
        if removed:
            log.warning("schedule %s removed by session %d", request.name, client.session)
        return {"removed": removed}

    def _on_schedule_list(self, client: _BrokerProtocol, request: ScheduleList, now: float) -> dict[str, Any]:
        return {"schedules": [schedule.record() for schedule in self.scheduler.schedules.all()]}

    def _on_queue_purge(self, client: _BrokerProtocol, request: QueuePurge, now: float) -> dict[str, Any]:
        purged = self.scheduler.purge_queue(request.queue, now)
        if purged:
            log.warning("queue %s purged by session %d: %s", request.queue, client.session, _ids(purged))
        return {"purged": len(purged)}

    def _on_dead_list(self, client: _BrokerProtocol, request: DeadList, now: float) -> dict[str, Any]:
        return {"jobs": self.scheduler.dead_list(request.queue, request.limit)}

    def _on_dead_requeue(self, client: _BrokerProtocol, request: DeadRequeue, now: float) -> dict[str, Any]:
        requeued = self.scheduler.dead_requeue(request.queue, request.job_ids, now)
        if requeued:
            log.warning(
                "dead jobs of queue %s requeued by session %d: %s", request.queue, client.session, _ids(requeued)
            )
        return {"requeued": len(requeued)}

    def _on_drain(self, client: _BrokerProtocol, request: Drain, now: float) -> dict[str, Any]:
        in_flight = self.scheduler.drain(request.on)
        log.warning(
            "deliveries %s by session %d; %d jobs in flight",
            "stopped" if request.on else "resumed",
            client.session,
            in_flight,
        )
        if not request.on:
            self._schedule_flush()
        return {"in_flight": in_flight}

    def _on_dead_purge(self, client: _BrokerProtocol, request: DeadPurge, now: float) -> dict[str, Any]:
        purged = self.scheduler.dead_purge(request.queue, request.job_ids)
        if purged:
            log.warning("dead jobs of queue %s purged by session %d: %s", request.queue, client.session, _ids(purged))
        return {"purged": len(purged)}

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
        now = self.loop.time()
        self._apply(self.scheduler.flush(now))
        if self.scheduler.next_token > self._ceilings.token or self._next_session > self._ceilings.session:
            # Only if a block of ids was used up before a commit could store the next one.
            self._stop_on_storage_failure(StorageFailed("lease tokens or session ids beyond the stored ceiling"))
            return
        dirty, self._dirty = self._dirty, {}
        if self._writer is None:
            for protocol in dirty:
                protocol.write(protocol.connection.data_to_send())
            return
        for protocol in dirty:
            data = protocol.connection.data_to_send()
            if protocol.needs_commit or protocol.held:
                protocol.needs_commit = False
                protocol.held += 1
                protocol.held_bytes += len(data)
                self._held.append((protocol, data))
            else:
                protocol.write(data)
        if self._writing is None:
            self._start_commit(now)

    def _start_commit(self, now: float) -> None:
        """Write every change not yet written; the output held so far goes out after it."""
        assert self._writer is not None
        changes = self.scheduler.take_changes()
        ceilings = self._raised_ceilings()
        # Rows of a failed write go again with the next changes, or alone when the retry timer
        # says so. Output held with nothing new behind it goes out at once, unless rows of a
        # failed write are still unwritten: it may tell of them (a result, a `job` reply), and
        # a crash would undo what it told; it waits for their retry.
        if not changes and ceilings is None and (self._unsaved is None or not self._retry_due):
            if self._unsaved is None:
                held, self._held = self._held, []
                _release(held)
            return
        held, self._held = self._held, []
        self._retry_due = False
        rows = serialize(changes, now, time.time())
        rows.ceilings = ceilings
        unsaved, self._unsaved = self._unsaved, None
        if unsaved is not None:
            rows = unsaved.rows.then(rows)
        next_job_id = self.scheduler.next_job_id
        self._writing = _Batch(held, rows, next_job_id)
        future = self.loop.run_in_executor(self._writer, self.store.write, rows, next_job_id)
        future.add_done_callback(self._committed)

    def _raised_ceilings(self) -> IdCeilings | None:
        """New ceilings for lease tokens and session ids once half the stored block is used:
        stored ahead of use, with the next commit (docs/protocol.md, "Durability")."""
        ceilings = self._ceilings
        token, session = self.scheduler.next_token, self._next_session
        if token + TOKEN_BLOCK // 2 <= ceilings.token and session + SESSION_BLOCK // 2 <= ceilings.session:
            return None
        return IdCeilings(max(ceilings.token, token + TOKEN_BLOCK), max(ceilings.session, session + SESSION_BLOCK))

    def _committed(self, future: asyncio.Future[None]) -> None:
        batch, self._writing = self._writing, None
        assert batch is not None
        if self._fatal is not None:
            return
        error = future.exception()
        if isinstance(error, StorageFailed):
            self._stop_on_storage_failure(error)
            return
        if error is not None:
            self._commit_failed(batch, error)
        else:
            if self._storage_error is not None:
                log.warning("storage works again; accepting submits")
                self._storage_error = None
            if batch.rows.ceilings is not None:
                self._ceilings = batch.rows.ceilings
            # The jobs this commit created may run now: delivered in this same cycle, below.
            self.scheduler.stored(batch.next_job_id)
            _release(batch.outgoing)
        if self._closed is not None and not self._closed.done():
            self._flush_now()  # deliveries of the jobs just stored; what gathered meanwhile

    def _stop_on_storage_failure(self, error: StorageFailed) -> None:
        """A write failed in a way that a retry cannot fix: what waited for it is never sent
        (its clients see the connection close, not a false acknowledgement), and the broker
        stops; wait_closed() raises the error (the CLI exits with status 2)."""
        if self._fatal is not None:
            return
        log.critical("%s; stopping the broker", error)
        self._fatal = error
        self._held = []
        self._unsaved = None
        for protocol in list(self._connections.values()):
            if protocol.transport is not None:
                protocol.transport.abort()
        self.close()

    def _commit_failed(self, batch: _Batch, error: BaseException) -> None:
        """Nothing of the batch is on disk: its acknowledgements must not go out. Close the
        connections they were for (their clients see the loss, not a false ack), keep the rows
        to write again, and refuse submits until a write succeeds."""
        failure = error if isinstance(error, StorageError) else StorageError(f"storage failed: {error}")
        if self._storage_error is None:
            log.error("%s; refusing submits until storage works again", failure)
        self._storage_error = failure
        # Rows not yet written go again first, so that the newer state of a job wins.
        self._unsaved = (
            batch if self._unsaved is None else _Batch([], self._unsaved.rows.then(batch.rows), batch.next_job_id)
        )
        for protocol, _ in batch.outgoing:
            if protocol.transport is not None:
                protocol.transport.abort()
        if self._closed is not None and not self._closed.done() and self._retry_handle is None:
            self._retry_handle = self.loop.call_later(1.0, self._retry_write)

    def _retry_write(self) -> None:
        self._retry_handle = None
        self._retry_due = True
        self._schedule_flush()

    def _compact(self) -> None:
        if self._writer is not None:
            self.loop.run_in_executor(self._writer, self.store.compact).add_done_callback(_log_sync_failure)
            self._compact_handle = self.loop.call_later(COMPACT_EVERY, self._compact)

    def _sync(self) -> None:
        if self._writer is not None:
            self.loop.run_in_executor(self._writer, self.store.sync).add_done_callback(self._synced)
            self._sync_handle = self.loop.call_later(1.0, self._sync)

    def _synced(self, future: asyncio.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if isinstance(error, StorageFailed):  # a failed fsync: what it covered may be gone
            self._stop_on_storage_failure(error)
        elif error is not None:
            log.error("%s", error)

    def _apply(self, effects: list[Effect]) -> None:
        connections = self._connections
        for effect in effects:
            if isinstance(effect, DeliverEffect | ResultsReady | ProgressReady | Revoke):
                protocol = connections.get(effect.session)
                if protocol is not None:
                    needs_commit = (
                        isinstance(effect, ResultsReady)
                        and self._writer is not None
                        and self._unwritten(item[0] for item in effect.items)
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
                    _ids(effect.requeued),
                    _ids(effect.buried),
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
        if tick_wall is not None:  # a schedule's tick, in wall-clock time, on the loop's clock
            tick_at = self.loop.time() + max(0.0, tick_wall - time.time())
            deadline = tick_at if deadline is None else min(deadline, tick_at)
        if deadline is None or deadline >= self._tick_at:
            return
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._tick_at = deadline
        self._tick_handle = self.loop.call_at(deadline, self._on_tick)

    def _on_tick(self) -> None:
        self._tick_handle = None
        self._tick_at = float("inf")
        now = self.loop.time()
        self.scheduler.tick(now)
        if self._storage_error is None:  # a tick's job waits for storage to work again
            for name, tick, error in self.scheduler.fire_schedules(now, time.time()):
                if error is not None:
                    log.warning("schedule %s could not submit its job of tick %.3f: %s", name, tick, error)
        self._flush()

    def _send_heartbeats(self) -> None:
        now = self.loop.time()
        for protocol in list(self._connections.values()):
            protocol.send(_HEARTBEAT)
            protocol.check_progress(now)
        for what, address, count in self.warnings.flush(now):
            log.warning("%s %s: %d more in the last %.0fs", what, address, count, self.warnings.interval)
        self._heartbeat_handle = self.loop.call_later(self.config.heartbeat, self._send_heartbeats)


# Replies that wait for the commit of what the request changed (see Broker._flush_now); submit,
# cancel, watch, job and dead_list replies wait if the jobs they name have unwritten changes
# (Broker._reflects_unwritten).
_DURABLE_REPLIES: frozenset[type[Request]] = frozenset(
    {Submit, Cancel, DeadRequeue, DeadPurge, QueuePurge, QueueSet, ScheduleSet, ScheduleRemove}
)

# The push message that carries each kind of effect to its session.
_PUSHES: dict[type[Effect], PushType] = {
    DeliverEffect: Deliver,
    ResultsReady: Results,
    ProgressReady: Progressed,
    Revoke: Revoked,
}


def _run_anyway(policy: str) -> bool:
    """after_policy: "done" (every job it runs after must succeed) or "always"."""
    if policy not in ("done", "always"):
        raise InvalidRequest(f"after_policy is 'done' or 'always', not {policy!r}")
    return policy == "always"


def _measured(items: list[Any], limit: int) -> int:
    """The encoded size of `items`, counted one by one and no further than past `limit`."""
    size = 0
    for item in items:
        size += len(msgpack.packb(item, use_bin_type=True))
        if size > limit:
            break
    return size


def _release(held: list[tuple[_BrokerProtocol, bytes]]) -> None:
    """Send output that waited for a commit."""
    for protocol, data in held:
        protocol.held -= 1
        protocol.held_bytes -= len(data)
        protocol.write(data)


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


class _Batch:
    """Output and the rows that must be committed before it may go out; `next_job_id`: every
    job created before these rows were taken has a smaller id."""

    __slots__ = ("_job_ids", "next_job_id", "outgoing", "rows")

    def __init__(self, outgoing: list[tuple[_BrokerProtocol, bytes]], rows: WriteBatch, next_job_id: int) -> None:
        self.outgoing = outgoing
        self.rows = rows
        self.next_job_id = next_job_id
        self._job_ids: set[int] | None = None

    def job_ids(self) -> set[int]:
        """The jobs whose rows this batch writes (made on first use: most batches never need it)."""
        if self._job_ids is None:
            self._job_ids = self.rows.job_ids()
        return self._job_ids


def _log_sync_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("%s", future.exception())


def _too_large(values: list[Any], limit: int, *, every: bool = False) -> Any:
    """Which values encode to more than `limit` bytes: the first index (or, with every, the
    set of all), or None / an empty set. Cheap in the common case: when all of them together
    fit, none is checked alone."""
    if len(msgpack.packb(values, use_bin_type=True)) <= limit:
        return set() if every else None
    oversized = {i for i, value in enumerate(values) if len(msgpack.packb(value, use_bin_type=True)) > limit}
    if every:
        return oversized
    return min(oversized) if oversized else None


def _refusals(codes: list[str | None]) -> dict[str, Any]:
    return {"refused": [[index, code] for index, code in enumerate(codes) if code is not None]}


def _ids(ids: list[int]) -> str:
    shown = ",".join(map(str, ids[:20]))
    return f"[{shown}{',...' if len(ids) > 20 else ''}]"


async def serve(
    config: BrokerConfig, secret: bytes | None = None, *, credentials: Mapping[str, Credential] | None = None
) -> None:
    """Run a broker until cancelled."""
    broker = Broker(config, secret, credentials=credentials)
    await broker.serve_forever()
