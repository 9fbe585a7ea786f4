"""Authentication (docs/protocol.md, "Handshake" and "Frame MACs"): where the shared secret
comes from, the mutual HMAC-SHA256 challenge-response, and the per-frame MACs that follow.

The secret never crosses the wire. Each side sends a fresh 32-byte nonce; each proves it holds
the secret by an HMAC over the protocol version, the algorithm, its role and both nonces, so a
proof is useless on any other connection and the client cannot reflect the server's proof.
Both sides then derive one key per direction from the secret and both nonces and MAC every
frame over its sequence number and body.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from jobbroker.broker.errors import ConfigError, IntegrityError

__all__ = [
    "ALGORITHM",
    "DEFAULT_CREDENTIAL",
    "MAC_SIZE",
    "MAX_SECRETS_PER_CREDENTIAL",
    "MIN_SECRET_SIZE",
    "NONCE_SIZE",
    "PROTOCOL_VERSION",
    "Credential",
    "FrameSigner",
    "FrameVerifier",
    "client_proof",
    "default_data_dir",
    "default_secret_path",
    "derive_session_keys",
    "load_secret_file",
    "new_nonce",
    "proof_matches",
    "resolve_secret",
    "server_proof",
]

PROTOCOL_VERSION = 2  # 2: payloads and results are opaque bytes (docs/protocol.md)
ALGORITHM = "hmac-sha256"
NONCE_SIZE = 32
MAC_SIZE = 32
MIN_SECRET_SIZE = 16
DEFAULT_CREDENTIAL = "default"  # the name a client authenticates as unless told otherwise

_SEQUENCE = struct.Struct(">Q")
_PREFIX = f"jobbroker/{PROTOCOL_VERSION}|{ALGORITHM}|".encode()


@dataclass(frozen=True, slots=True)
class Credential:
    """A name the broker knows, its role, and its secrets (two or more while rotating).

    Roles are "producer", "worker" and "admin"; broker/access.py says what each may do.
    """

    name: str
    role: str
    secrets: tuple[bytes, ...]


MAX_SECRETS_PER_CREDENTIAL = 8


def new_nonce() -> bytes:
    """A fresh random nonce from the OS's CSPRNG."""
    return secrets.token_bytes(NONCE_SIZE)


def _mac(secret: bytes, label: bytes, name: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    encoded = name.encode()
    transcript = _PREFIX + label + b"|" + len(encoded).to_bytes(2, "big") + encoded + client_nonce + server_nonce
    return hmac.digest(secret, transcript, hashlib.sha256)


def server_proof(secret: bytes, name: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the broker sends to prove it holds the secret of credential `name`."""
    return _mac(secret, b"server-proof", name, client_nonce, server_nonce)


def client_proof(secret: bytes, name: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What the client sends to prove it holds the secret of credential `name`."""
    return _mac(secret, b"client-proof", name, client_nonce, server_nonce)


def proof_matches(expected: bytes, received: object) -> bool:
    """Constant-time comparison, after a type and length check."""
    return isinstance(received, bytes) and len(received) == MAC_SIZE and hmac.compare_digest(expected, received)


def derive_session_keys(secret: bytes, name: str, client_nonce: bytes, server_nonce: bytes) -> tuple[bytes, bytes]:
    """(client-to-broker key, broker-to-client key): one key per direction, so that a frame
    cannot be reflected back to its sender."""
    return (
        _mac(secret, b"key-client-to-broker", name, client_nonce, server_nonce),
        _mac(secret, b"key-broker-to-client", name, client_nonce, server_nonce),
    )


def _frame_mac(keyed: hmac.HMAC, sequence: int, body: bytes) -> bytes:
    mac = keyed.copy()
    mac.update(_SEQUENCE.pack(sequence))
    mac.update(body)
    return mac.digest()


class FrameSigner:
    """Appends HMAC-SHA256(key, seq || body) to each outgoing body; seq counts from 0."""

    __slots__ = ("_keyed", "_sequence")

    def __init__(self, key: bytes) -> None:
        # Keyed once; copy() per frame skips re-deriving the HMAC pads (about 30% faster).
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self._sequence = 0

    def sign(self, body: bytes) -> bytes:
        tag = _frame_mac(self._keyed, self._sequence, body)
        self._sequence += 1
        return body + tag


class FrameVerifier:
    """Checks and strips the MAC of each incoming frame, in order."""

    __slots__ = ("_keyed", "_sequence")

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self._sequence = 0

    def verify(self, payload: bytes) -> bytes:
        """Return the body.

        Raises:
            IntegrityError: the MAC is missing or wrong for this position in the stream.
        """
        if len(payload) < MAC_SIZE:
            raise IntegrityError(f"frame of {len(payload)} bytes is too short to carry a MAC")
        body = payload[:-MAC_SIZE]
        if not hmac.compare_digest(_frame_mac(self._keyed, self._sequence, body), payload[-MAC_SIZE:]):
            raise IntegrityError(f"MAC of frame {self._sequence} does not verify")
        self._sequence += 1
        return body


def default_data_dir() -> Path:
    """Where the broker keeps its secret and data unless told otherwise."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(base) / "jobbroker"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "jobbroker"


def default_secret_path() -> Path:
    return default_data_dir() / "secret"


def load_secret_file(path: str | os.PathLike[str]) -> bytes:
    """The file's content without its trailing newline.

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
    return _checked(secret, f"secret file {path}")


def _checked(secret: bytes, origin: str) -> bytes:
    if len(secret) < MIN_SECRET_SIZE:
        raise ConfigError(f"{origin} holds {len(secret)} bytes; a secret needs at least {MIN_SECRET_SIZE}")
    return secret


def resolve_secret(secret: bytes | str | None = None, secret_file: str | os.PathLike[str] | None = None) -> bytes:
    """The shared secret, from the first of: `secret`, `secret_file`, $JOBBROKER_SECRET_FILE,
    $JOBBROKER_SECRET, the default secret file.

    Raises:
        ConfigError: none of them gives a usable secret.
    """
    if secret is not None:
        return _checked(secret.encode() if isinstance(secret, str) else bytes(secret), "the given secret")
    if secret_file is not None:
        return load_secret_file(secret_file)
    env_file = os.environ.get("JOBBROKER_SECRET_FILE")
    if env_file:
        return load_secret_file(env_file)
    env_secret = os.environ.get("JOBBROKER_SECRET")
    if env_secret:
        return _checked(env_secret.encode(), "$JOBBROKER_SECRET")
    default = default_secret_path()
    if default.exists():
        return load_secret_file(default)
    raise ConfigError(
        f"no secret: pass --secret-file, set $JOBBROKER_SECRET_FILE or $JOBBROKER_SECRET, "
        f"or start the broker on this machine once so that it writes {default}"
    )
