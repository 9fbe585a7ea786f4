"""The PostgreSQL store: the Store of broker/store.py with its jobs in a PostgreSQL database,
for a broker whose data must outlive its machine (README, "The PostgreSQL store").

Same semantics as SqliteStore: one row per live job (its current state, not a history), the id
ceilings, queue controls and schedules; load() once at start, write() one batch in one
transaction from the writer thread, and the server acknowledges only once write() returns,
that is once COMMIT has returned. What differs:

- New jobs go in by one binary COPY; changes by a binary COPY into a per-connection temporary
  table and one UPDATE ... FROM; deletes by one DELETE. Binary COPY was measured at three to
  four times the rate of `executemany` pipelines or `unnest` arrays, for a tenth of the client
  CPU that the writer thread would take from the event loop (figures in the commit that added
  this file).
- Every write is idempotent (a batch written again after a lost COMMIT that did land meets
  a stored id: its new jobs then go through a staging table and INSERT ... ON CONFLICT;
  ceilings only rise), and every failure is retryable (StorageError, never StorageFailed):
  PostgreSQL, not this process, owns the fsync, so a failed or lost COMMIT never means that
  acknowledged data is gone. A lost connection (a PostgreSQL restart, a failover) fails the
  write; the server withholds its acknowledgements and writes the batch again, and the next
  write() connects anew.
- The schema is versioned in jobbroker_meta and migrated at start under an advisory lock; a
  database written by a newer broker is refused.
- jobbroker_leader holds one row where a leader epoch lives (epoch 0 for now): leadership
  and fencing (issue 15) are to check it inside write()'s transaction.

The password comes from the URL, a password file, or libpq's own PGPASSFILE / ~/.pgpass; the
URL is shown with its password masked (str(store), every error).
"""

from __future__ import annotations

import contextlib
import os
import re
import urllib.parse
from pathlib import Path
from typing import Any

import psycopg
import psycopg.conninfo
import psycopg.errors
from jobbroker.broker.core.controls import QueueControls
from jobbroker.broker.core.jobs import Job
from jobbroker.broker.errors import ConfigError, StorageError
from jobbroker.broker.store import (
    SESSION_BLOCK,
    TOKEN_BLOCK,
    FsyncMode,
    IdCeilings,
    Recovered,
    Row,
    Update,
    WriteBatch,
)
from jobbroker.broker.store.rows import job_from_row as _job_from_row
from jobbroker.broker.store.rows import unpack as _unpack
from psycopg import pq

__all__ = ["SCHEMA_VERSION", "PostgresStore", "redact_url"]

SCHEMA_VERSION = 1

# Tables are named jobbroker_* in the connection's schema (search_path; `?options=-csearch_path%3DX`
# in the URL picks another), so they sit beside an application's own tables without clashing.
_JOB_COLUMNS = (
    ("id", "bigint PRIMARY KEY"),
    ("queue", "text NOT NULL"),
    ("state", "text NOT NULL"),
    ("priority", "integer NOT NULL"),
    ("payload", "bytea"),
    ("attempts", "integer NOT NULL"),
    ("max_attempts", "integer NOT NULL"),
    ("lease", "double precision NOT NULL"),
    ("backoff", "double precision NOT NULL"),
    ("key", "text"),
    ("result", "bytea"),
    ("error", "bytea"),
    ("not_before", "double precision NOT NULL"),
    ("expires_at", "double precision NOT NULL"),
    ("owner", "text"),
    ("timeout", "double precision"),
    ("result_ttl", "double precision"),
    ("max_backoff", "double precision"),
    ("parents", "bytea"),
    ("parent_results", "bytea"),
    ("run_anyway", "smallint NOT NULL"),
)
_JOB_TYPES = [sql.split()[0].replace("double", "float8") for _, sql in _JOB_COLUMNS]
# store.Update's columns, in its order (the id last).
_UPDATE_COLUMNS = ("state", "attempts", "result", "error", "not_before", "expires_at", "parent_results", "id")
_UPDATE_TYPES = [_JOB_TYPES[[name for name, _ in _JOB_COLUMNS].index(column)] for column in _UPDATE_COLUMNS]

