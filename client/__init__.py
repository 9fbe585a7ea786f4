"""jobbroker's client: `Client` for producers, `Worker` for workers.

from client import Client, Worker
"""

from broker.errors import (
    AuthenticationFailed,
    BrokerError,
    ConfigError,
    ConnectionClosed,
    Fail,
    Forbidden,
    InvalidRequest,
    InvalidState,
    JobbrokerError,
    JobCancelled,
    JobDead,
    JobError,
    JobNotFound,
    LeaseLost,
    LimitExceeded,
    QueueFull,
    ReplyTooLarge,
    ResultTimeout,
    Retry,
    StorageUnavailable,
    TimeLimitExceeded,
    TlsMismatch,
    UnencodablePayload,
    UsageError,
)
from client.client import Client, ProgressReport
from client.sync import SyncClient
from client.tasks import Task, task
from client.worker import Job, Worker, current_job

__all__ = [
    "AuthenticationFailed",
    "BrokerError",
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
]
