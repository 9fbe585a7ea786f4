"""The broker's lifecycle and loop: start (store, recovery, listening socket, HTTP port),
close and shutdown; the per-turn flush; the ticker and heartbeats. The rooms beside it do the
rest: connection.py (one connection), admission.py (which connections are taken), dispatch.py
(requests, pure), commit.py (group commit); each sees the broker through a small interface,
implemented by the _*Host classes at the end of this module.

Output is batched per loop turn: replies and pushes are queued on each connection and one
flush callback per turn dispatches jobs and hands every connection's output to group commit,
which sends it or holds it until the turn's changes are stored. Timers: one for the
scheduler's next deadline (on the broker's clock), one for heartbeats.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from collections.abc import Mapping
from typing import Any

from jobbroker.broker.access import AuthThrottle, WarningLimiter, default_credentials
from jobbroker.broker.config import BrokerConfig
from jobbroker.broker.core.clock import Clock, MonotonicClock
from jobbroker.broker.core.effects import (
    Deliver as DeliverEffect,
)
from jobbroker.broker.core.effects import (
    Effect,
    JobBuried,
    ProgressReady,
    ResultsReady,
    Revoke,
    SessionExpired,
    TimeLimitHit,
    WorkerLost,
)
from jobbroker.broker.core.records import RunTimes
from jobbroker.broker.core.scheduler import Scheduler
from jobbroker.broker.core.schedules import schedule_from_settings
from jobbroker.broker.errors import UsageError
from jobbroker.broker.protocol.credentials import Credential
from jobbroker.broker.protocol.messages import (
    Deliver,
    Heartbeat,
    Progressed,
    PushType,
    Results,
    Revoked,
)
from jobbroker.broker.reports import TrafficCounters
from jobbroker.broker.server.admission import Admission
from jobbroker.broker.server.commit import COMPACT_EVERY, GroupCommit
from jobbroker.broker.server.connection import BrokerProtocol
from jobbroker.broker.server.dispatch import Dispatcher, ids_text
from jobbroker.broker.store import FsyncMode, MemoryStore, Store, open_store
from jobbroker.broker.web import WebServer

__all__ = ["COMPACT_EVERY", "Broker", "serve"]

log = logging.getLogger("jobbroker.broker")

_HEARTBEAT = Heartbeat()

try:
    _VERSION = importlib.metadata.version("jobbroker")
except importlib.metadata.PackageNotFoundError:  # run from a source tree
    _VERSION = "unknown"
_LAST_COMMIT_WAIT = 5.0  # seconds a shutting-down broker waits for its last commit
_LISTEN_BACKLOG = 4096  # bursts of connecting workers wait in the kernel, not in SYN retries

# Flow control (docs/protocol.md, "Flow control"; see connection.py): a connection's output
# is built only while its unsent bytes are under the high-water mark: min(this,
# --max-write-buffer / 4).
_HIGH_WATER = 4 * 1024 * 1024


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
        self._web: WebServer | None = None
        self._given_store = store
        self.store: Store = store or MemoryStore()  # opened in start() when config names a store
        durable = store.durable if store is not None else (config.data_dir or config.store_url) is not None
        self.scheduler = Scheduler(config.scheduler, track_changes=durable)
        self._commit = GroupCommit(self.scheduler, self.clock, _CommitHost(self))
        self._connections: dict[int, BrokerProtocol] = {}
        self._admission = Admission(config, self._connections, self.warnings, self.clock)
        self._dirty: dict[BrokerProtocol, None] = {}
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
        self._connection_host = _ConnectionHost(self)

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
                self.store = open_store(self.config)
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
                (self.config.store_url is None and self.config.data_dir) or self.store,
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
                    _Reports(self),
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

    def _new_protocol(self) -> BrokerProtocol:
        session = self._next_session
        self._next_session += 1
        return BrokerProtocol(self._connection_host, session)

    def _connection_lost(self, protocol: BrokerProtocol, exc: Exception | None) -> None:
        self._admission.handshake_done(protocol)
        self._connections.pop(protocol.session, None)
        self._dirty.pop(protocol, None)
        if protocol.authenticated:
            log.info("session %d (%s) disconnected%s", protocol.session, protocol.peer, f": {exc}" if exc else "")
            self.scheduler.close_session(protocol.session, self.clock.now())
            self._schedule_flush()

    def _mark_dirty(self, protocol: BrokerProtocol) -> None:
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


class _ConnectionHost:
    """The broker as a connection sees it (see connection.ConnectionHost)."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.config = broker.config
        self.credentials = broker.credentials
        self.clock = broker.clock
        self.traffic = broker.traffic
        self.auth_throttle = broker.auth_throttle
        self.high_water = broker.high_water
        self.reply_budget = broker.reply_budget
        self.admit = broker._admission.admit
        self.warn = broker._admission.warn
        self.request = broker._dispatch.handle
        self.started = broker._dispatch.started
        self.seen = broker.scheduler.seen
        self.output_ready = broker._mark_dirty
        self.lost = broker._connection_lost

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._broker.loop

    def authenticated(self, connection: BrokerProtocol, client_name: str) -> None:
        broker = self._broker
        broker._admission.handshake_done(connection)
        self.auth_throttle.succeeded(connection.address)
        broker.scheduler.open_session(connection.session, self.clock.now(), name=client_name, peer=connection.peer)


class _Reports:
    """The broker as the reports of its HTTP port see it (see reports.ReportSource): plain data."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.traffic = broker.traffic

    def counts(self) -> dict[str, Any]:
        return {**self._broker.scheduler.metrics(), "run_time_bounds": list(RunTimes.BOUNDS)}

    def stats(self) -> dict[str, Any]:
        return self._broker.scheduler.stats(self._broker.clock.now())

    def dead_letters(self, queue: str, limit: int) -> list[dict[str, Any]]:
        return self._broker.scheduler.dead_list(queue, limit)

    def about(self) -> dict[str, Any]:
        broker = self._broker
        return {
            "address": f"{broker.config.host}:{broker.port}",
            "version": _VERSION,
            "durable": broker.store.durable,
            "uptime_seconds": round(broker.clock.now() - broker._started_at, 1),
        }


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
