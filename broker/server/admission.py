"""Admission: which connections the broker takes, and which it closes to make room.

Unauthenticated connections are capped per address and in all, so that idle sockets cannot
lock authenticating clients out; authenticated ones are never closed for room.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from jobbroker.broker.access import WarningLimiter
from jobbroker.broker.config import BrokerConfig
from jobbroker.broker.core.clock import Clock
from jobbroker.broker.server.connection import BrokerProtocol

__all__ = ["Admission"]

log = logging.getLogger("jobbroker.broker")

# Slots of --max-connections that unauthenticated connections cannot take (one in ten).
_RESERVED_FOR_AUTHENTICATED = 10


class Admission:
    """The broker's connections by session, and those not yet authenticated, oldest first.

    Args:
        config: the connection limits.
        connections: the broker's connections by session (admit adds to it, eviction removes).
        warnings: the limiter of warnings about peers.
        clock: `now` for the limiter.
    """

    def __init__(
        self,
        config: BrokerConfig,
        connections: dict[int, BrokerProtocol],
        warnings: WarningLimiter,
        clock: Clock,
    ) -> None:
        self.config = config
        self.warnings = warnings
        self.clock = clock
        self._connections = connections
        # Connections not yet authenticated, oldest first: all of them, and by address.
        self._unauthenticated: OrderedDict[BrokerProtocol, None] = OrderedDict()
        self._unauthenticated_by_address: dict[str, OrderedDict[BrokerProtocol, None]] = {}

    def admit(self, protocol: BrokerProtocol) -> bool:
        """Take a new connection, or refuse it. Unauthenticated connections are capped per
        address (--max-handshakes-per-ip) and in all (all but a tenth of --max-connections):
        past a cap the oldest of them is closed to make room, so idle sockets cannot lock
        authenticating clients out. Authenticated connections are never closed for room."""
        config = self.config
        address = protocol.address
        same_address = self._unauthenticated_by_address.get(address)
        if same_address is not None and len(same_address) >= config.max_handshakes_per_ip:
            self._evict(next(iter(same_address)), "handshakes from one address")
        reserved = config.max_connections // _RESERVED_FOR_AUTHENTICATED
        if self._unauthenticated and len(self._unauthenticated) >= max(1, config.max_connections - reserved):
            self._evict(next(iter(self._unauthenticated)), "unauthenticated connections")
        if len(self._connections) >= config.max_connections:
            if not self._unauthenticated:
                self.warn("refusing", protocol, f": {len(self._connections)} connections, the limit")
                return False
            self._evict(next(iter(self._unauthenticated)), "connections")
        self._unauthenticated[protocol] = None
        self._unauthenticated_by_address.setdefault(address, OrderedDict())[protocol] = None
        self._connections[protocol.session] = protocol
        return True

    def _evict(self, protocol: BrokerProtocol, limit: str) -> None:
        self.warn("closing the oldest unauthenticated connection from", protocol, f" to make room ({limit})")
        self.handshake_done(protocol)
        self._connections.pop(protocol.session, None)
        protocol.evicted = True
        protocol.connection.close()
        if protocol.transport is not None:
            protocol.transport.abort()

    def handshake_done(self, protocol: BrokerProtocol) -> None:
        """The connection authenticated, or went: it no longer counts as unauthenticated."""
        if self._unauthenticated.pop(protocol, 0) is None:
            same_address = self._unauthenticated_by_address[protocol.address]
            del same_address[protocol]
            if not same_address:
                del self._unauthenticated_by_address[protocol.address]

    def warn(self, what: str, protocol: BrokerProtocol, detail: str) -> None:
        """A warning about a peer, at most one line per address and kind per interval."""
        count = self.warnings.hit(what, protocol.address, self.clock.now())
        if count == 1:
            log.warning("%s %s%s", what, protocol.peer, detail)
        elif count:
            log.warning(
                "%s %s%s (and %d more from %s since the last line)",
                what,
                protocol.peer,
                detail,
                count - 1,
                protocol.address,
            )
