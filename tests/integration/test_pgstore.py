"""What the PostgreSQL store does beyond the contract it shares with SQLite (tests/unit/test_store.py):
schema version, a lost connection, passwords, settings, and errors that say what is wrong."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobbroker.broker.config import BrokerConfig
from jobbroker.broker.errors import ConfigError, StorageError
from jobbroker.broker.store import SESSION_BLOCK, TOKEN_BLOCK, FsyncMode, IdCeilings, WriteBatch

from tests.postgres import PASSWORD, PostgresServer

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[postgresql]')")
from jobbroker.broker.pgstore import SCHEMA_VERSION, PostgresStore, redact_url  # noqa: E402

WALL = 1_800_000_000.0


def test_a_url_shows_its_password_masked() -> None:
    assert redact_url("postgresql://me:s3cret@db:5432/jobs") == "postgresql://me:***@db:5432/jobs"
    assert redact_url("postgresql://me@db/jobs?password=s3cret&sslmode=require") == (
        "postgresql://me@db/jobs?password=***&sslmode=require"
    )
    assert redact_url("postgresql://db/jobs") == "postgresql://db/jobs"


def test_only_a_postgresql_url_is_taken() -> None:
    with pytest.raises(ConfigError, match="not a postgresql://"):
        PostgresStore("mysql://me:s3cret@db/jobs")
    with pytest.raises(ConfigError) as caught:
        PostgresStore("sqlite:///tmp/x?password=s3cret")
    assert "s3cret" not in str(caught.value)


def test_the_schema_is_created_once_and_versioned(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    second = PostgresStore(pg_url)  # finds it, migrates nothing
    second.close()
    with psycopg.connect(pg_url) as conn:
        version = conn.execute("SELECT value FROM jobbroker_meta WHERE name = 'schema'").fetchone()
        leader = conn.execute("SELECT epoch, address FROM jobbroker_leader").fetchall()
    assert version == (SCHEMA_VERSION,) and leader == [(0, None)]


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE jobbroker_meta SET value = %s WHERE name = 'schema'", (SCHEMA_VERSION + 1,))
    with pytest.raises(StorageError, match=f"schema version {SCHEMA_VERSION + 1}, written by a newer jobbroker"):
        PostgresStore(pg_url)


def test_a_lost_connection_fails_the_write_retryably_and_the_next_one_connects_again(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    store.load(0.0, WALL)
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'jobbroker'")
    with pytest.raises(StorageError) as caught:  # retryable: not StorageFailed
        store.write(WriteBatch(ceilings=IdCeilings(5 * TOKEN_BLOCK, 5 * SESSION_BLOCK)), 7)
    assert type(caught.value) is StorageError and PASSWORD not in str(caught.value)
    store.write(WriteBatch(ceilings=IdCeilings(5 * TOKEN_BLOCK, 5 * SESSION_BLOCK)), 7)
    store.close()
    reopened = PostgresStore(pg_url)
    recovered = reopened.load(0.0, WALL)
    reopened.close()
    assert (recovered.next_job_id, recovered.next_token) == (7, 5 * TOKEN_BLOCK)


def test_ceilings_and_the_next_job_id_only_rise(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    store.write(WriteBatch(ceilings=IdCeilings(9 * TOKEN_BLOCK, 9 * SESSION_BLOCK)), 50)
    store.write(WriteBatch(ceilings=IdCeilings(3 * TOKEN_BLOCK, 3 * SESSION_BLOCK)), 40)  # a stale replay
    recovered = store.load(0.0, WALL)
    store.close()
    assert (recovered.next_job_id, recovered.next_token, recovered.next_session) == (
        50,
        9 * TOKEN_BLOCK,
        9 * SESSION_BLOCK,
    )


def test_fsync_modes_set_synchronous_commit(pg_url: str) -> None:
    for mode, expected in ((FsyncMode.ALWAYS, "on"), (FsyncMode.INTERVAL, "off"), (FsyncMode.NEVER, "off")):
        store = PostgresStore(pg_url, mode)
        conn = store._connect()
        assert conn.execute("SHOW synchronous_commit").fetchone() == (expected,), mode
        store.close()


def test_the_password_comes_from_a_file_or_pgpassfile(
    postgres: PostgresServer, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = pg_url.replace(f":{PASSWORD}@", "@")
    password_file = tmp_path / "pw"
    password_file.write_text(PASSWORD + "\n")
    PostgresStore(bare, password_file=password_file).close()
    with pytest.raises(ConfigError, match="both in the --store URL and in --store-password-file"):
        PostgresStore(pg_url, password_file=password_file)
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:{postgres.port}:*:jobbroker:{PASSWORD}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    PostgresStore(bare).close()


def test_a_wrong_password_or_database_or_address_is_a_clear_error(
    postgres: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    wrong = f"postgresql://jobbroker:not-{PASSWORD}@127.0.0.1:{postgres.port}/postgres"
    with pytest.raises(
        StorageError, match=r"cannot connect to PostgreSQL at .*password authentication failed"
    ) as caught:
        PostgresStore(wrong)
    assert PASSWORD not in str(caught.value) and "***" in str(caught.value)
    with pytest.raises(StorageError, match='database "no_such_db" does not exist'):
        PostgresStore(postgres.url("no_such_db"))
    with pytest.raises(StorageError, match=re.escape("cannot connect to PostgreSQL at postgresql://jobbroker:***@")):
        PostgresStore(f"postgresql://jobbroker:{PASSWORD}@127.0.0.1:1/postgres?connect_timeout=2")


def test_a_database_with_a_meta_table_not_ours_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE jobbroker_meta (name text PRIMARY KEY, value bigint NOT NULL)")
    with pytest.raises(StorageError, match="not a jobbroker database"):
        PostgresStore(pg_url)


def test_the_store_setting_comes_from_a_flag_the_environment_or_the_config_file(tmp_path: Path) -> None:
    from jobbroker.cli import parse_args

    config = tmp_path / "jobbroker.toml"
    config.write_text('store = "postgresql://file@db/jobs"\nstore_password_file = "/etc/pw"\n')
    from_file = parse_args(["serve", "--config", str(config)], {})
    assert (from_file.store, from_file.store_password_file) == ("postgresql://file@db/jobs", "/etc/pw")
    from_environment = parse_args(["serve", "--config", str(config)], {"JOBBROKER_STORE": "postgresql://env@db/j"})
    assert from_environment.store == "postgresql://env@db/j"
    from_flag = parse_args(["serve", "--store", "postgresql://flag@db/j"], {"JOBBROKER_STORE": "postgresql://e@db/j"})
    assert from_flag.store == "postgresql://flag@db/j"
    config = BrokerConfig.load(config, {})
    assert (config.store_url, config.store_password_file, config.data_dir) == (
        "postgresql://file@db/jobs",
        Path("/etc/pw"),
        None,
    )
    assert "file@db" not in repr(config)  # a URL may hold a password
