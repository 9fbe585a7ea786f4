"""`python -m faults serve ...`: the broker, with a store whose commits a test can slow down
or fail while it runs, for the durability tests (tests/integration is on the PYTHONPATH of the
processes they start).

This hook lives here, not in the broker: the production code has no fault switch. It wraps the
SQLite connection of every SqliteStore in a proxy that intercepts BEGIN and COMMIT, then runs
the ordinary command line. The proxy reads the JSON file named by $JOBBROKER_TEST_FAULTS
before each commit:

    {"delay": 0.4}      COMMIT (where SQLite fsyncs the WAL) takes 0.4 s longer: a slow disk
    {"fail": "fsync"}   COMMIT fails with SQLITE_IOERR_FSYNC: a failed fsync
    {"fail": "full"}    COMMIT fails with SQLITE_FULL: a full disk
    {"quota": true}     the database may not grow (PRAGMA max_page_count): a disk that fills

and appends a line to $JOBBROKER_TEST_FAULTS.log as each commit begins (`begin`), succeeds
(`end`) or fails (`failed`), so that a test can await a commit in progress instead of sleeping.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from jobbroker.broker.store import SqliteStore

from jobbroker.cli import main

SQLITE_FULL = 13
SQLITE_IOERR_FSYNC = 10 | (4 << 8)


class FaultyConnection:
    """An sqlite3.Connection whose transactions obey the control file."""

    def __init__(self, db: sqlite3.Connection, control: Path) -> None:
        self._db = db
        self._control = control
        self._log = Path(f"{control}.log")
        self._unlimited = db.execute("PRAGMA max_page_count").fetchone()[0]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)

    def _faults(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self._control.read_text() or "{}"))
        except (OSError, ValueError):
            return {}

    def _note(self, event: str) -> None:
        with open(self._log, "a") as log:
            log.write(f"{event}\n")

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        if sql == "BEGIN":
            pages = self._db.execute("PRAGMA page_count").fetchone()[0] if self._faults().get("quota") else None
            self._db.execute(f"PRAGMA max_page_count = {pages or self._unlimited}")
        elif sql == "COMMIT":
            faults = self._faults()
            self._note("begin")
            time.sleep(float(faults.get("delay", 0)))
            failure = faults.get("fail")
            if failure:
                self._note("failed")
                full = failure == "full"
                error = sqlite3.OperationalError("database or disk is full" if full else "disk I/O error")
                error.sqlite_errorcode = SQLITE_FULL if full else SQLITE_IOERR_FSYNC  # type: ignore[attr-defined]
                raise error
            cursor = self._failing_noted(self._db.execute, sql, *args)
            self._note("end")
            return cursor
        return self._failing_noted(self._db.execute, sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self._failing_noted(self._db.executemany, sql, *args)

    def _failing_noted(self, method: Any, sql: str, *args: Any) -> sqlite3.Cursor:
        try:
            return method(sql, *args)  # type: ignore[no-any-return]
        except sqlite3.Error:
            if not sql.startswith("ROLLBACK"):
                self._note("failed")  # a statement of the transaction failed (the quota)
            raise


def install(control: Path) -> None:
    opened = SqliteStore.__init__

    def faulty_init(self: SqliteStore, *args: Any, **kwargs: Any) -> None:
        opened(self, *args, **kwargs)
        self._db = FaultyConnection(self._db, control)  # type: ignore[assignment]

    SqliteStore.__init__ = faulty_init  # type: ignore[method-assign]


if __name__ == "__main__":
    install(Path(os.environ["JOBBROKER_TEST_FAULTS"]))
    sys.exit(main())
