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
import os
import signal
import ssl
import sys
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

from jobbroker.broker.errors import (
    ConnectionClosed,
    Fail,
    FrameTooLarge,
    NotLeader,
    Retry,
    TimeLimitExceeded,
    UsageError,
    broker_error,
)
from jobbroker.broker.protocol import messages
from jobbroker.broker.protocol.messages import (
    MAX_ERROR_MESSAGE,
    MAX_ERROR_TYPE,
    MAX_TRACEBACK,
    Complete,
    Deliver,
    Progress,
    Progressed,
    Release,
    Reserve,
    Results,
    Revoked,
    Started,
    Touch,
    bounded,
)
from jobbroker.broker.protocol.rows import DeliveryRow, refused_rows
from jobbroker.client.connection import Connection, Dial, dial_tcp
from jobbroker.client.executors import InlineSlot, ProcessSlot, SharedSlot, Slot, ThreadPool, ThreadSlot
from jobbroker.client.link import Link
from jobbroker.client.serializers import PlainMsgpack, Serializer
from jobbroker.client.tasks import Task

_T = TypeVar("_T")

__all__ = ["Handler", "Job", "Worker", "current_job"]

log = logging.getLogger("jobbroker.worker")

Handler = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]
_TRACEBACK_LINE = 1000  # characters of one traceback line kept
START_REPORT_DELAY = 0.05  # seconds: a job still running this long after its start is reported
ExecutorChoice = Literal["thread", "process", "inline"] | concurrent.futures.Executor


