"""Where secrets live, shared by the broker and its clients: the data directory, secret files
(read, checked, created) and the credential records. Standard library only.

Nothing here reads the process environment itself: each side reads it in one place
(broker/config.py, client/settings.py) and passes the mapping in, so tests hand in a dict.
The variables read from it are documented in README, "Command line".
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from jobbroker.broker.errors import ConfigError

__all__ = [
    "DEFAULT_CREDENTIAL",
    "MAX_SECRETS_PER_CREDENTIAL",
    "MIN_SECRET_SIZE",
    "Credential",
    "check_secret",
    "default_data_dir",
    "default_secret_path",
    "ensure_secret_file",
    "load_secret_file",
    "resolve_secret",
]

DEFAULT_CREDENTIAL = "default"  # the name a client authenticates as unless told otherwise
MIN_SECRET_SIZE = 16
MAX_SECRETS_PER_CREDENTIAL = 8


@dataclass(frozen=True, slots=True)
class Credential:
    """A name the broker knows, its role, and its secrets (two or more while rotating).

    Roles are "producer", "worker" and "admin"; broker/access.py says what each may do.
    """

    name: str
    role: str
    secrets: tuple[bytes, ...]


def default_data_dir(environ: Mapping[str, str]) -> Path:
    """Where the broker keeps its secret and data unless told otherwise: $XDG_DATA_HOME (else
    ~/.local/share) /jobbroker; on Windows $LOCALAPPDATA/jobbroker."""
    if sys.platform == "win32":
        base = environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "jobbroker"
    base = environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "jobbroker"


def default_secret_path(environ: Mapping[str, str]) -> Path:
    """The secret file a broker writes on first start, and clients on the same machine read."""
    return default_data_dir(environ) / "secret"


def check_secret(secret: bytes, origin: str) -> bytes:
    """The secret, if long enough.

    Raises:
        ConfigError: shorter than MIN_SECRET_SIZE bytes; the message names `origin`.
    """
    if len(secret) < MIN_SECRET_SIZE:
        raise ConfigError(f"{origin} holds {len(secret)} bytes; a secret needs at least {MIN_SECRET_SIZE}")
    return secret


def load_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The file's content without its trailing newline (docs/protocol.md, "Handshake": these
    bytes are the key).

    Raises:
        ConfigError: the file cannot be read, can be read by others than its owner (POSIX),
            or holds a secret that is too short.
    """
    try:
        if os.name == "posix" and os.stat(path).st_mode & 0o077:
            # As ssh does with private keys: a secret others can read is no secret.
            raise ConfigError(f"secret file {path} is readable by others: chmod 600 {path}")
        secret = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise ConfigError(f"cannot read secret file {path}: {exc.strerror or exc}") from exc
    return check_secret(secret, f"secret file {path}")


def ensure_secret_file(path: str | os.PathLike[str]) -> tuple[bytes, Path, bool]:
    """Read the secret file, generating a random secret first if it does not exist.

    The file is created readable by its owner only (0600), in a directory only its owner can
    enter. Returns (secret, path, created).

    Raises:
        ConfigError: the file cannot be read or created, or holds a secret that is too short.
    """
    target = Path(path)
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


def resolve_secret(
    secret: bytes | str | None = None,
    secret_file: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str],
) -> bytes:
    """The shared secret, from the first of: `secret`, `secret_file`, $JOBBROKER_SECRET_FILE,
    $JOBBROKER_SECRET, the default secret file.

    Raises:
        ConfigError: none of them gives a usable secret.
    """
    if secret is not None:
        return check_secret(secret.encode() if isinstance(secret, str) else bytes(secret), "the given secret")
    if secret_file is not None:
        return load_secret_file(secret_file)
    env_file = environ.get("JOBBROKER_SECRET_FILE")
    if env_file:
        return load_secret_file(env_file)
    env_secret = environ.get("JOBBROKER_SECRET")
    if env_secret:
        return check_secret(env_secret.encode(), "$JOBBROKER_SECRET")
    default = default_secret_path(environ)
    if default.exists():
        return load_secret_file(default)
    raise ConfigError(
        f"no secret: pass --secret-file, set $JOBBROKER_SECRET_FILE or $JOBBROKER_SECRET, "
        f"or start the broker on this machine once so that it writes {default}"
    )