# Each version's statements, applied in order in one transaction from the version found.
_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE jobbroker_jobs (" + ", ".join(f"{name} {sql}" for name, sql in _JOB_COLUMNS) + ")",
        "CREATE TABLE jobbroker_schedules (name text PRIMARY KEY, record bytea NOT NULL)",
        "CREATE TABLE jobbroker_queue_controls "
        "(name text PRIMARY KEY, paused boolean NOT NULL, concurrency integer, rate double precision)",
        # One row: the epoch a leader holds, and where clients find that leader. Leadership
        # (a later step) raises the epoch when it takes over and checks it in every commit.
        "CREATE TABLE jobbroker_leader "
        "(id smallint PRIMARY KEY DEFAULT 1 CHECK (id = 1), epoch bigint NOT NULL DEFAULT 0, address text)",
        "INSERT INTO jobbroker_leader DEFAULT VALUES",
    ],
}
# Held (per transaction) while the schema is checked and migrated, so that two brokers
# starting on a new database do not both create it. Any constant of our own would do.
_SCHEMA_LOCK = 0x6A6F6262726B0001

_INSERT_NEW = "INSERT INTO jobbroker_jobs SELECT * FROM jobbroker_new_jobs ON CONFLICT (id) DO UPDATE SET " + ", ".join(
    f"{name} = EXCLUDED.{name}" for name, _ in _JOB_COLUMNS[1:]
)
_UPDATE_CHANGED = (
    "UPDATE jobbroker_jobs AS j SET "
    + ", ".join(f"{name} = u.{name}" for name in _UPDATE_COLUMNS[:-1])
    + " FROM jobbroker_changed_jobs AS u WHERE j.id = u.id"
)
# Ceilings and the next job id only rise: a batch written again after a lost COMMIT that did
# land cannot lower them.
_META = (
    "INSERT INTO jobbroker_meta (name, value) VALUES {} ON CONFLICT (name) DO UPDATE "
    "SET value = GREATEST(jobbroker_meta.value, EXCLUDED.value)"
)


def redact_url(url: str) -> str:
    """`url` with its password, if any, masked: what logs and errors show."""
    with contextlib.suppress(ValueError):
        parts = urllib.parse.urlsplit(url)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = urllib.parse.quote(urllib.parse.unquote(parts.username or ""), safe="")
            parts = parts._replace(netloc=f"{user}:***@{host}")
        url = urllib.parse.urlunsplit(parts)
    return re.sub(r"(password=)[^&\s]*", r"\1***", url)


def _read_password_file(path: Path) -> str:
    try:
        return path.read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the store password file {path}: {exc}") from exc


