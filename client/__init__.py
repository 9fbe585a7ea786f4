"""jobbroker's client: `Client` for producers, `Worker` for workers.

from client import Client, Worker
"""

from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigError,
    ConnectionClosed,
    InvalidRequest,
    InvalidState,
    JobbrokerError,
    JobCancelled,
    JobDead,
    JobError,
    JobNotFound,
    LeaseLost,
    QueueFull,
    ResultTimeout,
    StorageUnavailable,
    UsageError,
)
from client.client import Client
from client.worker import Worker

__all__ = [
    "AuthenticationFailed",
    "BrokerError",
    "Client",
    "ConfigError",
    "ConnectionClosed",
    "InvalidRequest",
    "InvalidState",
    "JobCancelled",
    "JobDead",
    "JobError",
    "JobNotFound",
    "JobbrokerError",
    "LeaseLost",
    "QueueFull",
    "ResultTimeout",
    "StorageUnavailable",
    "UsageError",
    "Worker",
]
