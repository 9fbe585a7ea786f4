"""jobbroker: a job broker for Python. The public API, one import:

    from jobbroker import Client, Worker, SyncClient, task, current_job

Every name loads on first use (PEP 562): `import jobbroker.broker.protocol` stays free of
asyncio, a producer never imports the broker daemon, and `Broker`, `BrokerConfig` and `serve`
embed the daemon when asked for.

The code lives in two subpackages: `jobbroker.client` (the client, the worker, tasks) and
`jobbroker.broker` (the daemon; its `protocol` subpackage is shared with the client).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # For type checkers and editors: the names, as __getattr__ finds them at run time.
    from jobbroker.broker.config import BrokerConfig as BrokerConfig
    from jobbroker.broker.server import Broker as Broker
    from jobbroker.broker.server import serve as serve
    from jobbroker.client import *  # noqa: F403
    from jobbroker.client.serializers import MsgpackSerializer as MsgpackSerializer
    from jobbroker.client.serializers import Serializer as Serializer

_CLIENT_NAMES = (
    "AuthenticationFailed",
    "BrokerError",
    "BrokerUnreachable",
    "Client",
    "ConfigError",
    "ConnectionClosed",
    "Fail",
    "Forbidden",
    "InvalidRequest",
    "InvalidState",
    "Job",
    "JobCancelled",
    "JobDead",
    "JobError",
    "JobNotFound",
    "JobbrokerError",
    "LeaseLost",
    "LimitExceeded",
    "ProgressReport",
    "QueueFull",
    "ReplyTooLarge",
    "ResultTimeout",
    "Retry",
    "StorageUnavailable",
    "SyncClient",
    "Task",
    "TimeLimitExceeded",
    "TlsMismatch",
    "UnencodablePayload",
    "UsageError",
    "Worker",
    "current_job",
    "task",
)
_HOMES: dict[str, str] = {
    **dict.fromkeys(_CLIENT_NAMES, "jobbroker.client"),
    "MsgpackSerializer": "jobbroker.client.serializers",
    "Serializer": "jobbroker.client.serializers",
    "Broker": "jobbroker.broker.server",
    "serve": "jobbroker.broker.server",
    "BrokerConfig": "jobbroker.broker.config",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'jobbroker' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
