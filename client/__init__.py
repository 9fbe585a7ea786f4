"""jobbroker's client: `Client` for producers, `Worker` for workers.

from jobbroker import Client, Worker
"""

from jobbroker.broker.errors import (
    AuthenticationFailed,
    BrokerError,
    BrokerUnreachable,
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
    UnsupportedVersion,
    UsageError,
)
from jobbroker.client.client import Client, ProgressReport
from jobbroker.client.sync import SyncClient
from jobbroker.client.tasks import Task, task
from jobbroker.client.worker import Job, Worker, current_job

__all__ = [
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
    "UnsupportedVersion",
    "UsageError",
    "Worker",
    "current_job",
    "task",
]
