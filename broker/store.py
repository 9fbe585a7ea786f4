"""Durability behind one small interface: load() once at start, write() batches of changed
jobs, close(). The job core stays in memory and pure; the server serialises the jobs a loop
turn changed (rows()) and hands them to a writer thread, and sends the turn's replies only once
write() has returned (group commit: one transaction, one fsync, per turn).

SqliteStore keeps one row per live job in SQLite (WAL mode): the current state, not a history,
so disk use follows live jobs. Finished jobs are deleted when their result TTL ends and freed
pages are returned to the file system as they go (auto_vacuum=INCREMENTAL).
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sqlite3
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import msgpack

from broker.core.jobs import Job, JobState
from broker.core.scheduler import Changes
from broker.errors import StorageError

__all__ = [
    "FsyncMode",
    "MemoryStore",
    "Recovered",
    "Row",
    "SqliteStore",
    "Store",
    "Update",
    "WriteBatch",
    "serialize",
]

SCHEMA_VERSION = 3  # 2: jobs.owner; 3: jobs.timeout

# A job as created: id, queue, state, priority, payload, attempts, max_attempts, lease,
# backoff, key, result, error, not_before (wall clock), expires_at (wall clock), owner, timeout.
Row = tuple[
    int,
    str,
    str,
    int,
    bytes | None,
    int,
    int,
    float,
    float,
    str | None,
    bytes | None,
    bytes | None,
    float,
    float,
    str | None,
    float | None,
]
# A change of a stored job: state, attempts, result, error, not_before, expires_at, id.
Update = tuple[str, int, bytes | None, bytes | None, float, float, int]


class FsyncMode(enum.StrEnum):
    ALWAYS = "always"  # fsync every group commit before acknowledging it
    INTERVAL = "interval"  # commit before acknowledging; fsync at most a second later
    NEVER = "never"  # commit before acknowledging; fsync left to the OS


@dataclass(slots=True)
class Recovered:
    jobs: list[Job]
    next_job_id: int


class Store(Protocol):
    durable: bool

    def load(self, now: float, wall: float) -> Recovered:
        """Every job stored, in id order, with times converted to the scheduler's clock."""
        ...

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        """Persist one batch atomically. Runs in the writer thread.

        Raises:
            StorageError: nothing of the batch is stored.
        """
        ...

    def sync(self) -> None:
        """Make what write() stored survive a power loss (for FsyncMode.INTERVAL)."""
        ...

    def compact(self) -> None:
        """Give disk space that no live job needs back to the file system."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """No persistence: for tests, benchmarks and `--memory`."""

    durable = False

    def load(self, now: float, wall: float) -> Recovered:
        return Recovered([], 1)

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        pass

    def sync(self) -> None:
        pass

    def compact(self) -> None:
        pass

    def close(self) -> None:
        pass


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(blob: bytes | None) -> Any:
    return None if blob is None else msgpack.unpackb(blob, raw=False, strict_map_key=False)


@dataclass(slots=True)
class WriteBatch:
    """Rows to write in one transaction: inserts first, then updates, then deletes, so that
    a batch merged from several (earlier first) leaves every job in its latest state."""

    inserts: list[Row] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.inserts or self.updates or self.deletes)

    def then(self, later: WriteBatch) -> WriteBatch:
        return WriteBatch(self.inserts + later.inserts, self.updates + later.updates, self.deletes + later.deletes)


def serialize(changes: Changes, now: float, wall: float) -> WriteBatch:
    """The scheduler's changes as rows, made in the event loop's thread (the writer thread
    must not read jobs that the loop is changing). Times become wall-clock times. A change
    writes only the columns that can change, not the payload again."""
    offset = wall - now
    inserts = [_insert_row(job, offset) for job in changes.created.values()]
    updates = [(*_state_and_attempts(job), *_mutable_columns(job, offset), job.id) for job in changes.updated.values()]
    return WriteBatch(inserts, updates, changes.forgotten)


def _insert_row(job: Job, offset: float) -> Row:
    state, attempts = _state_and_attempts(job)
    return (
        job.id,
        job.queue,
        state,
        job.priority,
        None if job.payload is None else _pack(job.payload),
        attempts,
        job.max_attempts,
        job.lease_seconds,
        job.backoff,
        job.key,
        *_mutable_columns(job, offset),
        job.owner,
        job.timeout,
    )


def _state_and_attempts(job: Job) -> tuple[str, int]:
    """Leases are not written (they would cost a write per delivery): a leased job is written
    as it was before its delivery, pending with the attempts before this one (the attempt
    counts once the worker starts it). After a crash it is simply delivered again."""
    if job.state is JobState.LEASED:
        return JobState.PENDING.value, job.attempts - (job.started_at is not None)
    return job.state.value, job.attempts


def _mutable_columns(job: Job, offset: float) -> tuple[bytes | None, bytes | None, float, float]:
    """result, error, not_before, expires_at: what changes over a job's life besides state
    and attempts."""
    state = job.state
    return (
        None if job.result is None else _pack(job.result),
        None if job.error is None else _pack(job.error),
        job.not_before + offset if state is JobState.DELAYED else 0.0,
        job.expires_at + offset if state is JobState.DONE or state is JobState.CANCELLED else 0.0,
    )


_SET_CHANGES = "UPDATE jobs SET state=?, attempts=?, result=?, error=?, not_before=?, expires_at=?"
_UPDATE_ONE = _SET_CHANGES + " WHERE id=?"
_UPDATE_MANY = _SET_CHANGES + " WHERE id IN (SELECT value FROM json_each(?))"


class _DirectoryLock:
    """An exclusive lock on the data directory, held while the broker runs, so that a second
    broker on the same directory refuses to start instead of corrupting the first's state."""

    def __init__(self, path: Path) -> None:
        self._handle: IO[bytes] | None = None
        try:
            handle = open(path, "a+b")  # noqa: SIM115 - held until release()
        except OSError as exc:
            raise StorageError(f"cannot create lock file {path}: {exc.strerror or exc}") from exc
        try:
            if sys.platform == "win32":
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StorageError(f"data directory {path.parent} is in use by another broker (lock {path})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class SqliteStore:
    """Jobs in `DATA_DIR/jobs.sqlite3`.

    Args:
        data_dir: the directory; created (mode 0700) if missing.
        fsync: when commits reach the disk (see FsyncMode).

    Raises:
        StorageError: the directory cannot be created or written, is locked by another
            broker, or holds a database that is not ours or is corrupt.
    """

    durable = True

    def __init__(self, data_dir: str | os.PathLike[str], fsync: FsyncMode = FsyncMode.ALWAYS) -> None:
        self.path = Path(data_dir)
        try:
            for directory in reversed([self.path, *self.path.parents]):
                if not directory.exists():
                    with contextlib.suppress(FileExistsError):
                        directory.mkdir(mode=0o700)  # ours alone, like the secret beside it
        except OSError as exc:
            raise StorageError(f"cannot create data directory {self.path}: {exc.strerror or exc}") from exc
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StorageError(f"data directory {self.path} is not writable")
        self._lock = _DirectoryLock(self.path / "lock")
        self.fsync = fsync
        self.database = self.path / "jobs.sqlite3"
        try:
            self._db = sqlite3.connect(self.database, isolation_level=None, check_same_thread=False)
            self._prepare()
        except sqlite3.Error as exc:
            self._lock.release()
            raise StorageError(f"cannot open {self.database}: {exc} (corrupt, or not a jobbroker database?)") from exc

    def _prepare(self) -> None:
        db = self._db
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # effective only on a new database
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode (got {mode})")
        synchronous = {FsyncMode.ALWAYS: "FULL", FsyncMode.INTERVAL: "NORMAL", FsyncMode.NEVER: "OFF"}[self.fsync]
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("PRAGMA journal_size_limit = 16777216")  # truncate the WAL back after checkpoints
        db.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                id INTEGER PRIMARY KEY, queue TEXT NOT NULL, state TEXT NOT NULL, priority INTEGER NOT NULL,
                payload BLOB, attempts INTEGER NOT NULL, max_attempts INTEGER NOT NULL, lease REAL NOT NULL,
                backoff REAL NOT NULL, key TEXT, result BLOB, error BLOB, not_before REAL NOT NULL,
                expires_at REAL NOT NULL, owner TEXT, timeout REAL)"""
        )
        db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        version = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if version is not None and version[0] == 1:  # before owners: jobs belong to nobody
            db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
            db.execute("UPDATE meta SET value = 2 WHERE name = 'schema'")
            version = (2,)
        if version is not None and version[0] == 2:  # before time limits: none
            db.execute("ALTER TABLE jobs ADD COLUMN timeout REAL")
            db.execute("UPDATE meta SET value = 3 WHERE name = 'schema'")
            version = (3,)
        if version is None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif version[0] != SCHEMA_VERSION:
            raise sqlite3.DatabaseError(f"schema version {version[0]}, this broker reads {SCHEMA_VERSION}")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"integrity check failed: {check}")

    def load(self, now: float, wall: float) -> Recovered:
        offset = now - wall
        jobs: list[Job] = []
        shared: dict[Any, Any] = {}
        try:
            cursor = self._db.execute("SELECT * FROM jobs ORDER BY id")
            for row in cursor:
                jobs.append(_job_from_row(row, offset, shared))
            meta = self._db.execute("SELECT value FROM meta WHERE name = 'next_job_id'").fetchone()
        except (sqlite3.Error, ValueError, msgpack.UnpackException) as exc:
            raise StorageError(f"cannot read {self.database}: {exc}") from exc
        next_job_id = max(meta[0] if meta else 1, jobs[-1].id + 1 if jobs else 1)
        return Recovered(jobs, next_job_id)

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        db = self._db
        try:
            db.execute("BEGIN")
            try:
                if batch.inserts:
                    # OR REPLACE: a batch written again after a failure reported late is harmless.
                    db.executemany(
                        "INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch.inserts
                    )
                if batch.updates:
                    self._update(batch.updates)
                if batch.deletes:
                    db.executemany("DELETE FROM jobs WHERE id = ?", ((i,) for i in batch.deletes))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('next_job_id', ?)", (next_job_id,))
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"cannot write to {self.database}: {exc}") from exc
        if batch.deletes:
            # Hand freed pages back to the file system, in step with what was deleted (a page
            # holds dozens of rows), so that disk use follows the live jobs. The batch is
            # committed already: a failure here is left to the next compaction.
            with contextlib.suppress(sqlite3.Error):
                # executescript steps the pragma to the end; execute() would free one page only.
                db.executescript(f"PRAGMA incremental_vacuum({64 + len(batch.deletes) // 16});")

    def _update(self, updates: list[Update]) -> None:
        """Jobs that changed alike (most deliveries: leased, first attempt) share one statement
        over a JSON list of ids, which SQLite walks without the GIL; the rest go row by row."""
        alike: dict[tuple[Any, ...], list[int]] = {}
        for update in updates:
            alike.setdefault(update[:-1], []).append(update[-1])
        singles: list[Update] = []
        for values, ids in alike.items():
            if len(ids) == 1:
                singles.append((*values, ids[0]))  # type: ignore[arg-type]
            else:
                self._db.execute(_UPDATE_MANY, (*values, json.dumps(ids)))
        if singles:
            self._db.executemany(_UPDATE_ONE, singles)

    def sync(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # syncs the WAL to disk first
        except sqlite3.Error as exc:
            raise StorageError(f"cannot sync {self.database}: {exc}") from exc

    def compact(self) -> None:
        """Checkpoint the WAL into the database and truncate it; free every unused page."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.executescript("PRAGMA incremental_vacuum;")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot compact {self.database}: {exc}") from exc

    def close(self) -> None:
        try:
            with contextlib.suppress(StorageError):
                self.compact()
            self._db.close()
        finally:
            self._lock.release()


def _job_from_row(row: Iterable[Any], offset: float, shared: dict[Any, Any]) -> Job:
    """A job from its row. `shared` holds one copy of each queue name, state and option value
    seen: a million jobs on one queue then share one "queue" string and one lease float,
    as jobs submitted in one batch do, instead of a million copies."""
    (
        job_id,
        queue,
        state,
        priority,
        payload,
        attempts,
        max_attempts,
        lease,
        backoff,
        key,
        result,
        error,
        not_before,
        expires_at,
        owner,
        timeout,
    ) = row
    job = Job(
        job_id,
        shared.setdefault(queue, queue),
        _unpack(payload),
        priority=priority,
        max_attempts=max_attempts,
        lease_seconds=shared.setdefault(("lease", lease), lease),
        backoff=shared.setdefault(("backoff", backoff), backoff),
        key=key,
        state=JobState(state),
        timeout=timeout,
    )
    job.attempts = attempts
    job.owner = owner
    if result is not None:
        job.result = _unpack(result)
    if error is not None:
        job.error = _unpack(error)
    if not_before:
        job.not_before = not_before + offset
    if expires_at:
        job.expires_at = expires_at + offset
    return job
