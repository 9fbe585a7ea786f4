"""Handlers that the integration tests run in real worker processes."""

from __future__ import annotations

import os
import time
from typing import Any


def square(n: int) -> int:
    """The classic task: n -> n * n. Sleeps $HANDLER_SLEEP seconds first, if set."""
    delay = float(os.environ.get("HANDLER_SLEEP", "0"))
    if delay:
        time.sleep(delay)
    return n * n


async def async_square(n: int) -> int:
    return n * n


def fail_always(payload: Any) -> None:
    raise ValueError(f"cannot handle {payload!r}")


def whoami(payload: Any) -> list[Any]:
    return [os.getpid(), payload]


def halfway(payload: Any) -> Any:
    """Reports half its progress, then runs until the file named by $HANDLER_RELEASE exists."""
    from client import current_job

    current_job().report_progress(0.5, f"half of {payload}")
    release = os.environ.get("HANDLER_RELEASE", "")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    return payload
