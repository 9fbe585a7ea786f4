"""The broker's configuration: one frozen object, built from flags by the CLI or directly by
an embedding program, and the secret file it generates on first start."""

from __future__ import annotations

import ipaddress
import os
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobbroker.broker.core.scheduler import SchedulerConfig
from jobbroker.broker.errors import ConfigError
from jobbroker.broker.protocol.auth import default_data_dir, default_secret_path, load_secret_file
from jobbroker.broker.protocol.framing import DEFAULT_MAX_FRAME_SIZE
from jobbroker.broker.store import FsyncMode

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "BrokerConfig", "default_store_dir", "ensure_secret_file"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """Everything the broker daemon needs to know.

    Args:
        host: address to listen on; loopback unless you mean to expose it.
        port: TCP port; 0 picks a free one (tests).
        max_frame_size: largest frame accepted, in bytes.
        handshake_timeout: seconds a new connection has to authenticate.
        max_write_buffer: bytes queued to a peer that does not read before it is cut off.
        scheduler: heartbeat, lease, retry and backpressure settings of the job core.
        data_dir: where jobs are kept (SQLite); None keeps them in memory only. The CLI
            defaults to a directory next to the secret.
        fsync: when group commits reach the disk (broker/store.py, FsyncMode).
        store_url: keep jobs in PostgreSQL there instead (`postgresql://USER@HOST:PORT/DB`,
            broker/pgstore.py); data_dir is then unused.
        store_password_file: the PostgreSQL password, if not in the URL or PGPASSFILE.
        max_connections: connections held at once; more are refused. A tenth of them are
            kept for authenticated connections.
        max_handshakes_per_ip: unauthenticated connections (handshakes in progress) from one
            address at once; a newer one closes the oldest.
        max_payload_size: bytes of one job's encoded payload.
        max_result_size: bytes of one job's encoded result; a larger one fails the job.
        tls_cert, tls_key: PEM files; with them the broker speaks TLS only.
        metrics_port, metrics_host: serve Prometheus /metrics and the dashboard there (off: None).
        metrics_token: required of every request to that port when set; needed off loopback.
        queues: queue controls set at every start (the config file's [queues.NAME] tables):
            name -> {"paused": bool, "concurrency": int, "rate": float}; changes made while
            the broker runs last until the next start.
        schedules: periodic jobs set at every start (the config file's [schedules.NAME]
            tables): name -> {"queue", "payload", "cron" or "every", "tz", "catch_up", submit
            options}; a stored schedule of the same name keeps its last tick.
    """

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    handshake_timeout: float = 5.0
    max_write_buffer: int = 64 * 1024 * 1024
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data_dir: Path | None = None
    fsync: FsyncMode = FsyncMode.ALWAYS
    store_url: str | None = field(default=None, repr=False)  # may hold a password
    store_password_file: Path | None = None
    max_connections: int = 10_000
    max_handshakes_per_ip: int = 128
    max_payload_size: int = 1024 * 1024
    max_result_size: int = 1024 * 1024
    tls_cert: Path | None = None
    tls_key: Path | None = None
    metrics_port: int | None = None
    metrics_host: str = DEFAULT_HOST
    metrics_token: bytes | None = field(default=None, repr=False)
    queues: dict[str, dict[str, Any]] = field(default_factory=dict)
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def tls_context(self) -> ssl.SSLContext | None:
        """The server's TLS context, or None without a certificate.

        Raises:
            ConfigError: the certificate or key cannot be loaded.
        """
        if self.tls_cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS certificate {self.tls_cert} / key {self.tls_key}: {exc}") from exc
        return context

    @property
    def heartbeat(self) -> float:
        return self.scheduler.heartbeat


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ensure_secret_file(path: str | os.PathLike[str] | None = None) -> tuple[bytes, Path, bool]:
    """Read the secret file, generating a random secret first if it does not exist.

    The file is created readable by its owner only (0600), in a directory only its owner can
    enter. Returns (secret, path, created).

    Raises:
        ConfigError: the file cannot be read or created, or holds a secret that is too short.
    """
    target = Path(path) if path is not None else default_secret_path()
    if target.exists():
        return load_secret_file(target), target, False
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        secret = secrets.token_urlsafe(32).encode()
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(secret + b"\n")
    except FileExistsError:  # another process created it between exists() and open()
        return load_secret_file(target), target, False
    except OSError as exc:
        raise ConfigError(f"cannot create secret file {target}: {exc.strerror or exc}") from exc
    return secret, target, True


def default_store_dir() -> Path:
    """Where the broker keeps its jobs unless told otherwise: next to the default secret."""
    return default_data_dir() / "data"
