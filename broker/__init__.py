"""jobbroker's broker daemon. Embed it with `Broker` or `serve`; run it with `jobbroker serve`.

The names below load lazily, so that importing broker.protocol (as the client does) does not
pull in the asyncio server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from broker.config import BrokerConfig
    from broker.core.scheduler import SchedulerConfig
    from broker.server import Broker, serve

__all__ = ["Broker", "BrokerConfig", "SchedulerConfig", "serve"]

_HOMES = {
    "Broker": "broker.server",
    "serve": "broker.server",
    "BrokerConfig": "broker.config",
    "SchedulerConfig": "broker.core.scheduler",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'broker' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
