"""The `jobbroker` command (and `python -m jobbroker`): one parser composed of the broker's
commands (serve, recover: broker/cli.py) and the client side's (worker, submit, stats and the
rest: client/cli.py), the logging setup, and the exit status of each outcome.

Exit status (README, "Command line"): 0 success; 1 a job failed (dead or cancelled); 2 bad
usage or configuration, or the broker could not start; 3 the broker could not be reached; 4
the broker refused (authentication, role, a bad request); 5 timed out; 130 interrupted. A
closed output pipe ends the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence

from jobbroker.broker import cli as broker_cli
from jobbroker.broker.config import SETTINGS
from jobbroker.broker.errors import ConfigError
from jobbroker.client import cli as client_cli
from jobbroker.client.cli import EXIT_INTERRUPTED, EXIT_OK, exit_status

__all__ = ["JsonLogFormatter", "main", "parse_args"]

_TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_COMMON = {setting.name: setting for setting in SETTINGS if setting.name in ("secret_file", "log_level", "log_format")}


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


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """The command line, with `serve`'s settings layered by broker/config.py: its flags, then
    JOBBROKER_<FLAG> environment variables (JOBBROKER_MAX_PENDING for --max-pending), then
    the TOML file named by --config or $JOBBROKER_CONFIG (max_pending = 1000), then defaults.

    Raises:
        ConfigError: an unreadable config file, an unknown setting, or a bad value.
    """
    environ = os.environ if environ is None else environ
    parser, serve = _parser()
    argv = list(argv)
    if argv[:1] == ["serve"]:
        serve.set_defaults(**broker_cli.serve_defaults(argv[1:], environ))
    parser.set_defaults(environ=environ)  # the commands' one view of the environment
    return parser.parse_args(argv)


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser, and its `serve` subparser (whose defaults parse_args() layers)."""
    parser = argparse.ArgumentParser(prog="jobbroker", description="A job broker for Python.")
    parser.add_argument("--version", action="version", version=f"jobbroker {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(
        name: str,
        run: Callable[[argparse.Namespace], int],
        help_text: str,
        *,
        description: str | None = None,
        secret_file: bool = True,
    ) -> argparse.ArgumentParser:
        # Every command logs, and every one that talks to a broker or is one takes a secret.
        sub = commands.add_parser(name, help=help_text, description=description or help_text)
        sub.set_defaults(run=run)
        for setting in _COMMON.values():
            if setting.name != "secret_file" or secret_file:
                sub.add_argument(
                    setting.flag, default=setting.default, choices=setting.choices, help=setting.help_text()
                )
        return sub

    serve = broker_cli.add_commands(command)
    client_cli.add_commands(command)
    return parser, serve


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("jobbroker")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "(source tree)"


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
