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
    from jobbroker import current_job

    current_job().report_progress(0.5, f"half of {payload}")
    release = os.environ.get("HANDLER_RELEASE", "")
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.05)
    return payload


async def async_sleepy_square(n: int) -> int:
    """square(), as a coroutine: sleeps $HANDLER_SLEEP seconds first."""
    import asyncio

    await asyncio.sleep(float(os.environ.get("HANDLER_SLEEP", "0")))
    return n * n


def sleepy_square_told(n: int) -> int:
    """Works $HANDLER_SLEEP seconds in steps of 0.1 s (of running time: a frozen process does
    not advance), stopping early once its lease is lost, then appends "job attempt lease_lost"
    to $HANDLER_LOG."""
    from jobbroker import current_job

    job = current_job()
    for _ in range(int(float(os.environ.get("HANDLER_SLEEP", "0")) * 10)):
        if job.lease_lost:
            break
        time.sleep(0.1)
    with open(os.environ["HANDLER_LOG"], "a") as log:
        log.write(f"{job.id} {job.attempt} lease_lost={job.lease_lost}\n")
    return n * n


def runaway_once(path: str) -> str:
    """The first attempt writes its pid to `path` and runs away (60 s); later ones return."""
    if os.path.exists(path):
        return "second attempt"
    with open(path, "w") as marker:
        marker.write(str(os.getpid()))
    time.sleep(60)
    return "the runaway finished"


async def async_runaway_once(path: str) -> str:
    import asyncio

    if os.path.exists(path):
        return "second attempt"
    with open(path, "w") as marker:
        marker.write(str(os.getpid()))
    await asyncio.sleep(60)
    return "the runaway finished"


async def async_forever(payload: Any) -> None:
    """Runs until cancelled; writes "cancelled" to $HANDLER_LOG when it is."""
    import asyncio

    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        with open(os.environ["HANDLER_LOG"], "a") as log:
            log.write(f"cancelled {payload}\n")
        raise


def record_span(payload: Any) -> Any:
    """Appends "start end" (wall clock) of its run to $HANDLER_LOG; runs 50 ms."""
    started = time.time()
    time.sleep(0.05)
    with open(os.environ["HANDLER_LOG"], "a") as log:
        log.write(f"{started} {time.time()}\n")
    return payload


def job_identity(_: Any) -> list[int]:
    """[id, attempt] as current_job() sees them (in a process handler too)."""
    from jobbroker import current_job

    job = current_job()
    return [job.id, job.attempt]


def raise_surrogate(_: Any) -> None:
    raise ValueError("bad \udcff surrogate")  # not valid UTF-8: msgpack cannot encode it as is


async def swallow_cancel(_: Any) -> str:
    import asyncio

    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError:
        pass  # a handler that ignores its cancellation
    return "returned after its time limit"


def notice_lost(path: str) -> None:
    """Runs until its job is taken from it (lease_lost), then writes "noticed" to `path`."""
    from jobbroker import current_job

    job = current_job()
    deadline = time.monotonic() + 30
    while not job.lease_lost and time.monotonic() < deadline:
        time.sleep(0.05)
    with open(path, "w") as out:
        out.write("noticed" if job.lease_lost else "never")


def pid_then_sleep(path: str) -> None:
    with open(path, "w") as out:
        out.write(str(os.getpid()))
    time.sleep(60)


def record_tick(payload: Any) -> Any:
    """Appends the job's id and payload to $HANDLER_LOG (a schedule's tick counter)."""
    from jobbroker import current_job

    with open(os.environ["HANDLER_LOG"], "a") as log:
        log.write(f"{current_job().id} {payload}\n")
    return payload
