"""jobbroker's broker daemon. Embed it with `Broker` or `serve`; run it with `jobbroker serve`.

The names below load lazily, so that importing jobbroker.broker.protocol (as the client does) does not
pull in the asyncio server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobbroker.broker.config import BrokerConfig
    from jobbroker.broker.core.scheduler import SchedulerConfig
    from jobbroker.broker.server import Broker, serve

__all__ = ["Broker", "BrokerConfig", "SchedulerConfig", "serve"]

_HOMES = {
    "Broker": "jobbroker.broker.server",
    "serve": "jobbroker.broker.server",
    "BrokerConfig": "jobbroker.broker.config",
    "SchedulerConfig": "jobbroker.broker.core.scheduler",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'jobbroker.broker' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
