"""Who may do what: credentials and their roles, the credentials file, and the throttle that
slows repeated authentication failures from one address.

Roles (docs/security.md):
    producer  submit, watch results of, inspect and cancel the jobs it submitted
    worker    reserve jobs, complete, fail, touch and release them
    admin     everything, including stats of everything and the dead-letter lists
"""

from __future__ import annotations

import enum
import os
import tomllib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from jobbroker.broker.errors import ConfigError
from jobbroker.broker.protocol.credentials import (
    DEFAULT_CREDENTIAL,
    MAX_SECRETS_PER_CREDENTIAL,
    Credential,
    load_secret_file,
)
from jobbroker.broker.protocol.messages import (
    Cancel,
    Complete,
    DeadList,
    DeadPurge,
    DeadRequeue,
    Drain,
    Fail,
    JobInfo,
    JobList,
    Progress,
    QueuePurge,
    QueueSet,
    Release,
    Reserve,
    ScheduleList,
    ScheduleRemove,
    ScheduleSet,
    Started,
    Stats,
    Submit,
    Touch,
    Watch,
)

__all__ = ["PERMISSIONS", "AuthThrottle", "Role", "WarningLimiter", "default_credentials", "load_credentials"]


class Role(enum.StrEnum):
    PRODUCER = "producer"
    WORKER = "worker"
    ADMIN = "admin"


_PRODUCER_OPS = frozenset({Submit.op, Watch.op, Cancel.op, JobInfo.op, JobList.op})
# `started` is a notice (no reply), allowed like the requests of the same role.
_WORKER_OPS = frozenset({Reserve.op, Complete.op, Fail.op, Touch.op, Release.op, Progress.op, Started.op})
_ADMIN_OPS = (
    _PRODUCER_OPS
    | _WORKER_OPS
    | {Stats.op, DeadList.op, DeadRequeue.op, DeadPurge.op, Drain.op, QueuePurge.op, QueueSet.op}
    | {ScheduleSet.op, ScheduleRemove.op, ScheduleList.op}
)

# The requests each role may make; anything else is answered `forbidden`.
PERMISSIONS: Mapping[str, frozenset[str]] = {
    Role.PRODUCER: _PRODUCER_OPS,
    Role.WORKER: _WORKER_OPS,
    Role.ADMIN: _ADMIN_OPS,
}


def default_credentials(secret: bytes) -> dict[str, Credential]:
    """One admin credential named "default": a broker run with a single secret file."""
    return {DEFAULT_CREDENTIAL: Credential(DEFAULT_CREDENTIAL, Role.ADMIN, (secret,))}


def load_credentials(path: str | os.PathLike[str]) -> dict[str, Credential]:
    """Read a credentials file (TOML), one table per name:

        [reporting-app]
        role = "producer"
        secret_files = ["reporting.secret", "reporting-next.secret"]  # two while rotating

    Relative secret file paths are taken from the credentials file's directory.

    Raises:
        ConfigError: the file, a role, or a secret file is unusable.
    """
    source = Path(path)
    try:
        tables = tomllib.loads(source.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read credentials file {source}: {exc}") from exc
    credentials: dict[str, Credential] = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name!r} must be a table with role and secret_files")
        role = table.get("role")
        if role not in PERMISSIONS:
            raise ConfigError(f"{source}: {name!r} has role {role!r}; roles are {', '.join(PERMISSIONS)}")
        files = table.get("secret_files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise ConfigError(f"{source}: {name!r} needs secret_files, a list of file names")
        if len(files) > MAX_SECRETS_PER_CREDENTIAL:
            raise ConfigError(f"{source}: {name!r} has more than {MAX_SECRETS_PER_CREDENTIAL} secrets")
        secrets = tuple(load_secret_file(source.parent / f) for f in files)
        credentials[name] = Credential(name, str(role), secrets)
    if not credentials:
        raise ConfigError(f"credentials file {source} names no credential")
    return credentials


class AuthThrottle:
    """Slows down an address that keeps failing to authenticate: after its n-th failure in a
    row, its next connections wait base * 2**(n-1) seconds (at most `cap`) before the broker
    reads them. Forgets an address after `forget_after` quiet seconds; remembers at most
    `max_addresses`, so that a spray of addresses cannot grow it without bound."""

    def __init__(
        self, base: float = 0.1, cap: float = 5.0, forget_after: float = 60.0, max_addresses: int = 10_000
    ) -> None:
        self.base, self.cap, self.forget_after, self.max_addresses = base, cap, forget_after, max_addresses
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # address -> (count, last)

    def failed(self, address: str, now: float) -> None:
        count, last = self._failures.pop(address, (0, now))
        if now - last > self.forget_after:
            count = 0
        self._failures[address] = (count + 1, now)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def succeeded(self, address: str) -> None:
        self._failures.pop(address, None)

    def delay(self, address: str, now: float) -> float:
        entry = self._failures.get(address)
        if entry is None or now - entry[1] > self.forget_after:
            return 0.0
        return min(self.cap, self.base * 2 ** (entry[0] - 1))


class WarningLimiter:
    """One log line per source and kind per `interval` seconds, however many events: a peer
    that fails a thousand handshakes a second makes one line, and the next line says how many
    the silence hid. Pure: the caller logs, and passes `now`. Remembers at most `max_sources`
    sources (the oldest are dropped, with their counts)."""

    def __init__(self, interval: float = 10.0, max_sources: int = 10_000) -> None:
        self.interval, self.max_sources = interval, max_sources
        self._sources: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # -> [line at, hidden]

    def hit(self, kind: str, source: str, now: float) -> int:
        """An event. Returns 0 to stay silent, else how many events the line to log stands for
        (this one and those hidden since the last line)."""
        key = (kind, source)
        entry = self._sources.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return 0
        hidden = 0 if entry is None else int(entry[1])
        self._sources.pop(key, None)
        self._sources[key] = [now, 0]
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        return 1 + hidden

    def flush(self, now: float) -> list[tuple[str, str, int]]:
        """(kind, source, count) of the events hidden by sources whose interval has ended;
        forgets the sources quiet for a whole interval. Call it now and then (a timer)."""
        due: list[tuple[str, str, int]] = []
        for key, entry in list(self._sources.items()):
            if now - entry[0] < self.interval:
                continue
            if entry[1]:
                due.append((key[0], key[1], int(entry[1])))
                entry[0], entry[1] = now, 0
            else:
                del self._sources[key]
        return due
