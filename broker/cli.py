"""The `jobbroker` command: serve, recover, worker, submit, stats and the rest.

Exit status (README, "Command line"): 0 success; 1 a job failed (dead or cancelled); 2 bad
usage or configuration, or the broker could not start; 3 the broker could not be reached; 4
the broker refused (authentication, role, a bad request); 5 timed out; 130 interrupted. A
closed output pipe ends the command quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib
import json
import logging
import os
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from jobbroker.broker.access import default_credentials, load_credentials
from jobbroker.broker.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    BrokerConfig,
    default_store_dir,
    ensure_secret_file,
    is_loopback,
)
from jobbroker.broker.core.scheduler import SchedulerConfig
from jobbroker.broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigError,
    ConnectionClosed,
    JobbrokerError,
    JobError,
    ProtocolError,
    ResultTimeout,
    StorageError,
    UsageError,
)
from jobbroker.broker.protocol.auth import Credential, default_data_dir, resolve_secret
from jobbroker.broker.protocol.framing import DEFAULT_MAX_FRAME_SIZE
from jobbroker.broker.store import FsyncMode

__all__ = ["main"]

log = logging.getLogger("jobbroker")

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4
EXIT_TIMED_OUT = 5
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"jobbroker: {exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter() if args.log_format == "json" else logging.Formatter(_TEXT_LOG_FORMAT))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    status: int | None
    message: str | None
    try:
        status, message = int(args.run(args) or 0), None
    except BrokenPipeError:
        # The reader went away (`jobbroker stats --json | head -1`): stop quietly, and keep
        # Python from complaining when it flushes stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        status, message = exit_status(exc)
        if status is None:
            raise
    if message:
        print(f"jobbroker: {message}", file=sys.stderr)
    return status or 0


def exit_status(exc: BaseException) -> tuple[int | None, str]:
    """The exit status and the message for an exception that ended a command (None: a bug,
    let it show its traceback)."""
    if isinstance(exc, ConfigError | StorageError | UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, AuthenticationFailed) or (
        isinstance(exc, ConnectionClosed) and isinstance(exc.cause, AuthenticationFailed)
    ):
        return EXIT_REFUSED, f"the broker refused our credentials ({exc}); check the secret or --credential"
    if isinstance(exc, ResultTimeout | TimeoutError):
        return EXIT_TIMED_OUT, str(exc) or "timed out"
    if isinstance(exc, ConnectionClosed | ProtocolError):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, BrokerError):
        return EXIT_REFUSED, f"the broker refused: {exc}"
    if isinstance(exc, JobError):
        return EXIT_JOB_FAILED, str(exc)
    if isinstance(exc, JobbrokerError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, OSError):
        return EXIT_UNREACHABLE, f"cannot reach the broker: {exc.strerror or exc}"
    return None, ""


_TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, and the
    exception when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _announce(message: str) -> None:
    """A line that shows whatever the log level (scripts wait for it), in the log's format."""
    record = logging.LogRecord("jobbroker", logging.INFO, __file__, 0, message, None, None)
    handlers = logging.getLogger().handlers
    print(handlers[0].format(record) if handlers else message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line, with `serve`'s settings taken, in this order, from its flags, from
    JOBBROKER_<FLAG> environment variables (JOBBROKER_MAX_PENDING for --max-pending), from
    the TOML file named by --config or $JOBBROKER_CONFIG (max_pending = 1000), then defaults.

    Raises:
        ConfigError: an unreadable config file, an unknown setting, or a bad value.
    """
    environ = os.environ if environ is None else environ
    parser, serve = _parser()
    argv = list(argv)
    if argv[:1] == ["serve"]:
        serve.set_defaults(**_serve_settings(serve, argv[1:], environ))
    return parser.parse_args(argv)


def _serve_settings(serve: argparse.ArgumentParser, argv: list[str], environ: Mapping[str, str]) -> dict[str, Any]:
    options = {a.dest: a for a in serve._actions if a.option_strings and a.dest not in ("help", "config")}
    located = argparse.ArgumentParser(add_help=False)
    located.add_argument("--config")
    config_path = located.parse_known_args(argv)[0].config or environ.get("JOBBROKER_CONFIG")
    settings: dict[str, tuple[Any, str]] = {}  # dest -> (value, where it came from)
    if config_path:
        try:
            table = tomllib.loads(Path(config_path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_path}: {exc}") from exc
        for key, value in table.items():
            dest = key.replace("-", "_")
            if dest == "queues":  # [queues.NAME] tables: queue controls set at every start
                settings[dest] = (_queue_tables(value, config_path), config_path)
                continue
            if dest == "schedules":  # [schedules.NAME] tables: periodic jobs set at every start
                settings[dest] = (_schedule_tables(value, config_path), config_path)
                continue
            if dest not in options:
                raise ConfigError(f"{config_path}: unknown setting {key!r}{_did_you_mean(dest, options)}")
            settings[dest] = (value, f"{config_path}: {key}")
    for dest in options:
        name = f"JOBBROKER_{dest.upper()}"
        if environ.get(name) and dest not in ("secret_file",):  # $JOBBROKER_SECRET_FILE: resolve_secret's
            settings[dest] = (environ[name], f"${name}")
    known = {f"JOBBROKER_{dest.upper()}" for dest in options} | _OTHER_VARIABLES
    for name in environ:
        if name.startswith("JOBBROKER_") and name not in known:  # a typo would go unnoticed
            print(f"jobbroker: ignoring ${name}: no such setting{_did_you_mean(name, known)}", file=sys.stderr)
    return {
        dest: value if dest in ("queues", "schedules") else _setting(options[dest], value, source)
        for dest, (value, source) in settings.items()
    }


_QUEUE_SETTINGS = ("paused", "concurrency", "rate")
# The JOBBROKER_* variables that are not `serve` settings (README, "Command line"): clients'
# and the tests'.
_OTHER_VARIABLES = frozenset(
    {
        "JOBBROKER_CONFIG",
        "JOBBROKER_CONNECT",
        "JOBBROKER_CREDENTIAL",
        "JOBBROKER_SECRET",
        "JOBBROKER_TLS_CA",
        "JOBBROKER_TEST_TIME_UNIT",
        "JOBBROKER_REQUIRE_BROWSER",
        "JOBBROKER_REQUIRE_POSTGRES",
        "JOBBROKER_TEST_FAULTS",
    }
)


def _queue_tables(tables: Any, source: str) -> dict[str, dict[str, Any]]:
    """The config file's [queues.NAME] tables, checked: paused (bool), concurrency (jobs held
    at once, 0: none), rate (deliveries a second, or "20/s")."""
    if not isinstance(tables, dict):
        raise ConfigError(f"{source}: queues is a table of [queues.NAME] tables")
    checked: dict[str, dict[str, Any]] = {}
    from jobbroker.broker.core.scheduler import check_queue_name
    from jobbroker.broker.errors import InvalidRequest

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
                raise ConfigError(f"{source}: unknown queue setting {key!r}{_did_you_mean(key, _QUEUE_SETTINGS)}")
            if key == "paused" and not isinstance(value, bool):
                raise ConfigError(f"{where}: {value!r} is not true or false")
            if key == "concurrency" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{where}: {value!r} is not a number of jobs (0: no limit)")
            settings[key] = parse_rate(value, where) if key == "rate" else value
        checked[name] = settings
    return checked


def _schedule_tables(tables: Any, source: str) -> dict[str, dict[str, Any]]:
    """The config file's [schedules.NAME] tables, checked as the broker will check them."""
    from jobbroker.broker.core.schedules import schedule_from_settings
    from jobbroker.broker.errors import InvalidRequest

    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{source}: schedules is a table of [schedules.NAME] tables")
    from jobbroker.broker.core.scheduler import check_queue_name

    for name, table in tables.items():
        try:
            schedule_from_settings(name, table).check()
            check_queue_name(table["queue"])
        except (InvalidRequest, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: [schedules.{name}]: {exc}") from None
    return tables


def parse_rate(value: Any, where: str = "--rate") -> float:
    """A rate limit: a number of deliveries a second, or "20/s" (0: no limit)."""
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


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _setting(action: argparse.Action, value: Any, source: str) -> Any:
    """A value from the environment or the config file, checked as the flag would be; an
    error names where the value came from and the flag it stands for."""
    flag = f"{source} (for {action.option_strings[0]})"
    if isinstance(action, argparse._StoreTrueAction):
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{flag}: {value!r} is not true or false")
    if callable(action.type):
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{flag}: {value!r} is not a valid value") from None
    elif not isinstance(value, str):
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{flag}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="jobbroker", description="A job broker for Python.")
    parser.add_argument("--version", action="version", version=f"jobbroker {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(run=run)
        sub.add_argument(
            "--secret-file", help="file holding the shared secret (its content without the trailing newline)"
        )
        sub.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(info)")
        sub.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object a line")
        return sub

    serve = command("serve", _serve, "run the broker daemon")
    serve.add_argument("--config", help="TOML file of settings (after flags and JOBBROKER_* variables)")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 picks one)")
    serve.add_argument("--heartbeat", type=float, default=5.0, help="heartbeat interval, seconds (default 5)")
    serve.add_argument(
        "--lease", type=float, default=30.0, help="kept for compatibility: leases follow the worker session (30)"
    )
    serve.add_argument("--max-attempts", type=int, default=3, help="default deliveries before a job is dead (3)")
    serve.add_argument("--result-ttl", type=float, default=300.0, help="seconds results are kept (300)")
    serve.add_argument(
        "--max-result-ttl", type=float, default=7 * 86400.0, help="the longest result TTL a job may ask for (a week)"
    )
    serve.add_argument("--max-pending", type=int, default=1_000_000, help="waiting jobs per queue (1000000)")
    serve.add_argument("--max-frame-size", type=int, default=DEFAULT_MAX_FRAME_SIZE, help="bytes (16 MiB)")
    serve.add_argument("--handshake-timeout", type=float, default=5.0, help="seconds to authenticate (5)")
    serve.add_argument("--data-dir", default=None, help=f"where jobs are kept (default {default_store_dir()})")
    serve.add_argument("--memory", action="store_true", help="keep jobs in memory only: lost when the broker stops")
    serve.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="keep jobs in PostgreSQL instead of --data-dir: postgresql://USER@HOST:PORT/DB",
    )
    serve.add_argument(
        "--store-password-file", default=None, help="file holding the --store password (else the URL's or PGPASSFILE)"
    )
    serve.add_argument(
        "--fsync",
        default="always",
        choices=[m.value for m in FsyncMode],
        help="always: fsync each group commit before acknowledging (default); interval: at most 1 s later; never",
    )
    serve.add_argument("--credentials", default=None, help="credentials file (TOML): names, roles, secret files")
    serve.add_argument("--tls-cert", default=None, help="PEM certificate (chain): speak TLS only")
    serve.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    serve.add_argument("--max-connections", type=int, default=10_000, help="connections at once (10000)")
    serve.add_argument(
        "--max-handshakes-per-ip", type=int, default=128, help="unauthenticated connections per address (128)"
    )
    serve.add_argument("--max-payload-size", type=int, default=1024 * 1024, help="bytes per payload (1 MiB)")
    serve.add_argument("--max-result-size", type=int, default=1024 * 1024, help="bytes per result (1 MiB)")
    serve.add_argument("--max-queues", type=int, default=10_000, help="queues at most (10000)")
    serve.add_argument("--max-write-buffer", type=int, default=64 * 1024 * 1024, help="bytes queued to a peer (64 MiB)")
    serve.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus /metrics and the dashboard on this port"
    )
    serve.add_argument(
        "--metrics-host", default=DEFAULT_HOST, help=f"address for /metrics and the dashboard (default {DEFAULT_HOST})"
    )
    serve.add_argument(
        "--metrics-token-file",
        default=None,
        help="token for the metrics port (dashboard login, Bearer for /metrics); off loopback one is generated "
        "beside the secret unless given",
    )
    serve.add_argument("--grace", type=float, default=10.0, help="on SIGTERM: seconds for jobs in flight (10)")
    serve.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")

    recover = commands.add_parser(
        "recover",
        help="salvage every readable job of a damaged data directory into a fresh database",
        description="Salvage every readable job of a damaged data directory (a corrupt row or page, a "
        "write-ahead log lost after a crash) into a fresh database; report what was dropped. The old "
        "files are kept in DATA_DIR/damaged-<time>/. The broker must not be running.",
    )
    recover.set_defaults(run=_recover)
    recover.add_argument("--data-dir", default=None, help=f"the data directory (default {default_store_dir()})")
    recover.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(info)")
    recover.add_argument("--log-format", default="text", choices=["text", "json"], help="json: one object a line")

    from jobbroker.client.connection import default_address

    default_connect = default_address()

    def client_command(name: str, run: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        sub = command(name, run, help_text)
        sub.add_argument(
            "--connect",
            default=default_connect,
            help=f"broker HOST:PORT ($JOBBROKER_CONNECT, else 127.0.0.1:$JOBBROKER_PORT; now {default_connect})",
        )
        sub.add_argument(
            "--credential", default=None, help="credential name (default $JOBBROKER_CREDENTIAL, else default)"
        )
        sub.add_argument("--tls-ca", default=None, help="CA file: speak TLS, verify the broker against it")
        sub.add_argument(
            "--wait-for-broker",
            action="store_true",
            help="keep trying to reach a broker that is not up yet (else fail at once)",
        )
        return sub

    worker = client_command("worker", _worker, "run a worker on a handler")
    worker.add_argument(
        "handler", help="module:function to run on each job's payload, or a module (or module:task) of @task functions"
    )
    worker.add_argument(
        "--queue", action="append", default=None, help="queue to take jobs from (repeatable; tasks: their queues)"
    )
    worker.add_argument("--concurrency", type=int, default=16, help="jobs run at once (16)")
    worker.add_argument("--prefetch", type=int, default=None, help="jobs held at once (2 x concurrency)")
    worker.add_argument("--executor", default="thread", choices=["thread", "process", "inline"])
    worker.add_argument("--name", default=None, help="name shown in stats (default host:pid)")
    worker.add_argument("--grace", type=float, default=30.0, help="seconds to finish running jobs on stop (30)")
    worker.add_argument(
        "--timeout", type=float, default=None, help="seconds an attempt may run, for jobs without a limit (none)"
    )
    worker.add_argument(
        "--hand-back-after",
        type=float,
        default=10.0,
        help="hand buffered jobs back when every slot has been busy this many seconds (10)",
    )

    submit = client_command("submit", _submit, "submit jobs")
    submit.add_argument("queue")
    submit.add_argument("payloads", nargs="*", help="payloads, as JSON where they parse, else strings")
    submit.add_argument("--file", help="JSON lines: one payload a line ('-': standard input)")
    submit.add_argument("--priority", type=int, default=0)
    submit.add_argument("--delay", type=float, default=0.0)
    submit.add_argument("--max-attempts", type=int, default=None)
    submit.add_argument("--job-timeout", type=float, default=None, help="seconds each attempt may run (no limit)")
    submit.add_argument("--result-ttl", type=float, default=None, help="seconds the results are kept (the broker's)")
    submit.add_argument("--wait", action="store_true", help="wait for the results and print them")
    submit.add_argument("--timeout", type=float, default=None, help="with --wait: seconds to wait")

    stats = client_command("stats", _stats, "show queues and workers")
    stats.add_argument("--json", action="store_true", help="print JSON")

    top = client_command("top", _top, "a live view of queues and workers, until Ctrl-C")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (1)")
    top.add_argument("--iterations", type=int, default=None, help="stop after this many refreshes")

    dead = client_command("dead", _dead, "list, requeue or purge a queue's dead jobs")
    dead.add_argument("action", choices=["list", "requeue", "purge"])
    dead.add_argument("queue")
    dead.add_argument("job_ids", nargs="*", type=int, help="only these jobs (requeue, purge)")
    dead.add_argument("--limit", type=int, default=100, help="list: at most this many (100)")
    dead.add_argument("--json", action="store_true", help="list: print JSON")

    drain = client_command("drain", _drain, "stop the broker delivering jobs; running ones finish")
    drain.add_argument("--resume", action="store_true", help="deliver again")
    drain.add_argument("--wait", action="store_true", help="wait until no job is in flight")
    drain.add_argument("--timeout", type=float, default=None, help="with --wait: seconds at most")

    job = client_command("job", _job, "show one job, or list a queue's jobs in one state")
    job.add_argument("action", choices=["show", "list"])
    job.add_argument("target", help="show: a job id; list: a queue")
    job.add_argument(
        "--state", default="pending", choices=["pending", "waiting", "delayed", "running", "dead"], help="list"
    )
    job.add_argument("--after", type=int, default=0, help="list: jobs after this id (the last of the previous page)")
    job.add_argument("--limit", type=int, default=100, help="list: at most this many (100, at most 1000)")
    job.add_argument("--json", action="store_true", help="list: print JSON")

    cancel = client_command("cancel", _cancel, "cancel jobs (running ones too: their workers are told)")
    cancel.add_argument("job_ids", nargs="+", type=int)

    queue = client_command(
        "queue", _queue, "list queues, show one, purge its waiting jobs, pause or resume it, set its limits"
    )
    queue.add_argument("action", choices=["list", "show", "purge", "pause", "resume", "set"])
    queue.add_argument("queue", nargs="?", help="the queue (all but list)")
    queue.add_argument("--json", action="store_true", help="list, show: print JSON")
    queue.add_argument("--concurrency", type=int, default=None, help="set: jobs held by workers at once (0: no limit)")
    queue.add_argument("--rate", default=None, help="set: deliveries a second, like 20 or 20/s (0: no limit)")
    schedule = client_command("schedule", _schedule, "add, list or remove periodic jobs kept by the broker")
    schedule.add_argument("action", choices=["add", "list", "remove"])
    schedule.add_argument("name", nargs="?", help="add, remove: the schedule's name")
    schedule.add_argument("queue", nargs="?", help="add: the queue its jobs go to")
    schedule.add_argument("payload", nargs="?", default=None, help="add: the payload, as JSON where it parses")
    schedule.add_argument("--cron", default=None, help='add: 5 fields, like "*/5 * * * *"')
    schedule.add_argument("--every", type=float, default=None, help="add: an interval in seconds, instead of --cron")
    schedule.add_argument("--tz", default="UTC", help="add: the time zone of --cron (UTC)")
    schedule.add_argument(
        "--no-catch-up", action="store_true", help="add: skip a tick missed while the broker was down"
    )
    schedule.add_argument("--json", action="store_true", help="list: print JSON")
    return parser, serve


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("jobbroker")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(source tree)"


def _run(coroutine: Coroutine[Any, Any, Any], *, use_uvloop: bool = True) -> Any:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coroutine)
    return asyncio.run(coroutine)


