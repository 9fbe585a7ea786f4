"""Shared test helpers."""

from __future__ import annotations

import os

from jobbroker.broker.protocol.connection import ClientConnection, ServerConnection
from jobbroker.broker.protocol.credentials import Credential

SECRET = b"test-secret-0123456789abcdef"

# Multiply every time bound in the integration tests by this, for slow machines.
TIME_UNIT = float(os.environ.get("JOBBROKER_TEST_TIME_UNIT", "1"))


def credentials(*entries: tuple[str, str, bytes]) -> dict[str, Credential]:
    """Credentials by name from (name, role, secret); by default the one admin "default"."""
    entries = entries or (("default", "admin", SECRET),)
    return {name: Credential(name, role, (secret,)) for name, role, secret in entries}


def connected_pair(
    client_secret: bytes = SECRET, server_secret: bytes = SECRET, *, max_frame_size: int = 1024 * 1024
) -> tuple[ClientConnection, ServerConnection]:
    """A client and a server protocol joined in memory, after the handshake."""
    client = ClientConnection(client_secret, client="test", max_frame_size=max_frame_size)
    server = ServerConnection(
        credentials(("default", "admin", server_secret)), session=1, heartbeat=5.0, max_frame_size=max_frame_size
    )
    client.initiate()
    exchange(client, server)
    return client, server


def exchange(client: ClientConnection, server: ServerConnection) -> None:
    """Move bytes both ways until neither side has anything to send."""
    while True:
        to_server = client.data_to_send()
        if to_server:
            server.receive_data(to_server)
        to_client = server.data_to_send()
        if to_client:
            client.receive_data(to_client)
        if not to_server and not to_client:
            return