class Job:
    """The job a handler is running: `current_job()` inside a handler returns it.

    Attributes:
        id: the job id, the same on every attempt (use it to make handlers idempotent).
        queue, payload: as submitted.
        attempt: this attempt's number, from 1.
        timeout: seconds this attempt may run (None: no limit).
        parent_results: the results of the jobs it was submitted to run after (`after`), in
            that order (None: it runs after none; an item is None for one that did not succeed
            when the job runs anyway).
        lease_lost: True once this worker no longer holds the job (cancelled, over its time
            limit, or the connection to the broker was lost): whatever the handler returns is
            discarded. A long plain-function handler may check it and stop early.
    """

    __slots__ = (
        "_worker",
        "attempt",
        "id",
        "lease",
        "lost_reason",
        "parent_results",
        "payload",
        "queue",
        "received_at",
        "timeout",
        "token",
    )

    def __init__(self, item: DeliveryRow | Sequence[Any], worker: Worker | None, received_at: float = 0.0) -> None:
        # A delivery's payload and parent results are bytes until the worker reads them (_read).
        self.id: int = item[0]
        self.token: int = item[1]
        self.queue: str = item[2]
        self.payload: Any = item[3]
        self.attempt: int = item[4]
        self.lease: float = item[5]
        self.timeout: float | None = item[6]
        # the results of the jobs it runs after (`after`), in that order; None: it runs after none
        self.parent_results: list[Any] | None = item[7]
        self.lost_reason: str | None = None  # why this worker no longer holds the job
        self.received_at = received_at  # loop time of the delivery, for hand_back_after
        self._worker = worker

    @property
    def lease_lost(self) -> bool:
        return self.lost_reason is not None

    def report_progress(self, fraction: float, message: str = "") -> None:
        """Tell the producers following this job how far it has got: `fraction` from 0.0 to
        1.0 and a short message. From a coroutine or thread handler; returns at once (the
        reports of one loop turn travel together). Dropped once the lease is lost, and in a
        process handler (which has no way to the broker)."""
        if self.lost_reason is None and self._worker is not None:
            self._worker._report(self, float(fraction), str(message)[:200])

    def row(self) -> list[Any]:
        """The job as delivered (a process handler's current_job() is made from it)."""
        return [
            self.id,
            self.token,
            self.queue,
            self.payload,
            self.attempt,
            self.lease,
            self.timeout,
            self.parent_results,
        ]

    async def touch(self, seconds: float = 0.0) -> None:
        """Check that this worker still holds the job. Leases follow the worker's session
        (docs/protocol.md, "Leases"), so a live worker never needs to extend one; this stays
        for handlers written against older versions. From a coroutine handler.

        Raises:
            LeaseLost: the job is no longer this worker's.
        """
        if self._worker is None:
            raise UsageError("touch() is not available in a process handler")
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

    A job this worker holds stays its own for as long as the worker's connection lives,
    however long the handler runs (docs/protocol.md, "Leases"); it goes back to its queue when
    the connection is lost or the worker stops heartbeating.

    Give it either `handler` (one function for every job of `queues`) or `tasks` (functions
    made with @task, dispatched by the name in each payload; `queues` defaults to theirs).

    Args:
        address: "HOST:PORT" of the broker; or several ("h1:7878,h2:7878" or a list) for
            brokers of which one leads: the worker follows the leader, and jobs it was running
            when it lost its broker are dropped and run again there (README, "Standby
            brokers"). Default $JOBBROKER_CONNECT (commas too), else 127.0.0.1:7878.
        queues: queue names to take jobs from, in order of preference.
        handler: `f(payload) -> result`, a coroutine function or a plain one. Its return
            value (any msgpack value) completes the job; an exception fails it with the
            exception's type, text and traceback (raise `Retry(delay)` to choose when it is
            retried, `Fail(reason)` to end it dead at once).
        tasks: @task functions to serve. A payload naming no task of these fails the job at
            once, as do arguments the function cannot take (TypeError), without retries.
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
        wait_for_broker: keep trying (for reconnect_timeout) to reach a broker never reached
            yet, logging each failure at most every 10 s; by default run() fails at once with
            BrokerUnreachable.
        timeout: seconds one attempt may run, for jobs submitted without a `timeout` of their
            own (None: no limit). A coroutine handler is cancelled, a process handler's
            process is killed and replaced, a thread handler is abandoned (it runs on, its
            result ignored); the attempt fails with TimeLimitExceeded. "inline" handlers
            cannot be interrupted.
        hand_back_after: when jobs have waited this many seconds in the prefetch buffer because
            every handler slot is busy, hand them back for other workers and take no more than
            can start at once until a slot frees.
        serializer: the producers' serializer (client.serializers; default PlainMsgpack): it
            reads each payload (and the results in `parent_results`) before the handler sees
            it, and makes the bytes of each result.
        dial: how to open the byte stream to the broker (client.connection.Dial): TCP by
            default; tests join a broker in memory.
    """

    def __init__(
        self,
        address: str | Sequence[str] | None = None,
        *,
        queues: Sequence[str] | None = None,
        handler: Handler | None = None,
        tasks: Iterable[Task[Any, Any]] | None = None,
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
        timeout: float | None = None,
        hand_back_after: float = 10.0,
        serializer: Serializer | None = None,
        wait_for_broker: bool = False,
        dial: Dial = dial_tcp,
    ) -> None:
        if (handler is None) == (tasks is None):
            raise UsageError("a worker takes a handler or tasks (one of them)")
        self.tasks: dict[str, Task[Any, Any]] = {}
        for each in tasks or ():
            if not isinstance(each, Task):
                raise UsageError(f"{each!r} is not a @task")
            if self.tasks.setdefault(each.name, each) is not each:
                raise UsageError(f"two tasks are named {each.name!r}")
        if queues is None and tasks is not None:
            queues = list(dict.fromkeys(each.queue for each in self.tasks.values()))
        if isinstance(queues, str):
            raise UsageError("queues is a list of names, not one string")
        if not queues:
            raise UsageError("a worker needs at least one queue")
        if concurrency < 1:
            raise UsageError("concurrency must be at least 1")
        if timeout is not None and not timeout > 0:
            raise UsageError("timeout must be more than 0 seconds (or None: no limit)")
        if not hand_back_after > 0:
            raise UsageError("hand_back_after must be more than 0 seconds")
        self.queues = list(queues)
        self.handler = handler
        self.concurrency = concurrency
        self.prefetch = prefetch if prefetch is not None else 2 * concurrency
        if self.prefetch < concurrency:
            raise UsageError("prefetch must be at least concurrency")
        self.grace = grace
        self.handle_signals = handle_signals
        self.timeout = timeout
        self.hand_back_after = hand_back_after
        self.serializer = serializer
        self._codec: Serializer = serializer if serializer is not None else PlainMsgpack()
        # Every job's handler runs on the loop: no executor slots needed.
        if handler is not None:
            self._is_coroutine = inspect.iscoroutinefunction(handler)
        else:
            self._is_coroutine = all(each.is_coroutine for each in self.tasks.values())
        self._executor_choice = executor
        choices = ("thread", "process", "inline")
        if executor not in choices and not isinstance(executor, concurrent.futures.Executor):
            raise UsageError(f"executor must be 'thread', 'process', 'inline' or an Executor, not {executor!r}")
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
            wait_for_broker=wait_for_broker,
            dial=dial,
        )
        self._waiting: deque[Job] = deque()  # delivered, not started
        self._running: dict[int, Job] = {}  # runner slot -> the job it runs
        self._slots: list[Slot] = []  # runner slot -> where its plain-function handlers run
        self._runners: list[asyncio.Task[None]] = []
        self._idle: deque[asyncio.Future[None]] = deque()  # runners waiting for a job
        self._starts: dict[int, list[Any]] = {}  # job id -> [job_id, token]: started, not yet told
        self._starts_timer: asyncio.TimerHandle | None = None
        self._completions: list[list[Any]] = []
        self._failures: list[list[Any]] = []
        self._reports: list[list[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._answers: set[asyncio.Future[dict[str, Any]]] = set()
        self._flush_scheduled = False
        self._stopping = False
        self._stopped: asyncio.Event | None = None
        self._handing_back = False  # every slot stuck: prefetch lowered to concurrency
        self.completed = 0
        self.failed = 0

    # --- running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Take and run jobs until stop() (or a signal, with handle_signals); then stop taking
        jobs, finish or hand back those held, and return."""
        loop = self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        threads = ThreadPool(self.concurrency) if self._executor_choice == "thread" else None
        self._slots = [self._make_slot(threads) for _ in range(self.concurrency)]
        installed = self._install_signals(loop) if self.handle_signals else []
        # A fixed set of runners takes jobs from _waiting: no task is made per job, and a
        # handler that finishes without suspending runs start to end in one step.
        self._runners = [asyncio.ensure_future(self._runner(slot)) for slot in range(self.concurrency)]
        watchdog = asyncio.ensure_future(self._watch_buffer())
        try:
            while not self._stopping:
                # stop() ends a wait for the broker too, not only a connected spell.
                connection = await self._unless_stopped(self._link.get())
                if connection is None:
                    break
                address = self._link.address  # with several addresses: the one that answered
                log.info("connected to the broker at %s (session %d)", address, connection.session)
                await self._unless_stopped(connection.wait_closed())
                if not self._stopping:
                    reason = connection.closed.result()
                    if isinstance(reason.cause, NotLeader):  # it refused our reserve: held nothing
                        log.info("the broker at %s is a standby; looking for the leader", address)
                        continue
                    log.warning("lost the broker at %s (%s); reconnecting", address, _reason(reason))
                    # The broker requeued everything we held (a new leader, after a takeover,
                    # delivers it again: lease tokens do not survive it): stop what still runs.
                    self._lose_all("the connection to the broker was lost")
        finally:
            watchdog.cancel()
        try:
            await self._drain()
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            self._link.close()
            for slot in self._slots:
                slot.close()

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
            held = [job for job in self._running.values() if not job.lease_lost]
            if still_running:
                log.warning("handing back %d jobs still running after %.0fs", len(held), self.grace)
                for job in held:
                    job.lost_reason = "handed back at shutdown"
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

    def _make_slot(self, threads: ThreadPool | None) -> Slot:
        choice = self._executor_choice
        if self._is_coroutine or choice == "inline":
            return InlineSlot()
        if threads is not None:
            return ThreadSlot(threads)
        if choice == "process":
            return ProcessSlot()
        assert isinstance(choice, concurrent.futures.Executor)
        return SharedSlot(choice)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed: list[int] = []
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
        self._handing_back = False
        if not self._stopping:
            connection.request_nowait(Reserve, queues=self.queues, prefetch=self.prefetch)

    def _on_push(self, message: Deliver | Results | Progressed | Revoked) -> None:
        if isinstance(message, Revoked):
            for job_id, token, reason in message.items:
                self._lose(job_id, token, reason)
            return
        if not isinstance(message, Deliver):
            return
        waiting = self._waiting
        now = asyncio.get_running_loop().time()
        for item in message.jobs:
            waiting.append(Job(item, self, now))
        self._wake_runners(len(message.jobs))

    def _lose(self, job_id: int, token: int, reason: str) -> None:
        """The broker took a job back: forget it if it waits, stop its handler if it runs."""
        for job in self._waiting:
            if job.id == job_id and job.token == token:
                job.lost_reason = reason  # its runner skips it
                log.info("job %d (queue %s) taken back before it started: %s", job_id, job.queue, reason)
                return
        for slot, job in self._running.items():
            if job.id == job_id and job.token == token and job.lost_reason is None:
                log.warning("job %d (queue %s) taken back while running: %s", job_id, job.queue, reason)
                self._stop_handler(slot, job, reason)
                return

    def _lose_all(self, reason: str) -> None:
        for job in self._waiting:
            job.lost_reason = reason
        self._waiting.clear()
        for slot, job in list(self._running.items()):
            if job.lost_reason is None:
                self._stop_handler(slot, job, reason)
        self._starts.clear()

    def _stop_handler(self, slot: int, job: Job, reason: str) -> None:
        """Mark the job lost and stop its handler where that can be done: a coroutine is
        cancelled, a process killed; a thread runs on (it may check `lease_lost`)."""
        job.lost_reason = reason
        self._starts.pop(job.id, None)
        if self._is_coroutine or self._executor_choice == "process":
            self._runners[slot].cancel()

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
            if job.lost_reason is not None:
                continue
            running[slot] = job
            try:
                await self._run_one(slot, job)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if job.lost_reason is None or self._stopping or task is None:
                    raise
                task.uncancel()  # the job was taken back; this runner goes on with the next
            finally:
                del running[slot]
            if self._handing_back:
                self._take_again()

    async def _run_one(self, slot: int, job: Job) -> None:
        _current_job.set(job)  # each runner is a task with its own context
        self._starts[job.id] = [job.id, job.token]
        if self._starts_timer is None:
            self._starts_timer = asyncio.get_running_loop().call_later(START_REPORT_DELAY, self._report_starts)
        limit = job.timeout if job.timeout is not None else self.timeout
        task: Task[Any, Any] | None = None
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            self._read(job)
            task = self._task_of(job) if self.tasks else None
            if limit is None:  # most jobs: no timer to arm
                result = await self._attempt(slot, job, task)
            else:
                async with asyncio.timeout(limit) as deadline:
                    result = await self._attempt(slot, job, task)
                # A handler that swallowed its cancellation, or one that blocked the loop (inline)
                # past its limit, does not complete the job: the limit is the limit.
                if deadline.expired() or loop.time() - started > limit:
                    raise TimeoutError
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            timed_out = limit is not None and isinstance(exc, TimeoutError) and loop.time() - started >= limit
            if timed_out:
                exc = TimeLimitExceeded(f"attempt {job.attempt} ran over its time limit of {limit:g} s")
            final = isinstance(exc, Fail | _BadCall) or (task is not None and task.default_options.is_final(exc))
            self._fail(job, exc, final=final)
            if timed_out:
                job.lost_reason = "time limit"  # an abandoned thread handler can see it and stop
        else:
            self._complete(job, result)
        self._schedule_flush()

    def _task_of(self, job: Job) -> Task[Any, Any] | None:
        """The task a job names, if the payload can be read (for its retry rules)."""
        name = job.payload.get("task") if isinstance(job.payload, dict) else None
        return self.tasks.get(name) if isinstance(name, str) else None

    async def _attempt(self, slot: int, job: Job, task: Task[Any, Any] | None) -> Any:
        """Run the job's handler (or task) once, where it runs; returns what it returned, as
        the serializer encodes it."""
        function: Callable[..., Any]
        args: Sequence[Any]
        kwargs: dict[str, Any]
        if self.handler is not None:
            function, args, kwargs, on_loop = self.handler, (job.payload,), {}, self._is_coroutine
        else:
            task, args, kwargs = self._task_call(job)
            function, on_loop = task.func, task.is_coroutine
        if on_loop:
            result = function(*args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        else:
            call = functools.partial(task if task is not None else function, *args, **kwargs)
            if isinstance(self._slots[slot], ProcessSlot):  # current_job() there: a copy of the job
                call = functools.partial(_as_current_job, job.row(), call)
            result = await self._call(slot, call)
        return self._encoded(result)

    def _task_call(self, job: Job) -> tuple[Task[Any, Any], Sequence[Any], dict[str, Any]]:
        """The task a payload names and its arguments (docs/protocol.md, "Tasks").

        Raises:
            _BadCall: no such task here, or arguments it cannot take: no retry helps.
        """
        payload = job.payload
        name = payload.get("task") if isinstance(payload, dict) else None
        if not isinstance(name, str):
            raise _BadCall("BadTaskPayload", 'a task payload is {"task": name, "args": [...], "kwargs": {...}}')
        task = self.tasks.get(name)
        if task is None:
            served = ", ".join(sorted(self.tasks))
            raise _BadCall("UnknownTask", f"no task named {name!r} on this worker (it serves {served})")
        args, kwargs = payload.get("args", []), payload.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise _BadCall("BadTaskPayload", "a task payload's args is an array and kwargs a map")
        try:
            task.check_arguments(args, kwargs)
        except TypeError as exc:
            raise _BadCall("TypeError", f"{name}() cannot take these arguments: {exc}") from None
        return task, args, kwargs

    def _read(self, job: Job) -> None:
        """Read the delivery's payload, and the results of the jobs it ran after, with the
        serializer: the broker forwards them as the producer's and workers' bytes.

        Raises:
            _BadCall: the serializer cannot read them (no retry helps).
        """
        job.payload = self._decoded(job.payload, "payload")
        if job.parent_results:
            job.parent_results = [None if r is None else self._decoded(r, "parent result") for r in job.parent_results]

    def _decoded(self, data: bytes, what: str) -> Any:
        try:
            return self._codec.loads(data)
        except Exception as exc:
            raise _BadCall("UndecodablePayload", f"the serializer cannot read the {what}: {exc}") from exc

    def _encoded(self, result: Any) -> bytes:
        try:
            data = self._codec.dumps(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise _BadCall("UnencodableResult", f"the serializer cannot encode the result: {exc}") from exc
        if type(data) is not bytes:  # the wire carries a result as msgpack bin
            if not isinstance(data, bytes | bytearray | memoryview):
                raise _BadCall("UnencodableResult", f"the serializer made {type(data).__name__}, not bytes")
            data = bytes(data)
        return data

    async def _call(self, slot: int, call: Callable[[], Any]) -> Any:
        runner = self._slots[slot]
        try:
            return await runner.run(call)
        except asyncio.CancelledError:
            runner.abandon()  # time limit, lease lost or shutdown: do not wait for it
            raise

    def _complete(self, job: Job, result: Any) -> None:
        self._starts.pop(job.id, None)  # the answer says it started
        if job.lost_reason is not None:
            log.debug("result of job %d discarded: %s", job.id, job.lost_reason)
            return
        self.completed += 1
        self._completions.append([job.id, job.token, result])

    def _fail(self, job: Job, exc: BaseException, *, final: bool = False) -> None:
        self._starts.pop(job.id, None)
        if job.lost_reason is not None:
            log.debug("failure of job %d discarded: %s", job.id, job.lost_reason)
            return
        self.failed += 1
        error_type = bounded(exc.error_type if isinstance(exc, _BadCall) else type(exc).__name__, MAX_ERROR_TYPE)
        message = bounded(_text(exc), MAX_ERROR_MESSAGE)  # valid UTF-8 too: the broker must get it
        log.warning(
            "job %d (queue %s) attempt %d failed%s: %s: %s",
            job.id,
            job.queue,
            job.attempt,
            " for good" if final else "",
            error_type,
            bounded(message, 500),
        )
        log.debug("job %d traceback", job.id, exc_info=exc)
        trace = "" if isinstance(exc, _BadCall) else handler_traceback(exc)
        retry_delay = float(exc.delay) if isinstance(exc, Retry) and exc.delay is not None else None
        self._failures.append([job.id, job.token, error_type, message, trace, final, retry_delay])

    async def _watch_buffer(self) -> None:
        """Hand buffered jobs back when every slot has been busy for hand_back_after seconds
        (stuck or long handlers), so that other workers run them, and take no more than can
        start at once until a slot frees (_take_again)."""
        loop = asyncio.get_running_loop()
        period = min(1.0, self.hand_back_after / 4)
        while True:
            await asyncio.sleep(period)
            waiting = self._waiting
            if not waiting or self._stopping:
                continue
            if loop.time() - waiting[0].received_at < self.hand_back_after:
                continue
            connection = self._link.current
            if connection is None:
                continue
            held = [job for job in waiting if job.lost_reason is None]
            waiting.clear()
            log.warning(
                "every handler slot busy for %.0fs: handing %d waiting jobs back", self.hand_back_after, len(held)
            )
            if not self._handing_back:  # (jobs delivered before that took effect come back too)
                self._handing_back = True
                connection.request_nowait(Reserve, queues=self.queues, prefetch=self.concurrency)
            if held:
                connection.request_nowait(Release, items=[[job.id, job.token] for job in held])

    def _take_again(self) -> None:
        """A slot freed after a hand-back: prefetch as usual again."""
        self._handing_back = False
        connection = self._link.current
        if connection is not None and not self._stopping:
            connection.request_nowait(Reserve, queues=self.queues, prefetch=self.prefetch)

    async def touch(self, job_id: int, token: int, seconds: float = 0.0) -> None:
        """Check that this worker still holds a job (leases follow the session: nothing needs
        extending).

        Raises:
            LeaseLost: the job is no longer this worker's.
        """
        connection = await self._link.get()
        reply = await connection.request(Touch, items=[[job_id, token, float(seconds)]])
        for _, code in reply["refused"]:
            raise broker_error(code, f"job {job_id} is no longer held: {code}")

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

    def _report_starts(self) -> None:
        """Tell the broker which jobs started (docs/protocol.md, "Leases and attempts"): those
        still running START_REPORT_DELAY after their start. A job answered sooner needs no
        notice (its answer says it started), which spares most short jobs a message each."""
        self._starts_timer = None
        connection = self._link.current
        if self._starts and connection is not None:
            connection.send(Started(items=list(self._starts.values())))  # type: ignore[arg-type]  # rows are lists
        self._starts.clear()

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
                log.info(
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
            self._send(connection, messages.Fail, failures)
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
                reason = bounded(f"result cannot be sent: {exc}", MAX_ERROR_MESSAGE)
                log.warning("job %d failed: UnencodableResult: %s", item[0], reason)
                self._send(connection, messages.Fail, [[item[0], item[1], "UnencodableResult", reason]])

    def _send(
        self, connection: Connection, request_type: type[Complete] | type[messages.Fail], items: list[list[Any]]
    ) -> None:
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
        future.add_done_callback(functools.partial(self._answered, request_type, items))

    def _answered(
        self,
        request_type: type[Complete] | type[messages.Fail],
        items: list[list[Any]],
        future: asyncio.Future[dict[str, Any]],
    ) -> None:
        self._answers.discard(future)
        completions = request_type is Complete
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            log.warning("answers for %d jobs not delivered: %s", len(items), exc)
            return
        stale: list[int] = []
        for index, code in refused_rows(future.result()):
            job_id = items[index][0]
            if code == "result_too_large":  # the broker failed the attempt instead
                log.warning("job %d failed: ResultTooLarge: its result is over the broker's limit", job_id)
                self.completed -= 1
                self.failed += 1
            else:
                stale.append(job_id)
                if completions:
                    self.completed -= 1
                else:
                    self.failed -= 1
        if stale:
            # Taken from this worker meanwhile (cancelled, presumed dead, or a takeover: its
            # leases did not survive): one line for the batch, however many; the jobs run again.
            shown = ", ".join(map(str, stale[:10])) + (f" and {len(stale) - 10} more" if len(stale) > 10 else "")
            log.info("answers refused for %d jobs taken from this worker meanwhile: %s", len(stale), shown)


# Frames of the machinery between the runner and the handler, left out of stored tracebacks.
_MACHINERY = tuple(
    os.path.dirname(module.__file__ or "") + os.sep for module in (asyncio, concurrent.futures, sys.modules[__name__])
)


def handler_traceback(exc: BaseException) -> str:
    """The formatted traceback of a handler's exception, without the worker's own frames,
    bounded to MAX_TRACEBACK characters (the end kept: the frames nearest the raise)."""
    formatted = traceback.TracebackException.from_exception(exc)
    kept = [frame for frame in formatted.stack if not frame.filename.startswith(_MACHINERY)]
    formatted.stack = traceback.StackSummary.from_list(kept)
    # Each line bounded first: a huge message must not push every frame out of the end kept.
    trace = "".join(_bounded_line(line) for line in formatted.format())
    return bounded(trace, MAX_TRACEBACK, keep_end=True)


def _bounded_line(line: str) -> str:
    if len(line) <= _TRACEBACK_LINE:
        return line
    return bounded(line.rstrip("\n"), _TRACEBACK_LINE) + "\n"


class _BadCall(Exception):
    """A job this worker cannot even call: unknown task, malformed payload, wrong arguments."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


def _text(exc: BaseException) -> str:
    """str(exc), which a handler's own exception class may have broken."""
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__}: str() failed>"


def _as_current_job(row: list[Any], call: Callable[[], Any]) -> Any:
    """In a handler's process: make current_job() this job, then call. (A forked process
    starts with a copy of its parent's context: without this it would show the job that
    was current when the process was made.)"""
    _current_job.set(Job(row, None))
    return call()


def _reason(closed: ConnectionClosed) -> str:
    return f"{closed}: {closed.cause}" if closed.cause is not None else str(closed)
