"""The broker's settings, in one place: the frozen BrokerConfig, the table of `serve` settings
(flag, environment variable, config-file key, default, help), and their layering: a flag, then
its JOBBROKER_* variable, then the TOML config file, then the default.

Each default is written once: BrokerConfig's and SchedulerConfig's fields give those of the
settings that set a field; the table gives the rest (options of `jobbroker serve` itself). The
CLI builds its flags from the table (broker/cli.py); an embedding program loads the same
layers without it: `BrokerConfig.load(path=None, env=os.environ, overrides={})`.

This is the broker side's one reader of the environment (the client side's:
client/settings.py); secret files are protocol/credentials.py's.
"""

from __future__ import annotations

import argparse
import difflib
import enum
import ipaddress
import logging
import os
import ssl
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from jobbroker.broker.core.scheduler import SchedulerConfig
from jobbroker.broker.errors import ConfigError, InvalidRequest
from jobbroker.broker.protocol.credentials import default_data_dir, ensure_secret_file
from jobbroker.broker.protocol.framing import DEFAULT_MAX_FRAME_SIZE

__all__ = [
    "COMMON_SETTINGS",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "SETTINGS",
    "BrokerConfig",
    "FsyncMode",
    "Layered",
    "Setting",
    "add_flags",
    "config_from_settings",
    "default_store_dir",
    "did_you_mean",
    "is_loopback",
    "known_variables",
    "layered_settings",
    "metrics_token",
    "parse_rate",
]

log = logging.getLogger("jobbroker.broker")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7878


class FsyncMode(enum.StrEnum):
    """When group commits reach the disk (broker/store.py)."""

    ALWAYS = "always"  # fsync every group commit before acknowledging it
    INTERVAL = "interval"  # commit before acknowledging; fsync at most a second later
    NEVER = "never"  # commit before acknowledging; fsync left to the OS


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

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> BrokerConfig:
        """The configuration `jobbroker serve` would run with, without the command line:
        `overrides` (setting names as in the config file: {"port": 0}) stand for flags, then
        `env`'s JOBBROKER_* variables, then the TOML file at `path` (else $JOBBROKER_CONFIG),
        then the defaults. Jobs are kept in default_store_dir() unless `memory` or `data_dir`
        says otherwise.

        Args:
            path: the TOML config file; None: $JOBBROKER_CONFIG, else none.
            env: the environment (default os.environ).
            overrides: settings that win over every layer.

        Raises:
            ConfigError: an unreadable file, an unknown setting, or a bad value; the message
                names where the value came from.
        """
        env = os.environ if env is None else env
        layered = layered_settings(path, env)
        for name in layered.unknown_variables:
            log.warning("ignoring $%s: no such setting%s", name, did_you_mean(name, known_variables()))
        values = dict(layered.values)
        for name, value in (overrides or {}).items():
            values[name] = _checked_value(name, value, "overrides", "overrides")
        return config_from_settings(values, env)


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_store_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the broker keeps its jobs unless told otherwise: next to the default secret."""
    return default_data_dir(os.environ if environ is None else environ) / "data"


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """The hint an error message ends with: ' (did you mean 'x'?)', or ''."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --- the settings of `jobbroker serve` --------------------------------------------------------


class Setting(NamedTuple):
    """One `serve` setting: the flag --NAME-WITH-DASHES, the variable JOBBROKER_NAME, the
    config-file key NAME.

    Args:
        name: its name (also argparse's dest).
        help: the flag's help text, before "(default ...)".
        target: the BrokerConfig field it sets ("port", "scheduler.heartbeat"); None for an
            option of `serve` itself.
        kind: int, float, str or bool (a flag without a value).
        own_default: the default of a setting without a target (else the field's default).
        choices: the values allowed.
        shown_default: the default as help shows it, when the value does not say it well.
        from_environment: read from $JOBBROKER_NAME (not $JOBBROKER_SECRET_FILE: that one
            is the secret's, read by protocol/credentials.py for clients too).
    """

    name: str
    help: str
    target: str | None = None
    kind: type = str
    own_default: Any = None
    choices: tuple[str, ...] | None = None
    shown_default: str | None = None
    from_environment: bool = True

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def variable(self) -> str:
        return "JOBBROKER_" + self.name.upper()

    @property
    def default(self) -> Any:
        if self.target is None:
            return self.own_default
        owner: object = _DEFAULT_CONFIG
        for part in self.target.split("."):
            owner = getattr(owner, part)
        return owner.value if isinstance(owner, enum.Enum) else owner

    def help_text(self) -> str:
        """The help, with the default as the table or the dataclass gives it."""
        default = self.default
        if self.shown_default is not None:
            shown = self.shown_default
        elif default is None or isinstance(default, bool):
            return self.help
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        return f"{self.help} (default {shown})"