# --- serve ----------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    if args.credentials:
        credentials = load_credentials(args.credentials)
        log.info(
            "credentials from %s: %s", args.credentials, ", ".join(f"{c.name} ({c.role})" for c in credentials.values())
        )
    else:
        credentials = default_credentials(_broker_secret(args.secret_file))
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    _raise_open_file_limit()
    if sum(map(bool, (args.memory, args.data_dir, args.store))) > 1:
        raise ConfigError("--memory, --data-dir and --store exclude each other")
    config = BrokerConfig(
        data_dir=None if args.memory or args.store else Path(args.data_dir or default_store_dir()),
        store_url=args.store,
        store_password_file=Path(args.store_password_file) if args.store_password_file else None,
        fsync=FsyncMode(args.fsync),
        host=args.host,
        port=args.port,
        max_frame_size=args.max_frame_size,
        max_connections=args.max_connections,
        max_handshakes_per_ip=args.max_handshakes_per_ip,
        max_payload_size=args.max_payload_size,
        max_result_size=args.max_result_size,
        max_write_buffer=args.max_write_buffer,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        metrics_token=_metrics_token(args.metrics_token_file, args.metrics_port, args.metrics_host),
        queues=getattr(args, "queues", {}),
        schedules=getattr(args, "schedules", {}),
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        handshake_timeout=args.handshake_timeout,
        scheduler=SchedulerConfig(
            heartbeat=args.heartbeat,
            default_lease=args.lease,
            default_max_attempts=args.max_attempts,
            result_ttl=args.result_ttl,
            max_result_ttl=args.max_result_ttl,
            max_pending_per_queue=args.max_pending,
            max_queues=args.max_queues,
        ),
    )
    config.tls_context()  # a bad certificate stops us here, before anything listens
    if not is_loopback(args.host) and not args.tls_cert:
        log.warning(
            "listening on %s without TLS: traffic is authenticated but readable; see docs/security.md", args.host
        )
    _run(_serve_until_signal(config, credentials, args.grace), use_uvloop=not args.no_uvloop)
    return 0


