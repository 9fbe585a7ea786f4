"""The client side's settings: where the broker is, which secret and credential to use, and
whether to speak TLS. The one place on the client side that reads the environment (README,
"Command line"); broker/protocol/credentials.py does the secret files.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from jobbroker.broker.errors import ConfigError
from jobbroker.broker.protocol.credentials import DEFAULT_CREDENTIAL, resolve_secret

__all__ = ["DEFAULT_ADDRESS", "ClientSettings", "client_tls", "default_address"]

DEFAULT_ADDRESS = "127.0.0.1:7878"


def default_address(environ: Mapping[str, str] | None = None) -> str:
    """$JOBBROKER_CONNECT (one address, or several separated by commas: parse_addresses());
    else the loopback on $JOBBROKER_PORT (where a broker started with
    that variable listens); else 127.0.0.1:7878."""
    environ = os.environ if environ is None else environ
    if environ.get("JOBBROKER_CONNECT"):
        return environ["JOBBROKER_CONNECT"]
    if environ.get("JOBBROKER_PORT"):
        return f"127.0.0.1:{environ['JOBBROKER_PORT']}"
    return DEFAULT_ADDRESS


def client_tls(tls: ssl.SSLContext | str | os.PathLike[str] | None) -> ssl.SSLContext | None:
    """A TLS context from what the caller gave: a context as is, or a CA file to verify the
    broker's certificate against, or None for plain TCP.

    Raises:
        ConfigError: the CA file cannot be loaded.
    """
    if tls is None or isinstance(tls, ssl.SSLContext):
        return tls
    try:
        return ssl.create_default_context(cafile=os.fspath(tls))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA file {tls}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """How a Client or Worker reaches the broker, every gap filled.

    Args:
        address: "HOST:PORT", several separated by commas, or a sequence of them.
        secret: the shared secret's bytes.
        credential: the credential name to authenticate as.
        tls: a client TLS context, or None for plain TCP.
    """

    address: str | Sequence[str]
    secret: bytes = field(repr=False)
    credential: str = DEFAULT_CREDENTIAL
    tls: ssl.SSLContext | None = None

    @classmethod
    def resolve(
        cls,
        address: str | Sequence[str] | None = None,
        *,
        secret: bytes | str | None = None,
        secret_file: str | os.PathLike[str] | None = None,
        credential: str | None = None,
        tls: ssl.SSLContext | str | os.PathLike[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ClientSettings:
        """The settings from a Client's or Worker's arguments, the environment filling the
        gaps: the address as default_address() finds it; the secret from `secret`,
        `secret_file`, $JOBBROKER_SECRET_FILE, $JOBBROKER_SECRET, then the default secret
        file; $JOBBROKER_CREDENTIAL (else "default"); $JOBBROKER_TLS_CA (else plain TCP).

        Raises:
            ConfigError: no usable secret, or an unusable CA file.
        """
        environ = os.environ if environ is None else environ
        return cls(
            address=address or default_address(environ),
            secret=resolve_secret(secret, secret_file, environ=environ),
            credential=credential or environ.get("JOBBROKER_CREDENTIAL") or DEFAULT_CREDENTIAL,
            tls=client_tls(tls if tls is not None else environ.get("JOBBROKER_TLS_CA") or None),
        )
