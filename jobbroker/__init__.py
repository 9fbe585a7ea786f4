"""jobbroker: a job broker for Python. The public API, one import:

    from jobbroker import Client, Worker, SyncClient, task, current_job

Every name loads on first use (PEP 562): `import jobbroker.broker.protocol` stays free of
asyncio, a producer never imports the broker daemon, and `Broker`, `BrokerConfig` and `serve`
embed the daemon when asked for.

The code lives in two subpackages: `jobbroker.client` (the client, the worker, tasks) and
`jobbroker.broker` (the daemon; its `protocol` subpackage is shared with the client).
"""

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    # For type checkers and editors: the names, as __getattr__ finds them at run time.
    from jobbroker.broker.config import BrokerConfig as BrokerConfig
    from jobbroker.broker.server import Broker as Broker
    from jobbroker.broker.server import serve as serve
    from jobbroker.client import *  # noqa: F403
    from jobbroker.client.serializers import MsgpackSerializer as MsgpackSerializer
    from jobbroker.client.serializers import Serializer as Serializer

# Names that live elsewhere than in jobbroker.client, whose __all__ gives the rest.
_HOMES = {
    "MsgpackSerializer": "jobbroker.client.serializers",
    "Serializer": "jobbroker.client.serializers",
    "Broker": "jobbroker.broker.server",
    "serve": "jobbroker.broker.server",
    "BrokerConfig": "jobbroker.broker.config",
}


def __getattr__(name: str) -> _Any:
    if name == "__all__":  # `from jobbroker import *`, dir(): the client's names and ours
        client = _importlib.import_module("jobbroker.client")
        names = sorted({*client.__all__, *_HOMES})
        globals()["__all__"] = names
        return names
    home = _HOMES.get(name)
    if home is None:
        client = _importlib.import_module("jobbroker.client")
        if name not in client.__all__:
            raise AttributeError(f"module 'jobbroker' has no attribute {name!r}")
        home = "jobbroker.client"
    value = getattr(_importlib.import_module(home), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
