"""Worker: takes jobs from queues and runs a handler on each.

The broker pushes up to `prefetch` jobs; at most `concurrency` run at once. Coroutine handlers
run on the event loop; plain functions run in a thread or process pool so that heartbeats keep
flowing while they work. Completions and failures of one loop turn go out in one frame.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import signal
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

from broker.errors import ConnectionClosed, FrameTooLarge, UsageError, broker_error
from broker.protocol.messages import Complete, Deliver, Fail, Progress, Progressed, Release, Reserve, Results, Touch
from client.connection import Connection, Link

_T = TypeVar("_T")

__all__ = ["Handler", "Job", "Worker", "current_job"]

log = logging.getLogger("jobbroker.worker")

Handler = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]
ExecutorChoice = Literal["thread", "process", "inline"] | concurrent.futures.Executor


class Job:
    """The job a handler is running: `current_job()` inside a handler returns it."""

    __slots__ = ("_worker", "attempt", "id", "lease", "payload", "queue", "token")

    def __init__(self, item: list[Any], worker: Worker) -> None:
        self.id, self.token, self.queue, self.payload, self.attempt, self.lease = item
        self._worker = worker

    def report_progress(self, fraction: float, message: str = "") -> None:
        """Tell the producers following this job how far it has got: `fraction` from 0.0 to
        1.0 and a short message. From any handler, coroutine or thread; returns at once (the
        reports of one loop turn travel together)."""
        self._worker._report(self, float(fraction), str(message)[:200])

    async def touch(self, seconds: float = 0.0) -> None:
        """Extend this job's lease to `seconds` from now (0: the job's own lease length), for
        a handler that runs longer than its lease. From a coroutine handler.

        Raises:
            LeaseLost: the lease was already lost (the job went to another worker).
        """
        await self._worker.touch(self.id, self.token, seconds)


_current_job: contextvars.ContextVar[Job] = contextvars.ContextVar("jobbroker_current_job")


def current_job() -> Job:
    """The job the calling handler is running (coroutine handlers and thread-pool handlers).

    Raises:
        UsageError: called outside a handler.
    """
    try:
        return _current_job.get()
    except LookupError:
        raise UsageError("current_job() is only meaningful inside a handler") from None


class Worker:
    """Runs `handler` on jobs from `queues`.

    Args:
        address: "HOST:PORT" of the broker; default $JOBBROKER_CONNECT, else 127.0.0.1:7878.
        queues: queue names to take jobs from, in order of preference.
        handler: `f(payload) -> result`, a coroutine function or a plain one. Its return
            value (any msgpack value) completes the job; an exception fails it with the
            exception's type and text.
        secret, secret_file, credential, tls: as for Client.
        concurrency: jobs run at once.
        prefetch: jobs held at once (running plus waiting); default 2 x concurrency.
        executor: where plain-function handlers run: "thread" (default), "process", "inline"
            (on the event loop: fastest for trivial handlers, but a slow one delays
            heartbeats), or an Executor of yours.
        name: how this worker shows in the broker's stats.
        grace: seconds stop() waits for running jobs before handing them back.
        handle_signals: make SIGTERM and SIGINT call stop() while run() runs.
        reconnect_timeout: how long to keep trying to reach a broker that went away.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        queues: Sequence[str],
        handler: Handler,
        secret: bytes | str | None = None,
        secret_file: str | None = None,
        credential: str | None = None,
        tls: ssl.SSLContext | str | None = None,
        concurrency: int = 16,
        prefetch: int | None = None,
        executor: ExecutorChoice = "thread",
        name: str = "worker",
        grace: float = 30.0,
        handle_signals: bool = False,
        reconnect_timeout: float = 3600.0,
    ) -> None:
        if isinstance(queues, str):
            raise UsageError("queues is a list of names, not one string")
        if not queues:
            raise UsageError("a worker needs at least one queue")
        if concurrency < 1:
            raise UsageError("concurrency must be at least 1")
        self.queues = list(queues)
        self.handler = handler
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else 2 * concurrency
        if self.prefetch < concurrency:
            raise UsageError("prefetch must be at least concurrency")
        self.grace = grace
        self.handle_signals = handle_signals
        self._is_coroutine = inspect.iscoroutinefunction(handler)
        self._executor_choice = executor
        self._executor: concurrent.futures.Executor | None = None
        self._link = Link.from_settings(
            address,
            secret=secret,
            secret_file=secret_file,
            credential=credential,
            tls=tls,
            client=name,
            on_push=self._on_push,
            on_connect=self._on_connect,
            reconnect_timeout=reconnect_timeout,
        )
        self._waiting: deque[Job] = deque()  # delivered, not started
        self._running: dict[int, Job] = {}  # runner slot -> the job it runs
        self._runners: list[asyncio.Task[None]] = []
        self._idle: deque[asyncio.Future[None]] = deque()  # runners waiting for a job
        self._completions: list[list[Any]] = []
        self._failures: list[list[Any]] = []
        self._reports: list[list[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answers: set[asyncio.Future[dict[str, Any]]] = set()
        self._flush_scheduled = False
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self.completed = 0
        self.failed = 0

    # --- running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Take and run jobs until stop() (or a signal, with handle_signals); then stop taking
        jobs, finish or hand back those held, and return."""
        loop = self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._executor = self._make_executor()
        installed = self._install_signals(loop) if self.handle_signals else []
        # A fixed set of runners takes jobs from _waiting: no task is made per job, and a
        # handler that finishes without suspending runs start to end in one step.
        self._runners = [asyncio.ensure_future(self._runner(slot)) for slot in range(self.concurrency)]
        try:
            while not self._stopping:
                # stop() ends a wait for the broker too, not only a connected spell.
                connection = await self._unless_stopped(self._link.get())
                if connection is None:
                    break
                await self._unless_stopped(connection.wait_closed())
                if not self._stopping:
                    # The broker requeued everything we held; what is still waiting is no longer ours.
                    log.warning("connection to the broker lost; reconnecting")
                    self._waiting.clear()
            await self._drain()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            self._link.close()
            if self._executor is not None and self._executor_choice in ("thread", "process"):
                self._executor.shutdown(wait=False, cancel_futures=True)

    async def _unless_stopped(self, awaitable: Awaitable[_T]) -> _T | None:
        """What `awaitable` gives, or None if stop() comes first (it is then cancelled)."""
        assert self._stopped is not None
        task = asyncio.ensure_future(awaitable)
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
            await task
        return None

    def stop(self) -> None:
        """Ask run() to finish: no new jobs; running ones get `grace` seconds. Idempotent."""
        self._stopping = True
        if self._stopped is not None:
            self._stopped.set()

    async def _drain(self) -> None:
        connection = self._link.current
        if connection is not None:
            with contextlib.suppress(ConnectionClosed):
                await connection.request(Reserve, queues=self.queues, prefetch=0)
            if self._waiting:
                unstarted = [[job.id, job.token] for job in self._waiting]
                self._waiting.clear()
                with contextlib.suppress(ConnectionClosed):
                    await connection.request(Release, items=unstarted)
        self._wake_runners(len(self._idle))  # idle runners see _stopping and return
        if self._runners:
            _done, still_running = await asyncio.wait(self._runners, timeout=self.grace)
            held = list(self._running.values())
            if still_running:
                log.warning("handing back %d jobs still running after %.0fs", len(held), self.grace)
                for task in still_running:
                    task.cancel()
                await asyncio.wait(still_running)
                connection = self._link.current
                if connection is not None and held:
                    with contextlib.suppress(ConnectionClosed):
                        await connection.request(Release, items=[[job.id, job.token] for job in held])
        self._flush()
        if self._answers:
            await asyncio.wait(set(self._answers), timeout=10.0)

    def _make_executor(self) -> concurrent.futures.Executor | None:
        choice = self._executor_choice
        if self._is_coroutine or choice == "inline":
            return None
        if choice == "thread":
            return concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="jobbroker-worker")
        if choice == "process":
            return concurrent.futures.ProcessPoolExecutor(self.concurrency)
        if isinstance(choice, concurrent.futures.Executor):
            return choice
        raise UsageError(f"executor must be 'thread', 'process', 'inline' or an Executor, not {choice!r}")

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(signum, self.stop)
            except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
                signal.signal(signum, lambda *_: loop.call_soon_threadsafe(self.stop))
            else:
                installed.append(signum)
        return installed

    # --- jobs -------------------------------------------------------------------------

    def _on_connect(self, connection: Connection) -> None:
        if not self._stopping:
            connection.request_nowait(Reserve, queues=self.queues, prefetch=self.prefetch)

    def _on_push(self, message: Deliver | Results | Progressed) -> None:
        if not isinstance(message, Deliver):
            return
        waiting = self._waiting
        for item in message.jobs:
            waiting.append(Job(item, self))
        self._wake_runners(len(message.jobs))

    def _wake_runners(self, count: int) -> None:
        idle = self._idle
        while count > 0 and idle:
            wake = idle.popleft()
            if not wake.done():
                wake.set_result(None)
                count -= 1

    async def _runner(self, slot: int) -> None:
        loop = asyncio.get_running_loop()
        waiting, running = self._waiting, self._running
        while True:
            if not waiting or self._stopping:
                if self._stopping:
                    return
                wake: asyncio.Future[None] = loop.create_future()
                self._idle.append(wake)
                await wake
                continue
            job = waiting.popleft()
            running[slot] = job
            try:
                await self._run_one(job)
            finally:
                del running[slot]

    async def _run_one(self, job: Job) -> None:
        _current_job.set(job)  # each runner is a task with its own context
        try:
            if self._is_coroutine:
                result = await self.handler(job.payload)  # type: ignore[misc]
            elif self._executor is None:
                result = self.handler(job.payload)
            else:
                loop = asyncio.get_running_loop()
                call = functools.partial(self.handler, job.payload)
                if isinstance(self._executor, concurrent.futures.ThreadPoolExecutor):
                    call = functools.partial(contextvars.copy_context().run, call)  # current_job() in threads
                result = await loop.run_in_executor(self._executor, call)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed += 1
            self._failures.append([job.id, job.token, type(exc).__name__, str(exc)])
        else:
            self.completed += 1
            self._completions.append([job.id, job.token, result])
        self._schedule_flush()

    async def touch(self, job_id: int, token: int, seconds: float = 0.0) -> None:
        """Extend a running job's lease to `seconds` from now (0: the job's own lease).

        Raises:
            LeaseLost: the lease was already lost.
        """
        connection = await self._link.get()
        reply = await connection.request(Touch, items=[[job_id, token, float(seconds)]])
        for _, code in reply["refused"]:
            raise broker_error(code, f"cannot extend the lease of job {job_id}: {code}")

    def _report(self, job: Job, fraction: float, message: str) -> None:
        loop = self._loop
        if loop is None:
            return
        item = [job.id, job.token, fraction, message]
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._queue_report(item)
        else:  # a handler in a pool thread
            loop.call_soon_threadsafe(self._queue_report, item)

    def _queue_report(self, item: list[Any]) -> None:
        self._reports.append(item)
        self._schedule_flush()

    # --- answers, one frame per turn --------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        connection = self._link.current
        if connection is None:
            # Our leases died with the connection; the broker has requeued these jobs.
            if self._completions or self._failures:
                log.warning(
                    "dropping %d answers: their leases ended with the connection",
                    len(self._completions) + len(self._failures),
                )
            self._completions, self._failures, self._reports = [], [], []
            return
        if self._completions:
            completions, self._completions = self._completions, []
            try:
                self._send(connection, Complete, completions)
            except (TypeError, ValueError, OverflowError):
                self._send_one_by_one(connection, completions)
        if self._failures:
            failures, self._failures = self._failures, []
            self._send(connection, Fail, failures)
        if self._reports:
            reports, self._reports = self._reports, []
            connection.request_nowait(Progress, items=reports)

    def _send_one_by_one(self, connection: Connection, completions: list[list[Any]]) -> None:
        """A result in the batch cannot be encoded: fail that job, complete the rest."""
        for item in completions:
            try:
                self._send(connection, Complete, [item])
            except (TypeError, ValueError, OverflowError) as exc:
                self.completed -= 1
                self.failed += 1
                self._send(connection, Fail, [[item[0], item[1], "UnencodableResult", f"result cannot be sent: {exc}"]])

    def _send(self, connection: Connection, request_type: type[Complete] | type[Fail], items: list[list[Any]]) -> None:
        try:
            future = connection.request(request_type, items=items)
        except FrameTooLarge:
            if len(items) == 1:
                raise ValueError("one result does not fit in a frame") from None  # fails the job instead
            half = len(items) // 2
            self._send(connection, request_type, items[:half])
            self._send(connection, request_type, items[half:])
            return
        self._answers.add(future)
        future.add_done_callback(functools.partial(self._answered, items))

    def _answered(self, items: list[list[Any]], future: asyncio.Future[dict[str, Any]]) -> None:
        self._answers.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("answers for %d jobs not delivered: %s", len(items), exc)
            return
        for index, code in future.result()["refused"]:
            log.warning("broker refused the answer for job %d: %s", items[index][0], code)