class PostgresStore:
    """Jobs in a PostgreSQL database.

    Args:
        url: `postgresql://USER@HOST:PORT/DB` (any libpq URI: `?sslmode=require`, ...).
        fsync: ALWAYS acknowledges only what PostgreSQL has flushed (its synchronous_commit,
            `on` at least; `remote_apply` and the like, if the database sets them, are kept);
            INTERVAL and NEVER turn synchronous_commit off for our session: COMMIT returns
            before the flush, which PostgreSQL's WAL writer makes within a second.
        password_file: a file holding the password (its first line); else the URL's, else
            libpq's PGPASSFILE or ~/.pgpass.

    Raises:
        ConfigError: not a postgresql:// URL, a password in two places, an unreadable file.
        StorageError: the database cannot be reached or logged into, or holds a schema that
            is not ours or is newer than this broker reads.
    """

    durable = True

    def __init__(
        self,
        url: str,
        fsync: FsyncMode = FsyncMode.ALWAYS,
        *,
        password_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.url = redact_url(url)
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"--store {self.url}: not a postgresql://USER@HOST:PORT/DB URL")
        try:
            params = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ConfigError(f"--store {self.url}: {exc}") from None
        if password_file is not None:
            if params.get("password"):
                raise ConfigError("the store password is both in the --store URL and in --store-password-file")
            params["password"] = _read_password_file(Path(password_file))
        self._password = str(params.get("password") or "")
        # Defaults the URL may override: fail fast when the server is gone, notice a dead peer.
        for name, value in (
            ("connect_timeout", 10),
            ("keepalives", 1),
            ("keepalives_idle", 10),
            ("keepalives_interval", 5),
            ("keepalives_count", 3),
            ("application_name", "jobbroker"),
        ):
            params.setdefault(name, value)
        self._conninfo = psycopg.conninfo.make_conninfo("", **params)
        self.fsync = fsync
        self._conn: psycopg.Connection[Any] | None = None
        connection = self._connect()
        try:
            self._migrate(connection)
        except psycopg.Error as exc:
            self.close()
            raise StorageError(f"cannot prepare the database {self.url}: {self._scrub(exc)}") from exc
        except BaseException:
            self.close()
            raise

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    def _scrub(self, exc: BaseException) -> str:
        """An error's text, without the password should the server or libpq have quoted it."""
        text = str(exc).strip()
        return text.replace(self._password, "***") if self._password else text

    def _connect(self) -> psycopg.Connection[Any]:
        """The connection, opened (and its session prepared) if there is none."""
        if self._conn is not None:
            return self._conn
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise StorageError(f"cannot connect to PostgreSQL at {self.url}: {self._scrub(exc)}") from exc
        try:
            setting = conn.execute("SHOW synchronous_commit").fetchone()
            if self.fsync is not FsyncMode.ALWAYS:
                conn.execute("SET synchronous_commit = off")
            elif setting is None or setting[0] == "off":
                conn.execute("SET synchronous_commit = on")
            # Staging tables for COPY, emptied by every COMMIT (and ROLLBACK), this session's own.
            conn.execute(
                "CREATE TEMPORARY TABLE jobbroker_new_jobs ("
                + ", ".join(f"{name} {kind}" for (name, _), kind in zip(_JOB_COLUMNS, _JOB_TYPES, strict=True))
                + ") ON COMMIT DELETE ROWS"
            )
            conn.execute(
                "CREATE TEMPORARY TABLE jobbroker_changed_jobs ("
                + ", ".join(f"{name} {kind}" for name, kind in zip(_UPDATE_COLUMNS, _UPDATE_TYPES, strict=True))
                + ") ON COMMIT DELETE ROWS"
            )
        except psycopg.Error as exc:
            conn.close()
            raise StorageError(f"cannot prepare a session on {self.url}: {self._scrub(exc)}") from exc
        self._conn = conn
        return conn

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            found = conn.execute("SELECT to_regclass('jobbroker_meta') IS NOT NULL").fetchone()
            version = 0
            if found is not None and found[0]:
                row = conn.execute("SELECT value FROM jobbroker_meta WHERE name = 'schema'").fetchone()
                if row is None:
                    raise StorageError(f"{self.url}: jobbroker_meta holds no schema version: not a jobbroker database")
                version = int(row[0])
            else:
                conn.execute("CREATE TABLE jobbroker_meta (name text PRIMARY KEY, value bigint NOT NULL)")
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.url} holds schema version {version}, written by a newer jobbroker; this broker reads "
                    f"versions up to {SCHEMA_VERSION}: upgrade it (or point it at another database)"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO jobbroker_meta VALUES ('schema', %s) ON CONFLICT (name) DO UPDATE SET value = %s",
                (SCHEMA_VERSION, SCHEMA_VERSION),
            )

    def load(self, now: float, wall: float) -> Recovered:
        offset = now - wall
        jobs: list[Job] = []
        shared: dict[Any, Any] = {}
        try:
            conn = self._connect()
            with conn.transaction():
                # A server-side cursor: a million jobs arrive in slices, not in one result.
                with conn.cursor("jobbroker_load", binary=True) as cursor:
                    cursor.itersize = 10_000
                    cursor.execute("SELECT * FROM jobbroker_jobs ORDER BY id")
                    for row in cursor:
                        jobs.append(_job_from_row(row, offset, shared))
                meta = {str(name): int(value) for name, value in conn.execute("SELECT name, value FROM jobbroker_meta")}
                controls = {
                    name: QueueControls(paused=paused, concurrency=concurrency, rate=rate)
                    for name, paused, concurrency, rate in conn.execute(
                        "SELECT name, paused, concurrency, rate FROM jobbroker_queue_controls"
                    )
                }
                schedules = [
                    _unpack(record)
                    for (record,) in conn.execute("SELECT record FROM jobbroker_schedules ORDER BY name")
                ]
        except psycopg.Error as exc:
            self._forget_broken_connection()
            raise StorageError(f"cannot read {self.url}: {self._scrub(exc)}") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise StorageError(f"cannot read {self.url}: a damaged row: {exc}") from exc
        next_job_id = max(meta.get("next_job_id", 1), jobs[-1].id + 1 if jobs else 1)
        # As SqliteStore: counting starts at the stored ceilings, and the next block is stored
        # before anything is handed out.
        next_token = max(meta.get("token_ceiling", 0), 1)
        next_session = max(meta.get("session_ceiling", 0), 1)
        ceilings = IdCeilings(next_token + TOKEN_BLOCK, next_session + SESSION_BLOCK)
        self.write(WriteBatch(ceilings=ceilings), next_job_id)
        return Recovered(jobs, next_job_id, next_token, next_session, ceilings, controls, schedules)

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        """One transaction; returns once COMMIT has returned.

        Raises:
            StorageError: nothing of the batch may be taken as stored (its COMMIT failed or its
                outcome is unknown): write it again; a lost connection is opened anew then.
        """
        try:
            try:
                self._transaction(batch, next_job_id, upsert=False)
            except psycopg.errors.UniqueViolation:
                # A job of the batch is stored already: this is a batch written again after a
                # COMMIT whose outcome was lost, and that COMMIT did land. Again, as upserts.
                self._transaction(batch, next_job_id, upsert=True)
        except psycopg.Error as exc:
            self._forget_broken_connection()
            raise StorageError(f"cannot write to {self.url}: {self._scrub(exc)}") from exc

    def _transaction(self, batch: WriteBatch, next_job_id: int, *, upsert: bool) -> None:
        """BEGIN, the COPYs, then every other statement and COMMIT in one round trip (a
        simple query of several statements, their values integers written out): a group
        commit waits on few round trips to the server, and its rows never pass as text."""
        conn = self._connect()
        final: list[str] = []
        try:
            with conn.cursor() as cursor:
                if batch.inserts or batch.updates or batch.schedules or batch.controls:
                    cursor.execute("BEGIN")
                else:
                    final.append("BEGIN")
                # Fencing (issue 15) belongs inside this transaction: a check of the leader epoch.
                self._write_jobs(cursor, batch, final, upsert=upsert)
                for name, record in batch.schedules.items():
                    if record is None:
                        cursor.execute("DELETE FROM jobbroker_schedules WHERE name = %s", (name,))
                    else:
                        cursor.execute(
                            "INSERT INTO jobbroker_schedules VALUES (%s, %s) "
                            "ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record",
                            (name, record),
                        )
                for name, controls in batch.controls.items():
                    if controls is None:
                        cursor.execute("DELETE FROM jobbroker_queue_controls WHERE name = %s", (name,))
                    else:
                        cursor.execute(
                            "INSERT INTO jobbroker_queue_controls VALUES (%s, %s, %s, %s) ON CONFLICT (name) "
                            "DO UPDATE SET paused = EXCLUDED.paused, concurrency = EXCLUDED.concurrency, "
                            "rate = EXCLUDED.rate",
                            (name, *controls),
                        )
                meta = [("next_job_id", next_job_id)]
                if batch.ceilings is not None:
                    meta += [("token_ceiling", batch.ceilings.token), ("session_ceiling", batch.ceilings.session)]
                final.append(_META.format(", ".join(f"('{name}', {int(value)})" for name, value in meta)))
                final.append("COMMIT")
                cursor.execute("; ".join(final))
        except BaseException:
            if not conn.broken and conn.info.transaction_status != pq.TransactionStatus.IDLE:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
            raise

    def _write_jobs(self, cursor: psycopg.Cursor[Any], batch: WriteBatch, final: list[str], *, upsert: bool) -> None:
        """Inserts, updates and deletes. New jobs are copied straight into their table, or
        with `upsert` through a staging table and INSERT ... ON CONFLICT (which writes each
        row twice); changes are copied into a staging table for one UPDATE ... FROM. The
        statements that follow the COPYs go into `final`. A batch merged from several
        (WriteBatch.then) may change a job twice: the latest row of each id is kept (a
        statement may touch a row only once, and UPDATE ... FROM would pick one at random)."""
        if batch.inserts:
            inserts: dict[int, Row] = {row[0]: row for row in batch.inserts}
            table = "jobbroker_new_jobs" if upsert else "jobbroker_jobs"
            with cursor.copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_JOB_TYPES)
                for row in inserts.values():
                    copy.write_row(row)
            if upsert:
                final.append(_INSERT_NEW)
        if batch.updates:
            updates: dict[int, Update] = {update[-1]: update for update in batch.updates}
            with cursor.copy("COPY jobbroker_changed_jobs FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_UPDATE_TYPES)
                for update in updates.values():
                    copy.write_row(update)
            final.append(_UPDATE_CHANGED)
        if batch.deletes:
            ids = ",".join(str(int(job_id)) for job_id in batch.deletes)
            final.append(f"DELETE FROM jobbroker_jobs WHERE id = ANY('{{{ids}}}'::bigint[])")

    def _forget_broken_connection(self) -> None:
        """After a failure: a connection that is lost, or not idle, is closed, and the next
        call connects anew."""
        conn = self._conn
        if conn is None:
            return
        if conn.broken or conn.closed or conn.info.transaction_status != pq.TransactionStatus.IDLE:
            self._conn = None
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def sync(self) -> None:
        """Nothing to do: PostgreSQL's WAL writer flushes what an INTERVAL commit left."""

    def compact(self) -> None:
        """Nothing to do: autovacuum gives deleted rows' space back for reuse."""

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