_DEFAULT_CONFIG = BrokerConfig()
_LOG_LEVELS = ("debug", "info", "warning", "error")

# Every setting of `jobbroker serve`, in the order of `jobbroker serve --help` and of README's
# table (tests/unit/test_cli_settings.py checks that each has its row there).
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "secret_file",
        "file holding the shared secret (its content without the trailing newline)",
        from_environment=False,
    ),
    Setting("log_level", "how much to log", own_default="info", choices=_LOG_LEVELS),
    Setting("log_format", "json: one object a line", own_default="text", choices=("text", "json")),
    Setting("host", "address to listen on", "host"),
    Setting("port", "port; 0 picks one", "port", int),
    Setting("heartbeat", "heartbeat interval, seconds", "scheduler.heartbeat", float),
    Setting("lease", "kept for compatibility: leases follow the worker session", "scheduler.default_lease", float),
    Setting("max_attempts", "default deliveries before a job is dead", "scheduler.default_max_attempts", int),
    Setting("result_ttl", "seconds results are kept", "scheduler.result_ttl", float),
    Setting(
        "max_result_ttl",
        "the longest result TTL a job may ask for",
        "scheduler.max_result_ttl",
        float,
        shown_default="a week",
    ),
    Setting("max_pending", "waiting jobs per queue", "scheduler.max_pending_per_queue", int),
    Setting("max_frame_size", "bytes", "max_frame_size", int, shown_default="16 MiB"),
    Setting("handshake_timeout", "seconds to authenticate", "handshake_timeout", float),
    Setting("data_dir", "where jobs are kept", "data_dir", shown_default="$XDG_DATA_HOME/jobbroker/data"),
    Setting("memory", "keep jobs in memory only: lost when the broker stops", kind=bool, own_default=False),
    Setting("store", "keep jobs in PostgreSQL instead of --data-dir: postgresql://USER@HOST:PORT/DB", "store_url"),
    Setting(
        "store_password_file",
        "file holding the --store password (else the URL's or PGPASSFILE)",
        "store_password_file",
    ),
    Setting(
        "fsync",
        "always: fsync each group commit before acknowledging; interval: at most 1 s later; never",
        "fsync",
        choices=tuple(m.value for m in FsyncMode),
    ),
    Setting("credentials", "credentials file (TOML): names, roles, secret files"),
    Setting("tls_cert", "PEM certificate (chain): speak TLS only", "tls_cert"),
    Setting("tls_key", "PEM private key of --tls-cert", "tls_key"),
    Setting("max_connections", "connections at once", "max_connections", int),
    Setting("max_handshakes_per_ip", "unauthenticated connections per address", "max_handshakes_per_ip", int),
    Setting("max_payload_size", "bytes per payload", "max_payload_size", int, shown_default="1 MiB"),
    Setting("max_result_size", "bytes per result", "max_result_size", int, shown_default="1 MiB"),
    Setting("max_queues", "queues at most", "scheduler.max_queues", int),
    Setting("max_write_buffer", "bytes queued to a peer", "max_write_buffer", int, shown_default="64 MiB"),
    Setting("metrics_port", "serve Prometheus /metrics and the dashboard on this port", "metrics_port", int),
    Setting("metrics_host", "address for /metrics and the dashboard", "metrics_host"),
    Setting(
        "metrics_token_file",
        "token for the metrics port (dashboard login, Bearer for /metrics); off loopback one is generated "
        "beside the secret unless given",
    ),
    Setting("grace", "on SIGTERM: seconds for jobs in flight", kind=float, own_default=10.0),
    Setting("no_uvloop", "use the default asyncio loop", kind=bool, own_default=False),
)
_BY_NAME = {setting.name: setting for setting in SETTINGS}
# Settings every command has (the CLI adds their flags to each); the rest are serve's alone.
COMMON_SETTINGS = ("secret_file", "log_level", "log_format")
# Config-file tables that are not single settings.
_TABLES = ("queues", "schedules")
# The JOBBROKER_* variables that are not `serve` settings (README, "Command line"): the
# config file's, the secret's, clients' and the tests'.
_OTHER_VARIABLES = frozenset(
    {
        "JOBBROKER_CONFIG",
        "JOBBROKER_SECRET_FILE",
        "JOBBROKER_SECRET",
        "JOBBROKER_CONNECT",
        "JOBBROKER_CREDENTIAL",
        "JOBBROKER_TLS_CA",
        "JOBBROKER_TEST_TIME_UNIT",
        "JOBBROKER_REQUIRE_BROWSER",
        "JOBBROKER_REQUIRE_POSTGRES",
        "JOBBROKER_TEST_FAULTS",
    }
)