def _recover(args: argparse.Namespace) -> int:
    from jobbroker.broker.store import recover

    report = recover(Path(args.data_dir or default_store_dir()))
    print(report.describe())
    return 0


def _raise_open_file_limit() -> None:
    """Each connection is a file descriptor; the usual soft limit (1024) is far below what a
    broker with many workers needs, and the hard limit is ours to take."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _broker_secret(secret_file: str | None) -> bytes:
    """--secret-file (created if missing), else $JOBBROKER_SECRET_FILE / $JOBBROKER_SECRET,
    else the default file, generated on first start."""
    if secret_file is None:
        with contextlib.suppress(ConfigError):
            secret = resolve_secret()
            log.info("using the secret from the environment or the default secret file")
            return secret
    secret, path, created = ensure_secret_file(secret_file)
    if created:
        log.info(
            "generated a new secret in %s (readable by its owner only); clients on this machine find it there", path
        )
    else:
        log.info("secret: %s", path)
    return secret


def _metrics_token(token_file: str | None, port: int | None, host: str) -> bytes | None:
    """The metrics port's token: from --metrics-token-file (created if missing); off loopback
    without one, from metrics-token beside the default secret, generated on first use."""
    if token_file is None and (port is None or is_loopback(host)):
        return None
    token, path, created = ensure_secret_file(token_file or default_data_dir() / "metrics-token")
    log.info("metrics port token: %s%s", path, " (generated)" if created else "")
    return token


async def _serve_until_signal(config: BrokerConfig, credentials: Mapping[str, Credential], grace: float) -> None:
    from jobbroker.broker.server import Broker

    loop = asyncio.get_running_loop()
    broker = Broker(config, credentials=credentials)
    try:
        await broker.start()
    except OSError as exc:  # a start fault (exit 2), not a broker we could not reach
        reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {reason}") from exc
    _announce(f"jobbroker listening on {config.host}:{broker.port}")
    stopping: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        # The first signal drains for up to `grace` seconds; a second one closes at once.
        if stopping:
            broker.close()
        else:
            stopping.append(loop.create_task(broker.shutdown(grace)))

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(signum, on_signal)
        except (NotImplementedError, RuntimeError):  # Windows
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(on_signal))
    await broker.wait_closed()


# --- client-side commands -------------------------------------------------------------------


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"secret_file": args.secret_file, "credential": args.credential, "tls": args.tls_ca}


def _load_handler(spec: str) -> Any:
    """A handler (module:function), a task (module:task) or every task of a module (module)."""
    module_name, sep, function_name = spec.partition(":")
    if "" not in sys.path:
        sys.path.insert(0, "")  # the current directory, as `python -m` does
    if not sep and module_name:
        from jobbroker.client.tasks import tasks_of_module

        try:
            return tasks_of_module(module_name)
        except UsageError as exc:
            raise ConfigError(f"{exc} (give module:function for a plain handler)") from exc
    if not sep or not module_name or not function_name:
        raise ConfigError(f"handler {spec!r} is not module:function (or a module of @task functions)")
    try:
        module = importlib.import_module(module_name)
        handler = getattr(module, function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load handler {spec!r}: {exc}") from exc
    if not callable(handler):
        raise ConfigError(f"handler {spec!r} is not callable")
    return handler


def _worker(args: argparse.Namespace) -> int:
    import socket

    from jobbroker.client.tasks import Task
    from jobbroker.client.worker import Worker

    loaded = _load_handler(args.handler)
    tasks = loaded if isinstance(loaded, list) else [loaded] if isinstance(loaded, Task) else None
    if tasks is None and not args.queue:
        raise ConfigError("a worker on a plain handler needs --queue (tasks know their queues)")
    worker = Worker(
        args.connect,
        queues=args.queue,
        handler=None if tasks is not None else loaded,
        tasks=tasks,
        **_client_options(args),
        concurrency=args.concurrency,
        prefetch=args.prefetch,
        executor=args.executor,
        name=args.name or f"{socket.gethostname()}:{os.getpid()}",
        grace=args.grace,
        handle_signals=True,
        timeout=args.timeout,
        hand_back_after=args.hand_back_after,
        wait_for_broker=args.wait_for_broker,
    )
    log.info("worker on %s taking from %s", args.connect, ", ".join(worker.queues))
    _run(worker.run())
    log.info("worker stopped: %d completed, %d failed", worker.completed, worker.failed)
    _exit_past_abandoned_threads()
    return 0


def _exit_past_abandoned_threads() -> None:
    """Handler threads abandoned at their time limit run on, and Python would wait for them
    at exit: a stopped worker exits without them (after a moment for those about to end)."""
    import threading

    deadline = time.monotonic() + 1.0
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and thread.name.startswith("jobbroker-worker"):
            thread.join(max(0.0, deadline - time.monotonic()))
    running = [t for t in threading.enumerate() if t.name.startswith("jobbroker-worker") and t.is_alive()]
    if running:
        log.warning(
            "%d handler threads still running (abandoned at their time limit); exiting without them", len(running)
        )
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _parse_payload(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


_SUBMIT_BATCH = 1000


def _submit(args: argparse.Namespace) -> int:
    payloads = [_parse_payload(p) for p in args.payloads]
    if args.file:
        payloads += _read_json_lines(args.file)
    if not payloads:
        raise ConfigError("nothing to submit: give payloads or --file")
    from jobbroker.client.progress import show_progress

    long_submit = len(payloads) > _SUBMIT_BATCH

    async def go(client: Any) -> int:
        ids: list[int] = []
        for start in range(0, len(payloads), _SUBMIT_BATCH):
            ids += await client.submit_many(
                args.queue,
                payloads[start : start + _SUBMIT_BATCH],
                priority=args.priority,
                delay=args.delay,
                max_attempts=args.max_attempts,
                timeout=args.job_timeout,
                result_ttl=args.result_ttl,
            )
            if long_submit:
                show_progress("submitted", len(ids), len(payloads))
        await _warn_if_unserved(client, args.queue)
        if not args.wait:
            print("\n".join(map(str, ids)))
            return EXIT_OK
        outcomes = await asyncio.gather(*(client.result(i, timeout=args.timeout) for i in ids), return_exceptions=True)
        status = EXIT_OK
        for job_id, payload, outcome in zip(ids, payloads, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                code, reason = exit_status(outcome)
                if code is None:
                    raise outcome
                status = max(status, code)
                shown = f"error: {reason}"
            else:
                shown = json.dumps(outcome, default=repr)
            print(f"{job_id}\t{json.dumps(payload)}\t{shown}")
        return status

    return int(_with_client(args, go))


async def _warn_if_unserved(client: Any, queue: str) -> None:
    """Say so when no worker takes from the queue, and which served queue looks meant (a
    typo creates a queue of its own). An admin can tell; others cannot."""
    try:
        workers = (await client.stats())["workers"]
    except BrokerError:
        return
    served = {name for worker in workers for name in worker["queues"]}
    if queue not in served:
        print(f"jobbroker: no worker serves queue {queue!r} yet{_did_you_mean(queue, served)}", file=sys.stderr)


def _read_json_lines(path: str) -> list[Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    payloads = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                payloads.append(json.loads(line))
            except ValueError as exc:
                raise ConfigError(f"{path}, line {number}: not JSON ({exc})") from None
    return payloads


def _stats(args: argparse.Namespace) -> int:
    info = _with_client(args, lambda c: c.stats())
    if args.json:
        print(json.dumps(info, indent=2, default=repr))
    else:
        print(format_stats(info))
    return 0


def _with_client(args: argparse.Namespace, call: Callable[[Any], Coroutine[Any, Any, Any]]) -> Any:
    from jobbroker.client.client import Client

    async def go() -> Any:
        options = _client_options(args)
        async with Client(args.connect, name="cli", wait_for_broker=args.wait_for_broker, **options) as client:
            return await call(client)

    return _run(go())


def _dead(args: argparse.Namespace) -> int:
    ids = args.job_ids or None
    if args.action == "list":
        jobs = _with_client(args, lambda c: c.dead_letters(args.queue, args.limit))
        if args.json:
            print(json.dumps(jobs, indent=2, default=repr))
        elif not jobs:
            print(f"(no dead jobs in {args.queue})")
        else:
            rows = [
                [j["id"], j["attempts"], (j["error"] or {}).get("type", ""), (j["error"] or {}).get("message", "")]
                for j in jobs
            ]
            print("\n".join(_table(["job", "attempts", "error", "message"], rows)))
    elif args.action == "requeue":
        print(f"requeued {_with_client(args, lambda c: c.requeue_dead(args.queue, ids))}")
    else:
        print(f"purged {_with_client(args, lambda c: c.purge_dead(args.queue, ids))}")
    return 0


def _top(args: argparse.Namespace) -> int:
    interactive = sys.stdout.isatty()

    async def go(client: Any) -> None:
        shown = 0
        while args.iterations is None or shown < args.iterations:
            info = await client.stats()
            screen = format_stats(info)
            if interactive:
                print("\x1b[H\x1b[2J", end="")  # home, clear: redraw in place
            stamp = time.strftime("%H:%M:%S")
            print(f"jobbroker at {args.connect}, {stamp}{'  (draining)' if info.get('draining') else ''}")
            print(screen, flush=True)
            shown += 1
            if args.iterations is None or shown < args.iterations:
                await asyncio.sleep(args.interval)

    with contextlib.suppress(KeyboardInterrupt):
        _with_client(args, go)
    return 0


def _drain(args: argparse.Namespace) -> int:
    async def go(client: Any) -> int:
        in_flight = int(await client.drain(not args.resume))
        if args.wait and not args.resume:
            try:
                async with asyncio.timeout(args.timeout):
                    while in_flight:
                        await asyncio.sleep(0.2)
                        in_flight = sum(q["in_flight"] for q in (await client.stats())["queues"].values())
            except TimeoutError:
                raise TimeoutError(
                    f"deliveries stopped, but {in_flight} jobs were still in flight after {args.timeout:g} s"
                ) from None
        return in_flight

    in_flight = _with_client(args, go)
    print(f"deliveries {'resumed' if args.resume else 'stopped'}; {in_flight} jobs in flight")
    return 0


def _job(args: argparse.Namespace) -> int:
    if args.action == "list":
        jobs = _with_client(args, lambda c: c.jobs(args.target, args.state, after=args.after, limit=args.limit))
        if args.json:
            print(json.dumps(jobs, indent=2))
        elif not jobs:
            print(f"(no {args.state} jobs in {args.target}{f' after {args.after}' if args.after else ''})")
        else:
            rows = [
                [j["id"], j["priority"], f"{j['attempts']}/{j['max_attempts']}", _error_text(j["error"])] for j in jobs
            ]
            print("\n".join(_table(["job", "priority", "attempts", "last error"], rows)))
            if len(jobs) == args.limit:
                print(f"(more: --after {jobs[-1]['id']})")
        return EXIT_OK
    try:
        job_id = int(args.target)
    except ValueError:
        raise ConfigError(f"job show takes a job id, not {args.target!r}") from None
    info = _with_client(args, lambda c: c.job(job_id))
    width = max(map(len, info))
    for name, value in info.items():
        if name == "error" and isinstance(value, dict):
            print(f"{name:{width}}  {value.get('type')}: {value.get('message')}")
            for line in str(value.get("traceback") or "").rstrip().splitlines():
                print(f"{'':{width}}    {line}")
        elif name == "payload" and value is None and info.get("state") == "done":
            print(f"{name:{width}}  (not kept once the job is done)")
        elif name == "worker" and value is not None:
            print(f"{name:{width}}  {info.get('worker_name') or 'worker'}, session {value}")
        elif name != "worker_name":
            print(f"{name:{width}}  {json.dumps(value, default=repr)}")
    return 0


def _error_text(error: dict[str, Any] | None) -> str:
    return "" if not error else f"{error.get('type')}: {error.get('message')}"


def _cancel(args: argparse.Namespace) -> int:
    refused = _with_client(args, lambda c: c.cancel_many(args.job_ids))
    reasons = {"not_found": "no such job (or its result expired)", "invalid_state": "it has ended already"}
    for job_id in args.job_ids:
        if job_id in refused:
            reason = reasons.get(refused[job_id], refused[job_id])
            print(f"jobbroker: job {job_id} not cancelled: {reason}", file=sys.stderr)
        else:
            print(f"job {job_id}: cancelled")
    return EXIT_REFUSED if refused else EXIT_OK


def _queue(args: argparse.Namespace) -> int:
    if args.action != "list" and not args.queue:
        raise ConfigError(f"queue {args.action} needs a queue name")
    if args.action == "purge":
        purged = _with_client(args, lambda c: c.purge_queue(args.queue))
        print(f"cancelled {purged} waiting jobs of {args.queue}")
        return EXIT_OK
    if args.action in ("pause", "resume", "set"):
        if args.action == "set" and args.concurrency is None and args.rate is None:
            raise ConfigError("queue set takes --concurrency N and/or --rate R")
        rate = None if args.rate is None else parse_rate(args.rate)
        settings = _with_client(
            args,
            lambda c: (
                c.pause(args.queue)
                if args.action == "pause"
                else c.resume(args.queue)
                if args.action == "resume"
                else c.set_queue(args.queue, concurrency=args.concurrency, rate=rate)
            ),
        )
        print(f"queue {args.queue}: {_controls_text(settings)}")
        return EXIT_OK
    queues = _with_client(args, lambda c: c.stats())["queues"]
    if args.action == "list":
        shown: Any = sorted(queues)
        print(json.dumps(shown) if args.json else "\n".join(shown) or "(no queues)")
        return EXIT_OK
    if args.queue not in queues:
        known = ", ".join(sorted(queues)) or "none"
        raise ConfigError(f"no queue named {args.queue!r} (queues: {known})")
    if args.json:
        print(json.dumps(queues[args.queue], indent=2))
    else:
        for name, value in queues[args.queue].items():
            print(f"{name:22} {value}")
    return EXIT_OK


def _schedule(args: argparse.Namespace) -> int:
    if args.action == "list":
        schedules = _with_client(args, lambda c: c.schedules())
        if args.json:
            print(json.dumps(schedules, indent=2))
        elif not schedules:
            print("(no schedules)")
        else:
            rows = [
                [s["name"], s["queue"], s["cron"] or f"every {s['every']:g} s", s["tz"], _when(s["next_tick"])]
                for s in schedules
            ]
            print("\n".join(_table(["schedule", "queue", "when", "tz", "next tick"], rows)))
        return EXIT_OK
    if not args.name:
        raise ConfigError(f"schedule {args.action} needs a name")
    if args.action == "remove":
        removed = _with_client(args, lambda c: c.unschedule(args.name))
        print(f"schedule {args.name}: {'removed' if removed else 'there was none'}")
        return EXIT_OK if removed else EXIT_REFUSED
    if not args.queue or (args.cron is None) == (args.every is None):
        raise ConfigError("schedule add takes NAME QUEUE [PAYLOAD] and one of --cron or --every")
    payload = None if args.payload is None else _parse_payload(args.payload)
    record = _with_client(
        args,
        lambda c: c.schedule(
            args.name, args.queue, payload, cron=args.cron, every=args.every, tz=args.tz, catch_up=not args.no_catch_up
        ),
    )
    print(f"schedule {args.name}: next tick {_when(record['next_tick'])}")
    return EXIT_OK


def _when(unix_time: float) -> str:
    return datetime.datetime.fromtimestamp(unix_time, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _controls_text(settings: Mapping[str, Any]) -> str:
    parts = ["paused" if settings.get("paused") else "delivering"]
    if settings.get("concurrency") is not None:
        parts.append(f"at most {settings['concurrency']} held at once")
    if settings.get("rate") is not None:
        parts.append(f"at most {settings['rate']:g} a second")
    return ", ".join(parts)


def _controls_brief(queue: Mapping[str, Any]) -> str:
    """A queue's controls in a stats column: "paused", "max 2", "20/s" ("-": none)."""
    parts = ["paused"] if queue.get("paused") else []
    if queue.get("concurrency") is not None:
        parts.append(f"max {queue['concurrency']}")
    if queue.get("rate") is not None:
        parts.append(f"{queue['rate']:g}/s")
    return " ".join(parts) or "-"


