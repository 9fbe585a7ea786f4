"""SyncClient: the Client's API, blocking, for plain scripts such as the classic managers
master. It runs its own event loop in a background thread; calls wait for their answers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any

from jobbroker.client.client import Client, ProgressReport

__all__ = ["SyncClient"]


def _blocking(name: str) -> Callable[..., Any]:
    coroutine_function = getattr(Client, name)

    def call(self: SyncClient, *args: Any, **kwargs: Any) -> Any:
        return self._run(coroutine_function(self._client, *args, **kwargs))

    call.__name__ = name
    call.__doc__ = f"Blocking form of Client.{name}: same arguments, same result, same errors.\n\n" + (
        coroutine_function.__doc__ or ""
    )
    return call


class SyncClient:
    """A Client for code without asyncio.

        with SyncClient() as client:
            job_ids = client.submit_many("squares", range(10))
            print([client.result(job_id, timeout=30) for job_id in job_ids])

    Takes the same arguments as Client and has the same methods, blocking: submit,
    submit_many, result, map, progress (an iterator), stats, cancel, cancel_many, job, jobs,
    purge_queue, pause, resume, set_queue, schedule, unschedule, schedules, dead_letters,
    requeue_dead, purge_dead, drain.
    Safe to call from one thread at a time.
    """

    def __init__(self, address: str | Sequence[str] | None = None, **options: Any) -> None:
        self._client = Client(address, **options)  # raises ConfigError before any thread starts
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="jobbroker-sync-client", daemon=True)
        self._thread.start()
        self._closed = False

    def _run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        if self._closed:
            coroutine.close()
            raise RuntimeError("SyncClient is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def connect(self) -> SyncClient:
        """Connect now rather than on first use."""
        self._run(self._client.connect())
        return self

    def close(self) -> None:
        """Close the connection and stop the thread. Idempotent."""
        if self._closed:
            return
        self._run(self._client.close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def progress(self, job_id: int) -> Iterator[ProgressReport]:
        """Blocking form of Client.progress: yields the job's progress reports until it ends.

        for report in client.progress(job_id):
            print(f"{report.fraction:.0%} {report.message}")
        """
        reports = self._client.progress(job_id)

        async def next_report() -> ProgressReport:
            return await anext(reports)

        try:
            while True:
                try:
                    yield self._run(next_report())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._run(reports.aclose())

    def __enter__(self) -> SyncClient:
        return self.connect()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    submit = _blocking("submit")
    submit_many = _blocking("submit_many")
    result = _blocking("result")
    map = _blocking("map")
    stats = _blocking("stats")
    cancel = _blocking("cancel")
    cancel_many = _blocking("cancel_many")
    job = _blocking("job")
    jobs = _blocking("jobs")
    purge_queue = _blocking("purge_queue")
    pause = _blocking("pause")
    resume = _blocking("resume")
    set_queue = _blocking("set_queue")
    schedule = _blocking("schedule")
    unschedule = _blocking("unschedule")
    schedules = _blocking("schedules")
    dead_letters = _blocking("dead_letters")
    requeue_dead = _blocking("requeue_dead")
    purge_dead = _blocking("purge_dead")
    drain = _blocking("drain")
