"""The broker's commands of `jobbroker` (composed with the client side's in jobbroker/cli.py):
`serve` runs the daemon with the settings broker/config.py layers, `recover` salvages a damaged
data directory."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, Protocol

from jobbroker.broker import config as settings
from jobbroker.broker.access import default_credentials, load_credentials
from jobbroker.broker.config import BrokerConfig, default_store_dir, is_loopback
from jobbroker.broker.errors import ConfigError
from jobbroker.broker.protocol.credentials import (
    Credential,
    default_secret_path,
    ensure_secret_file,
    resolve_secret,
)

__all__ = ["AddCommand", "add_commands", "serve_defaults"]

log = logging.getLogger("jobbroker")


class AddCommand(Protocol):
    """Adds a subcommand to `jobbroker` (with the flags every command has) and returns its
    parser; jobbroker/cli.py hands one to each side."""

    def __call__(
        self,
        name: str,
        run: Callable[[argparse.Namespace], int],
        help_text: str,
        *,
        description: str | None = None,
        secret_file: bool = True,
    ) -> argparse.ArgumentParser: ...


def add_commands(command: AddCommand) -> argparse.ArgumentParser:
    """Add serve and recover; returns serve's parser (whose defaults serve_defaults() gives)."""
    serve = command("serve", _serve, "run the broker daemon")
    serve.add_argument("--config", help="TOML file of settings (after flags and JOBBROKER_* variables)")
    settings.add_flags(serve)

    command(
        "recover",
        _recover,
        "salvage every readable job of a damaged data directory into a fresh database",
        description="Salvage every readable job of a damaged data directory (a corrupt row or page, a "
        "write-ahead log lost after a crash) into a fresh database; report what was dropped. The old "
        "files are kept in DATA_DIR/damaged-<time>/. The broker must not be running.",
        secret_file=False,
    ).add_argument("--data-dir", default=None, help=f"the data directory (default {default_store_dir()})")
    return serve


def serve_defaults(argv: list[str], environ: Mapping[str, str]) -> dict[str, Any]:
    """`serve`'s settings from the environment, the config file (--config in `argv`, else
    $JOBBROKER_CONFIG) and the defaults: the parser's defaults, so that flags win.

    Raises:
        ConfigError: an unreadable config file, an unknown setting, or a bad value.
    """
    located = argparse.ArgumentParser(add_help=False)
    located.add_argument("--config")
    layered = settings.layered_settings(located.parse_known_args(argv)[0].config, environ)
    known = settings.known_variables()
    for name in layered.unknown_variables:  # a typo would go unnoticed
        print(f"jobbroker: ignoring ${name}: no such setting{settings.did_you_mean(name, known)}", file=sys.stderr)
    return layered.values


def _run(coroutine: Coroutine[Any, Any, Any], *, use_uvloop: bool = True) -> Any:
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(coroutine)
    return asyncio.run(coroutine)


def _announce(message: str) -> None:
    """A line that shows whatever the log level (scripts wait for it), in the log's format."""
    record = logging.LogRecord("jobbroker", logging.INFO, __file__, 0, message, None, None)
    handlers = logging.getLogger().handlers
    print(handlers[0].format(record) if handlers else message, file=sys.stderr, flush=True)


def _serve(args: argparse.Namespace) -> int:
    if args.credentials:
        credentials = load_credentials(args.credentials)
        log.info(
            "credentials from %s: %s", args.credentials, ", ".join(f"{c.name} ({c.role})" for c in credentials.values())
        )
    else:
        credentials = default_credentials(_broker_secret(args.secret_file, args.environ))
    config = settings.config_from_settings(vars(args), args.environ)
    config.tls_context()  # a bad certificate stops us here, before anything listens
    _raise_open_file_limit()
    if not is_loopback(config.host) and config.tls_cert is None:
        log.warning(
            "listening on %s without TLS: traffic is authenticated but readable; see docs/security.md", config.host
        )
    _run(_serve_until_signal(config, credentials, args.grace), use_uvloop=not args.no_uvloop)
    return 0


def _recover(args: argparse.Namespace) -> int:
    from jobbroker.broker.store import recover

    report = recover(Path(args.data_dir or default_store_dir(args.environ)))
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


def _broker_secret(secret_file: str | None, environ: Mapping[str, str]) -> bytes:
    """--secret-file (created if missing), else $JOBBROKER_SECRET_FILE / $JOBBROKER_SECRET,
    else the default file, generated on first start."""
    if secret_file is None:
        with contextlib.suppress(ConfigError):
            secret = resolve_secret(environ=environ)
            log.info("using the secret from the environment or the default secret file")
            return secret
    secret, path, created = ensure_secret_file(secret_file or default_secret_path(environ))
    if created:
        log.info(
            "generated a new secret in %s (readable by its owner only); clients on this machine find it there", path
        )
    else:
        log.info("secret: %s", path)
    return secret


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
