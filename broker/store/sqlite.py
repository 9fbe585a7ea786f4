"""SqliteStore keeps one row per live job in SQLite (WAL mode): the current state, not a history,
so disk use follows live jobs. Finished jobs are deleted when their result TTL ends and freed
pages are returned to the file system as they go (auto_vacuum=INCREMENTAL).

Beside the database, `jobs.commits` holds the number of commits made (and the id ceilings),
written after each commit: a database that holds fewer commits than that file says (its WAL
deleted or truncated after a crash) is refused at start rather than served with less than was
acknowledged (docs/protocol.md, "Durability"). recover() salvages what a damaged directory holds.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sqlite3
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgpack
from jobbroker.broker.config import FsyncMode
from jobbroker.broker.core.controls import QueueControls
from jobbroker.broker.core.jobs import Job
from jobbroker.broker.errors import StorageError, StorageFailed
from jobbroker.broker.store.interface import SESSION_BLOCK, TOKEN_BLOCK, IdCeilings, Recovered
from jobbroker.broker.store.rows import ROW_COLUMNS, ControlsRow, Row, Update, WriteBatch, job_from_row, unpack

__all__ = ["COMMIT_FILE", "SCHEMA_VERSION", "RecoveryReport", "SqliteStore", "recover"]

SCHEMA_VERSION = 5  # 2: jobs.owner; 3: jobs.timeout; 4: result_ttl, max_backoff; 5: dependencies

_SET_CHANGES = "UPDATE jobs SET state=?, attempts=?, result=?, error=?, not_before=?, expires_at=?, parent_results=?"
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
        self._side: _CommitFile | None = None
        try:
            self._db = sqlite3.connect(self.database, isolation_level=None, check_same_thread=False)
            self._prepare()
            self._commits = _meta(self._db, "commits")
            self._side = _CommitFile(self.path / COMMIT_FILE)
            acknowledged = self._side.read()
            if acknowledged.commits > self._commits:
                raise StorageError(
                    f"{self.database} holds {self._commits} commits but {acknowledged.commits} were acknowledged "
                    f"({self._side.path}): its write-ahead log (jobs.sqlite3-wal) was lost or truncated after a "
                    f"crash. Refusing to start with less than was acknowledged; `jobbroker recover --data-dir "
                    f"{self.path}` starts again from what the database holds and reports it"
                )
            self._acknowledged = acknowledged
        except (sqlite3.Error, OSError, StorageError) as exc:
            if self._side is not None:
                self._side.close()
            with contextlib.suppress(sqlite3.Error, AttributeError):
                self._db.close()
            self._lock.release()
            if isinstance(exc, StorageError):
                raise
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
                expires_at REAL NOT NULL, owner TEXT, timeout REAL, result_ttl REAL, max_backoff REAL,
                parents BLOB, parent_results BLOB, run_anyway INTEGER NOT NULL DEFAULT 0)"""
        )
        db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, record BLOB NOT NULL)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS queue_controls "
            "(name TEXT PRIMARY KEY, paused INTEGER NOT NULL, concurrency INTEGER, rate REAL)"
        )
        version = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
        if version is not None and version[0] == 1:  # before owners: jobs belong to nobody
            db.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
            db.execute("UPDATE meta SET value = 2 WHERE name = 'schema'")
            version = (2,)
        if version is not None and version[0] == 2:  # before time limits: none
            db.execute("ALTER TABLE jobs ADD COLUMN timeout REAL")
            db.execute("UPDATE meta SET value = 3 WHERE name = 'schema'")
            version = (3,)
        if version is not None and version[0] == 3:  # before per-job result TTLs and backoff caps
            db.execute("ALTER TABLE jobs ADD COLUMN result_ttl REAL")
            db.execute("ALTER TABLE jobs ADD COLUMN max_backoff REAL")
            db.execute("UPDATE meta SET value = 4 WHERE name = 'schema'")
            version = (4,)
        if version is not None and version[0] == 4:  # before dependencies
            db.execute("ALTER TABLE jobs ADD COLUMN parents BLOB")
            db.execute("ALTER TABLE jobs ADD COLUMN parent_results BLOB")
            db.execute("ALTER TABLE jobs ADD COLUMN run_anyway INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE meta SET value = 5 WHERE name = 'schema'")
            version = (5,)
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
                jobs.append(job_from_row(row, offset, shared))
            meta = self._db.execute("SELECT value FROM meta WHERE name = 'next_job_id'").fetchone()
            controls = {
                name: QueueControls(paused=bool(paused), concurrency=concurrency, rate=rate)
                for name, paused, concurrency, rate in self._db.execute("SELECT * FROM queue_controls")
            }
            schedules = [unpack(record) for (record,) in self._db.execute("SELECT record FROM schedules ORDER BY name")]
        except (sqlite3.Error, ValueError, msgpack.UnpackException) as exc:
            raise StorageError(
                f"cannot read {self.database}: {exc}; `jobbroker recover --data-dir {self.path}` salvages "
                "every readable job"
            ) from exc
        known = self._acknowledged
        next_job_id = max(meta[0] if meta else 1, jobs[-1].id + 1 if jobs else 1, known.next_job_id)
        # Counting starts at the stored ceilings (above anything handed out before), and the
        # next block is stored before anything is handed out.
        next_token = max(_meta(self._db, "token_ceiling"), known.token_ceiling, 1)
        next_session = max(_meta(self._db, "session_ceiling"), known.session_ceiling, 1)
        ceilings = IdCeilings(next_token + TOKEN_BLOCK, next_session + SESSION_BLOCK)
        self.write(WriteBatch(ceilings=ceilings), next_job_id)
        return Recovered(jobs, next_job_id, next_token, next_session, ceilings, controls, schedules)

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        db = self._db
        commits = self._commits + 1
        try:
            db.execute("BEGIN")
            try:
                if batch.inserts:
                    # OR REPLACE: a batch written again after a failure reported late is harmless.
                    db.executemany(
                        "INSERT OR REPLACE INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch.inserts
                    )
                if batch.updates:
                    self._update(batch.updates)
                if batch.deletes:
                    db.executemany("DELETE FROM jobs WHERE id = ?", ((i,) for i in batch.deletes))
                for name, record in batch.schedules.items():
                    if record is None:
                        db.execute("DELETE FROM schedules WHERE name = ?", (name,))
                    else:
                        db.execute("INSERT OR REPLACE INTO schedules VALUES (?, ?)", (name, record))
                for name, controls in batch.controls.items():
                    if controls is None:
                        db.execute("DELETE FROM queue_controls WHERE name = ?", (name,))
                    else:
                        db.execute("INSERT OR REPLACE INTO queue_controls VALUES (?, ?, ?, ?)", (name, *controls))
                meta = [("next_job_id", next_job_id), ("commits", commits)]
                if batch.ceilings is not None:
                    meta += [("token_ceiling", batch.ceilings.token), ("session_ceiling", batch.ceilings.session)]
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", meta)
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _write_error(f"cannot write to {self.database}", exc) from exc
        self._commits = commits
        known = self._acknowledged
        known.commits = commits
        known.next_job_id = next_job_id
        if batch.ceilings is not None:
            known.token_ceiling, known.session_ceiling = batch.ceilings.token, batch.ceilings.session
        try:
            assert self._side is not None
            self._side.write(known, sync=self.fsync is FsyncMode.ALWAYS)
        except OSError as exc:
            raise _write_error(f"cannot write {self.path / COMMIT_FILE}", exc) from exc
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
                singles.append((*values, ids[0]))
            else:
                self._db.execute(_UPDATE_MANY, (*values, json.dumps(ids)))
        if singles:
            self._db.executemany(_UPDATE_ONE, singles)

    def sync(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # syncs the WAL to disk first
            if self._side is not None:
                self._side.sync()
        except sqlite3.Error as exc:
            raise _write_error(f"cannot sync {self.database}", exc) from exc
        except OSError as exc:
            raise _write_error(f"cannot sync {self.path / COMMIT_FILE}", exc) from exc

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
            if self._side is not None:
                self._side.close()
            self._lock.release()


COMMIT_FILE = "jobs.commits"
_SQLITE_FULL = 13


def _meta(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _write_error(what: str, exc: BaseException) -> StorageError:
    """A full disk is worth retrying (StorageError); any other I/O error is not (StorageFailed):
    after a failed fsync the kernel may have dropped the pages it could not write, and a later
    fsync that succeeds would not bring them back."""
    code = getattr(exc, "sqlite_errorcode", None)
    full = (
        (code is not None and code & 0xFF == _SQLITE_FULL)
        or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
        or "disk is full" in str(exc)
    )
    if full:
        return StorageError(f"{what}: {exc}")
    return StorageFailed(f"{what}: {exc}: the data may not be on disk; stopping rather than retrying")


@dataclass(slots=True)
class _Acknowledged:
    """What the commit file says was committed, hence possibly acknowledged."""

    commits: int = 0
    next_job_id: int = 0
    token_ceiling: int = 0
    session_ceiling: int = 0


class _CommitFile:
    """`jobs.commits`: four 64-bit counters rewritten in place after each commit (one sector,
    so never torn), fsynced with the commit under FsyncMode.ALWAYS."""

    _FORMAT = struct.Struct(">4Q")

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def read(self) -> _Acknowledged:
        data = os.pread(self._fd, self._FORMAT.size + 1, 0)
        if not data:
            return _Acknowledged()
        if len(data) != self._FORMAT.size:
            raise StorageError(f"{self.path} is damaged ({len(data)} bytes); `jobbroker recover` rewrites it")
        return _Acknowledged(*self._FORMAT.unpack(data))

    def write(self, known: _Acknowledged, *, sync: bool) -> None:
        data = self._FORMAT.pack(known.commits, known.next_job_id, known.token_ceiling, known.session_ceiling)
        os.pwrite(self._fd, data, 0)
        if sync:
            os.fsync(self._fd)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(slots=True)
class RecoveryReport:
    """What recover() did: jobs kept, ids dropped, and where the damaged files went."""

    salvaged: int
    dropped: list[int]
    unreadable: list[str]  # what could not be read at all (a range of rows, the meta table)
    commits_found: int
    commits_acknowledged: int
    moved_to: Path | None
    next_job_id: int

    def describe(self) -> str:
        lines = [f"salvaged {self.salvaged} jobs into a fresh database"]
        if self.dropped:
            shown = ", ".join(map(str, self.dropped[:100])) + (", ..." if len(self.dropped) > 100 else "")
            lines.append(f"dropped {len(self.dropped)} unreadable jobs: ids {shown}")
        else:
            lines.append("dropped 0 jobs")
        lines.extend(f"unreadable: {what}" for what in self.unreadable)
        if self.commits_acknowledged > self.commits_found:
            lines.append(
                f"the database held {self.commits_found} of {self.commits_acknowledged} acknowledged commits: "
                f"the changes of the last {self.commits_acknowledged - self.commits_found} are lost"
            )
        if self.moved_to is not None:
            lines.append(f"the damaged files are kept in {self.moved_to}")
        lines.append(f"job ids continue at {self.next_job_id}")
        return "\n".join(lines)


def recover(data_dir: str | os.PathLike[str]) -> RecoveryReport:
    """Salvage every readable job of a data directory into a fresh database.

    The old database files move to `DATA_DIR/damaged-<time>/`; the new database continues the
    ids (jobs, lease tokens, sessions) above the highest either the old database or its commit
    file knew, so nothing is reused.

    Raises:
        StorageError: the directory is in use by a broker, or cannot be written.
    """
    path = Path(data_dir)
    if not path.is_dir():
        raise StorageError(f"{path} is not a data directory")
    lock = _DirectoryLock(path / "lock")
    try:
        database = path / "jobs.sqlite3"
        known = _Acknowledged()
        side = path / COMMIT_FILE
        if side.exists():
            data = side.read_bytes()
            if len(data) == _CommitFile._FORMAT.size:
                known = _Acknowledged(*_CommitFile._FORMAT.unpack(data))
        rows, dropped, unreadable, meta = _salvage(database) if database.exists() else ([], [], [], {})
        controls: dict[str, ControlsRow | None] = {
            str(name): (bool(paused), concurrency, rate)
            for name, paused, concurrency, rate in _salvage_table(database, "SELECT * FROM queue_controls")
        }
        schedules: dict[str, bytes | None] = dict(_salvage_table(database, "SELECT name, record FROM schedules"))
        moved_to = None
        old_files = [p for p in (database, path / "jobs.sqlite3-wal", path / "jobs.sqlite3-shm", side) if p.exists()]
        if old_files:
            moved_to = path / time.strftime("damaged-%Y%m%dT%H%M%S")
            moved_to.mkdir(mode=0o700, exist_ok=True)
            for old in old_files:
                old.rename(moved_to / old.name)
    except OSError as exc:
        raise StorageError(f"cannot recover {path}: {exc}") from exc
    finally:
        lock.release()
    next_job_id = max(meta.get("next_job_id", 1), known.next_job_id, max((r[0] for r in rows), default=0) + 1)
    # The commit file knows every id revealed, unless it lost its own last writes too (a power
    # loss under --fsync interval or never): where commits are missing, skip a block to be safe.
    if known.commits > meta.get("commits", 0):
        next_job_id += 1_000_000
    ceilings = IdCeilings(
        max(meta.get("token_ceiling", 0), known.token_ceiling, 1) + TOKEN_BLOCK,
        max(meta.get("session_ceiling", 0), known.session_ceiling, 1) + SESSION_BLOCK,
    )
    store = SqliteStore(path)
    try:
        store.write(WriteBatch(inserts=rows, ceilings=ceilings, controls=controls, schedules=schedules), next_job_id)
    finally:
        store.close()
    return RecoveryReport(len(rows), dropped, unreadable, meta.get("commits", 0), known.commits, moved_to, next_job_id)


def _salvage_table(database: Path, query: str) -> list[Any]:
    """The rows of a small table of `database` (queue controls, schedules): all, or none if it
    does not read."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return list(db.execute(query))
    except sqlite3.Error:
        return []


def _salvage(database: Path) -> tuple[list[Row], list[int], list[str], dict[str, int]]:
    """The rows of `database` that read and decode, the ids of those that do not, what could
    not be read at all, and the meta table (what of it reads)."""
    rows: list[Row] = []
    dropped: list[int] = []
    unreadable: list[str] = []
    meta: dict[str, int] = {}
    try:
        db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return rows, dropped, [f"{database}: {exc}"], meta
    try:
        try:
            meta = {str(name): int(value) for name, value in db.execute("SELECT name, value FROM meta")}
        except (sqlite3.Error, ValueError, TypeError) as exc:
            unreadable.append(f"the meta table: {exc}")
        shared: dict[Any, Any] = {}

        def take(row: Any) -> None:
            if len(row) < ROW_COLUMNS:  # an older schema: before owners (1), before time limits (2)
                row = (*row, *[None] * (ROW_COLUMNS - 1 - len(row)), 0)  # ..., run_anyway 0
            try:
                job_from_row(row, 0.0, shared)
            except (ValueError, TypeError, KeyError, msgpack.UnpackException):
                dropped.append(row[0])
            else:
                rows.append(tuple(row))

        after = 0
        while True:  # a scan; where it meets a damaged page, on past it to the next row that reads
            try:
                for row in db.execute("SELECT * FROM jobs WHERE id > ? ORDER BY id", (after,)):
                    after = row[0]
                    take(row)
                break
            except sqlite3.Error as exc:
                following = _next_readable_id(db, after)
                unreadable.append(f"rows after id {after}" + (f" before {following}" if following else "") + f": {exc}")
                if following is None:
                    break
                take(db.execute("SELECT * FROM jobs WHERE id = ?", (following,)).fetchone())
                after = following  # on from there, whatever the scan meets first
    finally:
        db.close()
    return rows, dropped, unreadable, meta


def _next_readable_id(db: sqlite3.Connection, after: int) -> int | None:
    """The first id above `after` whose row reads, probing ever larger steps (a damaged
    b-tree page can make a range scan fail)."""
    step = 1
    probe = after + 1
    while probe < 1 << 62:
        try:
            row = db.execute("SELECT id FROM jobs WHERE id >= ? ORDER BY id LIMIT 1", (probe,)).fetchone()
        except sqlite3.Error:
            probe += step
            step *= 2
            continue
        if row is None:
            return None
        try:
            db.execute("SELECT * FROM jobs WHERE id = ?", (row[0],)).fetchone()
        except sqlite3.Error:
            probe = int(row[0]) + 1
            continue
        return int(row[0])
    return None
