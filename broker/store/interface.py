"""Durability behind one small interface: load() once at start, write() batches of changed
jobs, close(). The job core stays in memory and pure; the server serialises the jobs a loop
turn changed (rows.serialize()) and hands them to a writer thread, and sends the turn's replies
only once write() has returned (group commit: one transaction, one fsync, per turn).

The stores: MemoryStore here (no persistence), SqliteStore (store/sqlite.py) and PostgresStore
(broker/pgstore.py); open_store() picks the one a config names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from jobbroker.broker.config import BrokerConfig
from jobbroker.broker.core.controls import QueueControls
from jobbroker.broker.core.jobs import Job
from jobbroker.broker.errors import ConfigError

if TYPE_CHECKING:
    from jobbroker.broker.store.rows import WriteBatch

__all__ = ["SESSION_BLOCK", "TOKEN_BLOCK", "IdCeilings", "MemoryStore", "Recovered", "Store", "open_store"]

# Lease tokens and session ids are not written with any row, so the store keeps a ceiling for
# each, raised a block ahead of use: after any restart, a crash included, counting starts at the
# stored ceiling, above every id handed out before (docs/protocol.md, "Durability").
TOKEN_BLOCK = 1 << 32
SESSION_BLOCK = 1 << 20


@dataclass(slots=True)
class IdCeilings:
    """Lease tokens and session ids below these may be handed out: they are stored."""

    token: int = TOKEN_BLOCK
    session: int = SESSION_BLOCK


@dataclass(slots=True)
class Recovered:
    jobs: list[Job]
    next_job_id: int
    next_token: int = 1
    next_session: int = 1
    ceilings: IdCeilings = field(default_factory=IdCeilings)
    controls: dict[str, QueueControls] = field(default_factory=dict)  # queue name -> what is set
    schedules: list[dict[str, Any]] = field(default_factory=list)  # schedule records


class Store(Protocol):
    durable: bool

    def load(self, now: float, wall: float) -> Recovered:
        """Every job stored, in id order, with times converted to the scheduler's clock."""
        ...

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        """Persist one batch atomically, with the id ceilings in `batch.ceilings`. Runs in the
        writer thread.

        Raises:
            StorageFailed: an I/O error other than a full disk: the broker must stop.
            StorageError: nothing of the batch is stored (disk full): it may be written again.
        """
        ...

    def sync(self) -> None:
        """Make what write() stored survive a power loss (for FsyncMode.INTERVAL)."""
        ...

    def compact(self) -> None:
        """Give disk space that no live job needs back to the file system."""
        ...

    def close(self) -> None: ...


def open_store(config: BrokerConfig) -> Store:
    """The durable store a config names: PostgreSQL at config.store_url, else SQLite in
    config.data_dir.

    Raises:
        ConfigError: a store URL that cannot be used, or the PostgreSQL driver is missing.
        StorageError: the store cannot be opened.
    """
    if config.store_url is not None:
        try:
            from jobbroker.broker.pgstore import PostgresStore
        except ImportError as exc:
            raise ConfigError(
                f"the PostgreSQL store needs psycopg ({exc}): pip install 'jobbroker[postgresql]'"
            ) from None
        return PostgresStore(config.store_url, config.fsync, password_file=config.store_password_file)
    assert config.data_dir is not None, "a durable store needs data_dir or store_url"
    from jobbroker.broker.store.sqlite import SqliteStore  # it imports this module

    return SqliteStore(config.data_dir, config.fsync)


class MemoryStore:
    """No persistence: for tests, benchmarks and `--memory`."""

    durable = False

    def load(self, now: float, wall: float) -> Recovered:
        return Recovered([], 1, ceilings=IdCeilings(1 << 62, 1 << 62))

    def write(self, batch: WriteBatch, next_job_id: int) -> None:
        pass

    def sync(self) -> None:
        pass

    def compact(self) -> None:
        pass

    def close(self) -> None:
        pass
