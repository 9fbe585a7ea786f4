"""Fixtures shared by the unit and the integration tests: the tests' own PostgreSQL server."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from tests.postgres import PostgresServer, find_binaries

_databases = itertools.count(1)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (tests/postgres.py); skipped, saying why, when its
    binaries or the driver are missing, unless $JOBBROKER_REQUIRE_POSTGRES is set (CI)."""
    binaries = find_binaries()
    missing = None
    if binaries is None:
        missing = "PostgreSQL's initdb and pg_ctl are not installed (apt-get install postgresql)"
    else:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            missing = "psycopg is not installed (pip install -e '.[postgresql]')"
    if missing is not None or binaries is None:
        if os.environ.get("JOBBROKER_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL is required here: {missing}")
        pytest.skip(missing or "")
    server = PostgresServer(binaries)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """The URL (with its password) of a new, empty database of the session's server."""
    return postgres.create_database(f"test_{os.getpid()}_{next(_databases)}")
