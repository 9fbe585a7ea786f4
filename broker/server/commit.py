"""Group commit: output that tells of changes waits until they are stored.

Each turn, the broker's flush hands every connection's output here. With a durable store, the
output of a connection that must wait (a reply or result that tells of unwritten changes, or
anything behind such output) is held; the turn's changes are written by one writer thread, one
commit in flight at a time, and the held output goes out when its commit lands. While a commit
is in flight, the changes and output of the turns that follow gather into the next, so a slow
disk makes commits larger rather than more numerous. A failed write keeps its rows to write
again (a retry timer) and closes the connections its output was for; a write that cannot be
retried stops the broker. In memory, output goes out at once.

Timers: the retry, the compaction and (fsync interval) the sync of the store.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
from collections.abc import Iterable
from typing import Protocol

from jobbroker.broker.core.clock import Clock
from jobbroker.broker.core.scheduler import Scheduler
from jobbroker.broker.errors import StorageError, StorageFailed
from jobbroker.broker.store import SESSION_BLOCK, TOKEN_BLOCK, IdCeilings, Store, WriteBatch, serialize

__all__ = ["COMPACT_EVERY", "CommitHost", "GroupCommit", "Output"]

log = logging.getLogger("jobbroker.broker")

# Seconds between checkpoints that fold the SQLite WAL into the database and truncate it, so
# that disk use follows the live jobs rather than the traffic.
COMPACT_EVERY = 10.0
_WRITER_SWITCH_INTERVAL = 0.0005


class Output(Protocol):
    """A connection as group commit sees it: its output, and how much of it is held."""

    needs_commit: bool  # its output made this turn must wait for the commit
    held: int  # frames of it held for a commit (what follows waits too, to keep the order)
    held_bytes: int

    def take_output(self) -> bytes:
        """The bytes built for the peer since the last call."""
        ...

    def write(self, data: bytes) -> None:
        """Put bytes on the wire."""
        ...

    def abort(self) -> None:
        """Close at once: what it was owed will not come."""
        ...


class CommitHost(Protocol):
    """What group commit needs of the broker."""

    @property
    def running(self) -> bool:
        """Started and not closed."""
        ...

    @property
    def next_session(self) -> int:
        """The next session id the broker hands out."""
        ...

    def flush_now(self) -> None:
        """A commit landed: deliver the jobs it stored, send what gathered meanwhile."""
        ...

    def schedule_flush(self) -> None:
        """A flush at the next turn (a retry is due)."""
        ...

    def storage_failed(self) -> None:
        """The store failed for good: close every connection and the broker."""
        ...


class GroupCommit:
    """Held output, the commit in flight, failed rows and the store's timers.

    Inactive (every output goes out at once) until open() is given a writer for a durable store.
    """

    def __init__(self, scheduler: Scheduler, clock: Clock, host: CommitHost) -> None:
        self.scheduler = scheduler
        self.clock = clock
        self._host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self._store: Store | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._writing: _Batch | None = None  # the group commit in flight: at most one
        self._held: list[tuple[Output, bytes]] = []  # output waiting for the next commit
        self._unsaved: _Batch | None = None  # rows of a failed commit, to write again
        self._storage_error: StorageError | None = None
        self._fatal: StorageFailed | None = None  # the store failed for good: the broker stops
        self._ceilings = IdCeilings(1 << 62, 1 << 62)  # tokens and sessions below are stored
        self._retry_handle: asyncio.TimerHandle | None = None
        self._retry_due = False
        self._sync_handle: asyncio.TimerHandle | None = None
        self._compact_handle: asyncio.TimerHandle | None = None

    def open(self, loop: asyncio.AbstractEventLoop, store: Store, ceilings: IdCeilings, *, sync_every: bool) -> None:
        """Commit to `store` from now on (its jobs recovered already), in a writer thread;
        `ceilings`: the stored ceilings of lease tokens and session ids; `sync_every`: fsync
        once a second (fsync interval)."""
        self._loop, self._store, self._ceilings = loop, store, ceilings
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jobbroker-store")
        # The writer thread needs the GIL between SQLite calls; with the default 5 ms switch
        # interval a busy event loop makes every commit wait for it several times over.
        sys.setswitchinterval(min(sys.getswitchinterval(), _WRITER_SWITCH_INTERVAL))
        if sync_every:
            self._sync_handle = loop.call_later(1.0, self._sync)
        self._compact_handle = loop.call_later(COMPACT_EVERY, self._compact)

    @property
    def active(self) -> bool:
        """Whether changes are committed to a durable store (open() and not closed)."""
        return self._writer is not None

    @property
    def storage_error(self) -> StorageError | None:
        """Why the last write failed, until one succeeds: submits are refused meanwhile."""
        return self._storage_error

    @property
    def fatal(self) -> StorageFailed | None:
        """The failure that stopped the broker, if any."""
        return self._fatal

    @property
    def in_flight(self) -> bool:
        """Whether a commit is being written."""
        return self._writing is not None

    def send(self, dirty: Iterable[Output], now: float) -> None:
        """Send every connection's output of this turn, or hold it until the changes behind
        it are committed; start a commit unless one is in flight."""
        if self.scheduler.next_token > self._ceilings.token or self._host.next_session > self._ceilings.session:
            # Only if a block of ids was used up before a commit could store the next one.
            self.stop(StorageFailed("lease tokens or session ids beyond the stored ceiling"))
            return
        if self._writer is None:
            for protocol in dirty:
                protocol.write(protocol.take_output())
            return
        for protocol in dirty:
            data = protocol.take_output()
            if protocol.needs_commit or protocol.held:
                protocol.needs_commit = False
                protocol.held += 1
                protocol.held_bytes += len(data)
                self._held.append((protocol, data))
            else:
                protocol.write(data)
        if self._writing is None:
            self._start_commit(now)

    def unwritten(self, job_ids: Iterable[int]) -> bool:
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

    def _start_commit(self, now: float) -> None:
        """Write every change not yet written; the output held so far goes out after it."""
        assert self._writer is not None and self._loop is not None and self._store is not None
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
        rows = serialize(changes, now, self.clock.wall())
        rows.ceilings = ceilings
        unsaved, self._unsaved = self._unsaved, None
        if unsaved is not None:
            rows = unsaved.rows.then(rows)
        next_job_id = self.scheduler.next_job_id
        self._writing = _Batch(held, rows, next_job_id)
        future = self._loop.run_in_executor(self._writer, self._store.write, rows, next_job_id)
        future.add_done_callback(self._committed)

    def _raised_ceilings(self) -> IdCeilings | None:
        """New ceilings for lease tokens and session ids once half the stored block is used:
        stored ahead of use, with the next commit (docs/protocol.md, "Durability")."""
        ceilings = self._ceilings
        token, session = self.scheduler.next_token, self._host.next_session
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
            self.stop(error)
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
        if self._host.running:
            self._host.flush_now()  # deliveries of the jobs just stored; what gathered meanwhile

    def stop(self, error: StorageFailed) -> None:
        """A write failed in a way that a retry cannot fix: what waited for it is never sent
        (its clients see the connection close, not a false acknowledgement), and the broker
        stops; wait_closed() raises the error (the CLI exits with status 2)."""
        if self._fatal is not None:
            return
        log.critical("%s; stopping the broker", error)
        self._fatal = error
        self._held = []
        self._unsaved = None
        self._host.storage_failed()

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
            protocol.abort()
        if self._host.running and self._retry_handle is None and self._loop is not None:
            self._retry_handle = self._loop.call_later(1.0, self._retry_write)

    def _retry_write(self) -> None:
        self._retry_handle = None
        self._retry_due = True
        self._host.schedule_flush()

    def _compact(self) -> None:
        if self._writer is not None and self._loop is not None and self._store is not None:
            self._loop.run_in_executor(self._writer, self._store.compact).add_done_callback(_log_sync_failure)
            self._compact_handle = self._loop.call_later(COMPACT_EVERY, self._compact)

    def _sync(self) -> None:
        if self._writer is not None and self._loop is not None and self._store is not None:
            self._loop.run_in_executor(self._writer, self._store.sync).add_done_callback(self._synced)
            self._sync_handle = self._loop.call_later(1.0, self._sync)

    def _synced(self, future: asyncio.Future[None]) -> None:
        error = None if future.cancelled() else future.exception()
        if isinstance(error, StorageFailed):  # a failed fsync: what it covered may be gone
            self.stop(error)
        elif error is not None:
            log.error("%s", error)

    def cancel_timers(self) -> None:
        for handle in (self._sync_handle, self._compact_handle, self._retry_handle):
            if handle is not None:
                handle.cancel()

    async def close(self) -> None:
        """Close the store after every queued write and stop the writer thread.

        Raises:
            StorageFailed: the store failed for good while the broker ran.
        """
        if self._writer is None or self._loop is None or self._store is None:
            return
        writer, self._writer = self._writer, None
        await self._loop.run_in_executor(writer, self._store.close)  # after every queued write
        writer.shutdown(wait=True)
        if self._fatal is not None:
            raise self._fatal

    def abandon(self) -> None:
        """Stop the writer thread (the broker failed to start; it closes the store itself)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None


def _release(held: list[tuple[Output, bytes]]) -> None:
    """Send output that waited for a commit."""
    for protocol, data in held:
        protocol.held -= 1
        protocol.held_bytes -= len(data)
        protocol.write(data)


class _Batch:
    """Output and the rows that must be committed before it may go out; `next_job_id`: every
    job created before these rows were taken has a smaller id."""

    __slots__ = ("_job_ids", "next_job_id", "outgoing", "rows")

    def __init__(self, outgoing: list[tuple[Output, bytes]], rows: WriteBatch, next_job_id: int) -> None:
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
