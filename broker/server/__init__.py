"""The asyncio shell of the broker, in rooms:

- broker.py: `Broker`, the lifecycle (start, close, shutdown), the per-turn flush, the ticker
  and heartbeats; it owns the scheduler and hands work to the rooms below.
- connection.py: the per-connection adapter (an asyncio.Protocol): bytes to the protocol's
  ServerConnection, requests to dispatch, flow control.
- admission.py: which connections are taken, which are closed to make room.
- dispatch.py: request dispatch, pure (no asyncio): a request in, a reply out, through the
  scheduler; tested with a FakeClock and a fake connection.
- commit.py: group commit: output that tells of changes waits until they are stored.

The figures of the HTTP port are shaped in broker/reports.py from plain data the broker hands
over (no import of the job core there).

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
