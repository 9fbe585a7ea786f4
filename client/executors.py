"""Where a worker's plain-function handlers run, seen from one runner slot.

A runaway attempt must end without touching the others: a process slot has a process of its
own, which it kills and replaces; thread slots share one pool (a thread that finishes a job
takes the next queued one without a wake-up: the cheap path), and abandoning a thread (Python
cannot stop one) moves every slot to a fresh pool while the old one finishes what it runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["InlineSlot", "ProcessSlot", "SharedSlot", "Slot", "ThreadPool", "ThreadSlot"]


class Slot(Protocol):
    """Runs one handler call at a time for one runner of the worker. The runner calls
    abandon() whenever it stops awaiting run() early (time limit, lease lost, shutdown)."""

    async def run(self, call: Callable[[], Any]) -> Any:
        """What `call()` returns; its exception propagates. For a process slot, `call` must
        pickle (a module-level function, or a partial of one)."""
        ...

    def abandon(self) -> None:
        """Give up the call in progress (its time is up or its lease is gone); the next run()
        must not wait for it."""
        ...

    def close(self) -> None: ...


class InlineSlot:
    """On the event loop itself: no hand-off cost, but a slow handler stops heartbeats and
    cannot be interrupted."""

    async def run(self, call: Callable[[], Any]) -> Any:
        return call()

    def abandon(self) -> None:
        pass  # the call already returned: the loop was blocked while it ran

    def close(self) -> None:
        pass


class ThreadPool:
    """The thread pool that a worker's thread slots share, replaced when a thread is abandoned."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.executor = self._new()

    def _new(self) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(self.size, thread_name_prefix="jobbroker-worker")

    def replace(self) -> None:
        # The abandoned thread runs on until its handler returns (nothing can stop it), as do
        # the other jobs of the old pool; new jobs go to a fresh pool with every thread free.
        self.executor.shutdown(wait=False)
        self.executor = self._new()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class ThreadSlot:
    """A thread of the worker's shared pool; current_job() works inside (the runner's context
    is copied)."""

    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool

    async def run(self, call: Callable[[], Any]) -> Any:
        in_context = functools.partial(contextvars.copy_context().run, call)
        return await asyncio.get_running_loop().run_in_executor(self._pool.executor, in_context)

    def abandon(self) -> None:
        self._pool.replace()

    def close(self) -> None:
        self._pool.close()


class ProcessSlot:
    """A process of its own, killed and replaced when its call is abandoned or when it dies."""

    def __init__(self) -> None:
        self._pool = _process_pool()
        self._pid: int | None = None

    async def run(self, call: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        try:
            if self._pid is None:  # learnt once per process, so that abandon() can kill it
                self._pid = await loop.run_in_executor(self._pool, os.getpid)
            return await loop.run_in_executor(self._pool, call)
        except concurrent.futures.process.BrokenProcessPool:
            self._replace()  # the process died under the handler (crash, killed): a fresh one
            raise

    def abandon(self) -> None:
        if self._pid is not None:
            try:
                os.kill(self._pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            except ProcessLookupError:
                pass
        self._replace()

    def _replace(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = _process_pool()
        self._pid = None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _process_pool() -> concurrent.futures.ProcessPoolExecutor:
    return concurrent.futures.ProcessPoolExecutor(1, initializer=_handler_process_setup)


def _handler_process_setup() -> None:
    """In a handler's process, first: take the default signal handlers back (a forked child
    inherits the worker's, which only the worker's event loop acts on) and, on Linux, die with
    the worker, so that a worker killed with -9 leaves no handler process behind."""
    for name in ("SIGTERM", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # not fatal: the process still ends with its pool


class SharedSlot:
    """An executor of the caller's, shared by every slot: an abandoned call runs on in it."""

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self._executor = executor

    async def run(self, call: Callable[[], Any]) -> Any:
        if isinstance(self._executor, concurrent.futures.ThreadPoolExecutor):
            call = functools.partial(contextvars.copy_context().run, call)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def abandon(self) -> None:
        pass  # not ours to kill

    def close(self) -> None:
        pass  # the caller's to shut down