def format_stats(info: dict[str, Any]) -> str:
    """Stats as readable tables: queues, workers, then running jobs that report progress."""
    from jobbroker.client.progress import progress_bar

    columns = [
        "queue",
        "pending",
        "waiting",
        "delayed",
        "in_flight",
        "dead",
        "done",
        "failed",
        "done/s",
        "workers",
        "controls",
    ]
    rows = [
        [
            name,
            q["pending"],
            q.get("waiting", 0),
            q["delayed"],
            q["in_flight"],
            q["dead"],
            q["done"],
            q["failed"],
            q["done_per_second"],
            q["workers"],
            _controls_brief(q),
        ]
        for name, q in sorted(info["queues"].items())
    ]
    lines = _table(columns, rows) if rows else ["(no queues)"]
    worker_rows = [
        [
            w["session"],
            w["name"],
            w["peer"],
            ",".join(w["queues"]),
            len(w["in_flight"]),
            f"{w['last_heartbeat_age']:.1f}s",
        ]
        for w in info["workers"]
    ]
    lines.append("")
    if worker_rows:
        lines += _table(["session", "worker", "peer", "queues", "in_flight", "last_seen"], worker_rows)
    else:
        lines.append("(no workers)")
    progress_rows = [
        [
            job["id"],
            job["queue"],
            w["session"],
            f"{progress_bar(job['progress']['fraction'], 20)} {job['progress']['fraction']:4.0%}",
            job["progress"]["message"],
            f"{job['running_seconds']:.1f}s",
        ]
        for w in info["workers"]
        for job in w.get("running", ())
        if job["progress"] is not None
    ]
    if progress_rows:
        lines.append("")
        lines += _table(["job", "queue", "session", "progress", "message", "running"], progress_rows)
    return "\n".join(lines)


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [columns] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
