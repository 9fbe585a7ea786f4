"""Durability, in three modules: interface.py (the Store interface, MemoryStore, open_store),
rows.py (the rows both durable stores write and read back) and sqlite.py (SqliteStore, its
commit file, recover). PostgreSQL's store is broker/pgstore.py. Every name is importable from
here: `from jobbroker.broker.store import SqliteStore, WriteBatch, serialize, recover`.
"""

from jobbroker.broker.config import FsyncMode  # re-exported: `from jobbroker.broker.store import FsyncMode`
from jobbroker.broker.store.interface import (
    SESSION_BLOCK,
    TOKEN_BLOCK,
    IdCeilings,
    MemoryStore,
    Recovered,
    Store,
    open_store,
)
from jobbroker.broker.store.rows import ControlsRow, Row, Update, WriteBatch, serialize
from jobbroker.broker.store.sqlite import COMMIT_FILE, SCHEMA_VERSION, RecoveryReport, SqliteStore, recover

__all__ = [
    "COMMIT_FILE",
    "SCHEMA_VERSION",
    "SESSION_BLOCK",
    "TOKEN_BLOCK",
    "ControlsRow",
    "FsyncMode",
    "IdCeilings",
    "MemoryStore",
    "Recovered",
    "RecoveryReport",
    "Row",
    "SqliteStore",
    "Store",
    "Update",
    "WriteBatch",
    "open_store",
    "recover",
    "serialize",
]
