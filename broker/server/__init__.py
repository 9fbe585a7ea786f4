"""The asyncio shell of the broker, in rooms:

- broker.py: `Broker`, the lifecycle (start, close, shutdown), the per-turn flush, the ticker
  and heartbeats; it owns the scheduler and hands work to the rooms below.
- dispatch.py: request dispatch, pure (no asyncio): a request in, a reply out, through the
  scheduler; tested with a FakeClock and a fake connection.

The names below load lazily, so that importing the pure rooms (dispatch) does not pull in
asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobbroker.broker.server.broker import COMPACT_EVERY, Broker, serve

__all__ = ["COMPACT_EVERY", "Broker", "serve"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'jobbroker.broker.server' has no attribute {name!r}")
    return getattr(importlib.import_module("jobbroker.broker.server.broker"), name)