def known_variables() -> frozenset[str]:
    """Every JOBBROKER_* variable jobbroker reads (README, "Command line")."""
    return frozenset(s.variable for s in SETTINGS if s.from_environment) | _OTHER_VARIABLES


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add the flags of the settings named (default: all but the common ones) to a parser,
    their defaults and help from the table."""
    for name in [s.name for s in SETTINGS if s.name not in COMMON_SETTINGS] if names is None else names:
        setting = _BY_NAME[name]
        if setting.kind is bool:
            parser.add_argument(setting.flag, action="store_true", default=setting.default, help=setting.help_text())
        else:
            parser.add_argument(
                setting.flag,
                type=setting.kind,
                default=setting.default,
                choices=setting.choices,
                help=setting.help_text(),
            )


class Layered(NamedTuple):
    """Settings from the environment, the config file and the defaults."""

    values: dict[str, Any]  # name -> value, every setting, plus the file's queues and schedules
    sources: dict[str, str]  # name -> where its value came from ("default" for a default)
    unknown_variables: list[str]  # JOBBROKER_* variables that name no setting (a typo?)


def layered_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Layered:
    """Every setting from, in this order, its JOBBROKER_<NAME> variable, the TOML file at
    `path` (else $JOBBROKER_CONFIG, else none), its default. Flags go on top (the CLI's).

    Raises:
        ConfigError: an unreadable config file, an unknown setting, or a bad value; the
            message names the file or variable it came from, and the flag it stands for.
    """
    values: dict[str, Any] = {s.name: s.default for s in SETTINGS}
    sources = dict.fromkeys(values, "default")
    config_path = os.fspath(path) if path is not None else environ.get("JOBBROKER_CONFIG")
    if config_path:
        try:
            table = tomllib.loads(Path(config_path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from exc
        for key, value in table.items():
            name = key.replace("-", "_")
            if name == "queues":  # [queues.NAME] tables: queue controls set at every start
                values[name], sources[name] = _queue_tables(value, config_path), config_path
            elif name == "schedules":  # [schedules.NAME] tables: periodic jobs set at every start
                values[name], sources[name] = _schedule_tables(value, config_path), config_path
            elif name not in _BY_NAME:
                raise ConfigError(f"{config_path}: unknown setting {key!r}{did_you_mean(name, _BY_NAME)}")
            else:
                sources[name] = f"{config_path}: {key}"
                values[name] = _checked_value(name, value, sources[name], config_path)
    for setting in SETTINGS:
        if setting.from_environment and environ.get(setting.variable):
            sources[setting.name] = f"${setting.variable}"
            values[setting.name] = _checked_value(setting.name, environ[setting.variable], sources[setting.name], "")
    known = known_variables()
    unknown = [name for name in environ if name.startswith("JOBBROKER_") and name not in known]
    return Layered(values, sources, unknown)


def _checked_value(name: str, value: Any, source: str, file: str) -> Any:
    """A value from the environment, the config file or overrides, checked as the flag would
    be; an error names where the value came from and the flag it stands for."""
    if name in _TABLES:
        return _queue_tables(value, file or source) if name == "queues" else _schedule_tables(value, file or source)
    setting = _BY_NAME.get(name)
    if setting is None:
        raise ConfigError(f"{source}: unknown setting {name!r}{did_you_mean(name, _BY_NAME)}")
    where = f"{source} (for {setting.flag})"
    if setting.kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: {value!r} is not true or false")
    if value is None:
        return None
    if setting.kind is not str:
        try:
            value = setting.kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {value!r} is not a valid value") from None
    elif not isinstance(value, str):
        value = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(setting.choices)}")
    return value


def config_from_settings(values: Mapping[str, Any], environ: Mapping[str, str]) -> BrokerConfig:
    """The BrokerConfig the settings make (as layered_settings() gives them, flags on top).

    Raises:
        ConfigError: settings that exclude each other, or an unusable metrics token file.
    """
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("--tls-cert and --tls-key go together")
    if sum(map(bool, (values["memory"], values["data_dir"], values["store"]))) > 1:
        raise ConfigError("--memory, --data-dir and --store exclude each other")
    top: dict[str, Any] = {}
    scheduler: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.target is not None:
            owner, _, field_name = setting.target.rpartition(".")
            (scheduler if owner == "scheduler" else top)[field_name] = values[setting.name]
    for name in ("tls_cert", "tls_key", "store_password_file"):
        top[name] = Path(top[name]) if top[name] else None
    stored_elsewhere = values["memory"] or values["store"]
    top["data_dir"] = None if stored_elsewhere else Path(values["data_dir"] or default_store_dir(environ))
    top["fsync"] = FsyncMode(top["fsync"])
    top["metrics_token"] = metrics_token(
        values["metrics_token_file"], values["metrics_port"], values["metrics_host"], environ
    )
    return BrokerConfig(
        **top,
        scheduler=SchedulerConfig(**scheduler),
        queues=dict(values.get("queues") or {}),
        schedules=dict(values.get("schedules") or {}),
    )


def metrics_token(
    token_file: str | os.PathLike[str] | None, port: int | None, host: str, environ: Mapping[str, str] | None = None
) -> bytes | None:
    """The metrics port's token: from `token_file` (created if missing); off loopback
    without one, from metrics-token beside the default secret, generated on first use."""
    if token_file is None and (port is None or is_loopback(host)):
        return None
    target = token_file or default_data_dir(os.environ if environ is None else environ) / "metrics-token"
    token, path, created = ensure_secret_file(target)
    log.info("metrics port token: %s%s", path, " (generated)" if created else "")
    return token


_QUEUE_SETTINGS = ("paused", "concurrency", "rate")


def _queue_tables(tables: Any, source: str) -> dict[str, dict[str, Any]]:
    """The config file's [queues.NAME] tables, checked: paused (bool), concurrency (jobs held
    at once, 0: none), rate (deliveries a second, or "20/s")."""
    from jobbroker.broker.core.scheduler import check_queue_name

    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: queues is a table of [queues.NAME] tables")
    checked: dict[str, dict[str, Any]] = {}
    for name, table in tables.items():
        try:
            check_queue_name(name)
        except InvalidRequest as exc:
            raise ConfigError(f"{source}: [queues.{name}]: {exc}") from None
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [queues.{name}] is a table of {', '.join(_QUEUE_SETTINGS)}")
        settings: dict[str, Any] = {}
        for key, value in table.items():
            where = f"{source}: queues.{name}.{key}"
            if key not in _QUEUE_SETTINGS:
                raise ConfigError(f"{source}: unknown queue setting {key!r}{did_you_mean(key, _QUEUE_SETTINGS)}")
            if key == "paused" and not isinstance(value, bool):
                raise ConfigError(f"{where}: {value!r} is not true or false")
            if key == "concurrency" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{where}: {value!r} is not a number of jobs (0: no limit)")
            settings[key] = parse_rate(value, where) if key == "rate" else value
        checked[name] = settings
    return checked


def _schedule_tables(tables: Any, source: str) -> dict[str, dict[str, Any]]:
    """The config file's [schedules.NAME] tables, checked as the broker will check them."""
    from jobbroker.broker.core.scheduler import check_queue_name
    from jobbroker.broker.core.schedules import schedule_from_settings

    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{source}: schedules is a table of [schedules.NAME] tables")
    for name, table in tables.items():
        try:
            schedule_from_settings(name, table).check()
            check_queue_name(table["queue"])
        except (InvalidRequest, TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{source}: [schedules.{name}]: {exc}") from None
    return tables


def parse_rate(value: Any, where: str = "--rate") -> float:
    """A rate limit: a number of deliveries a second, or "20/s" (0: no limit).

    Raises:
        ConfigError: not a rate, or out of range; the message names `where`.
    """
    text = str(value).strip()
    if text.endswith("/s"):
        text = text[:-2]
    try:
        rate = float(text)
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a rate (deliveries a second, like 20 or 20/s)") from None
    if not 0.0 <= rate <= 1_000_000.0:
        raise ConfigError(f"{where}: {value!r} is out of range (0 to 1000000 a second; 0: no limit)")
    return rate
