"""Tasks by name: `@task` turns a function into a job type that producers submit by name and
workers dispatch by name (docs/protocol.md, "Tasks").

    @task(queue="math", max_attempts=5)
    def add(a, b):
        return a + b

    job_id = await add.submit(client, 2, 3)          # payload {"task": "add", "args": [2, 3], "kwargs": {}}
    await add.options(delay=5).submit(client, 1, 1)  # options for one submit
    results = await add.map(client, [(1, 2), (3, 4)])
    await Worker(tasks=[add]).run()                  # serves "math", calls add(*args, **kwargs)

A task stays callable: `add(2, 3)` is 5, here and now.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

import msgpack
from jobbroker.broker.errors import Retry, TimeLimitExceeded, UnencodablePayload, UsageError

if TYPE_CHECKING:
    from jobbroker.client.client import Client
    from jobbroker.client.serializers import Serializer

__all__ = ["DEFAULT_QUEUE", "Task", "TaskOptions", "task", "task_payload", "tasks_of_module"]

DEFAULT_QUEUE = "default"

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclasses.dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task's jobs are submitted and run. Unset (None) options take the defaults of the
    worker (timeout) or of the broker (max_attempts, backoff).

    retry_on / no_retry: exception types. An exception that is an instance of `no_retry`
    ends the job dead at once; when `retry_on` is given, only its exceptions are retried and
    any other ends the job at once.
    """

    queue: str = DEFAULT_QUEUE
    priority: int = 0
    delay: float = 0.0
    max_attempts: int | None = None
    backoff: float | None = None
    timeout: float | None = None
    result_ttl: float | None = None
    max_backoff: float | None = None
    after: tuple[int, ...] | None = None  # for one submit: add.options(after=[job_id]).submit(...)
    after_policy: str = "done"
    retry_on: tuple[type[BaseException], ...] | None = None
    no_retry: tuple[type[BaseException], ...] = ()

    def submit_options(self) -> dict[str, Any]:
        """The keyword arguments of Client.submit these options stand for."""
        return {
            "priority": self.priority,
            "delay": self.delay,
            "max_attempts": self.max_attempts,
            "backoff": self.backoff,
            "timeout": self.timeout,
            "result_ttl": self.result_ttl,
            "max_backoff": self.max_backoff,
            "after": self.after,
            "after_policy": self.after_policy,
        }

    def is_final(self, exc: BaseException) -> bool:
        """Whether a failure with `exc` ends the job without a retry. A time limit is retried
        by max_attempts whatever these say (TimeLimitExceeded is also a TimeoutError and an
        OSError), unless no_retry names TimeLimitExceeded itself."""
        if isinstance(exc, Retry):  # the handler asked for a retry: it is not filtered
            return False
        if isinstance(exc, TimeLimitExceeded):
            return TimeLimitExceeded in self.no_retry
        if isinstance(exc, self.no_retry):
            return True
        return self.retry_on is not None and not isinstance(exc, self.retry_on)


def task_payload(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The payload of a call of task `name` (the wire convention, docs/protocol.md "Tasks")."""
    return {"task": name, "args": list(args), "kwargs": dict(kwargs)}


class Task(Generic[_P, _R]):
    """A function that producers submit by name and workers run. Call it to run it here."""

    def __init__(self, func: Callable[_P, _R], name: str, options: TaskOptions) -> None:
        self.func = func
        self.name = name
        self.default_options = options
        self.is_coroutine = inspect.iscoroutinefunction(func)
        self.signature = inspect.signature(func)
        functools.update_wrapper(self, func)

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return self.func(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} on queue {self.default_options.queue!r}>"

    def __reduce__(self) -> tuple[Any, ...]:
        # By reference, as functions are pickled: a process pool's child imports the module.
        return (_task_named, (self.func.__module__, self.func.__qualname__))

    @property
    def queue(self) -> str:
        return self.default_options.queue

    def options(self, **changes: Any) -> BoundTask[_P, _R]:
        """This task with other options for the submits made through the result:
        `add.options(delay=5, priority=9).submit(client, 1, 2)`. Takes TaskOptions' fields."""
        try:
            return BoundTask(self, dataclasses.replace(self.default_options, **changes))
        except TypeError as exc:
            raise UsageError(f"task options: {exc}") from None

    async def submit(self, client: Client, *args: _P.args, **kwargs: _P.kwargs) -> int:
        """Submit one call; returns the job id."""
        return await BoundTask(self, self.default_options).submit(client, *args, **kwargs)

    async def submit_many(self, client: Client, calls: Iterable[Sequence[Any]]) -> list[int]:
        """Submit one job per argument tuple, in one frame, all or none."""
        return await BoundTask(self, self.default_options).submit_many(client, calls)

    async def map(self, client: Client, calls: Iterable[Sequence[Any]], *, timeout: float | None = None) -> list[Any]:
        """Submit one job per argument tuple and return their results in order."""
        return await BoundTask(self, self.default_options).map(client, calls, timeout=timeout)

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raises TypeError if the function cannot be called with these arguments."""
        self.signature.bind(*args, **kwargs)


class BoundTask(Generic[_P, _R]):
    """A task with the options of some submits (Task.options)."""

    def __init__(self, task: Task[_P, _R], options: TaskOptions) -> None:
        self.task = task
        self.options = options

    async def submit(self, client: Client, *args: _P.args, **kwargs: _P.kwargs) -> int:
        payload = task_payload(self.task.name, args, kwargs)
        try:
            return await client.submit(self.options.queue, payload, **self.options.submit_options())
        except UnencodablePayload as exc:
            raise _name_the_argument(self.task.name, args, kwargs, client.serializer) or exc from None

    async def submit_many(self, client: Client, calls: Iterable[Sequence[Any]]) -> list[int]:
        payloads = [task_payload(self.task.name, args, {}) for args in calls]
        return await client.submit_many(self.options.queue, payloads, **self.options.submit_options())

    async def map(self, client: Client, calls: Iterable[Sequence[Any]], *, timeout: float | None = None) -> list[Any]:
        payloads = [task_payload(self.task.name, args, {}) for args in calls]
        options = self.options
        return await client.map(
            options.queue,
            payloads,
            timeout=timeout,
            priority=options.priority,
            max_attempts=options.max_attempts,
            job_timeout=options.timeout,
        )


@overload
def task(func: Callable[_P, _R], /) -> Task[_P, _R]: ...


@overload
def task(
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    max_attempts: int | None = None,
    backoff: float | None = None,
    timeout: float | None = None,
    result_ttl: float | None = None,
    max_backoff: float | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    no_retry: tuple[type[BaseException], ...] = (),
) -> Callable[[Callable[_P, _R]], Task[_P, _R]]: ...


def task(
    func: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    max_attempts: int | None = None,
    backoff: float | None = None,
    timeout: float | None = None,
    result_ttl: float | None = None,
    max_backoff: float | None = None,
    retry_on: tuple[type[BaseException], ...] | None = None,
    no_retry: tuple[type[BaseException], ...] = (),
) -> Any:
    """Make a function (plain or coroutine) a task, bare (`@task`) or with defaults
    (`@task(queue="math", max_attempts=5, timeout=60)`).

    Args:
        name: the name producers submit it by (default: the function's __name__).
        queue: the queue its jobs go to (default "default").
        priority, max_attempts, backoff, timeout, result_ttl, max_backoff: defaults of its
            submits (see Client.submit).
        retry_on, no_retry: which exceptions are retried (see TaskOptions).
    """
    options = TaskOptions(
        queue=queue,
        priority=priority,
        max_attempts=max_attempts,
        backoff=backoff,
        timeout=timeout,
        result_ttl=result_ttl,
        max_backoff=max_backoff,
        retry_on=retry_on,
        no_retry=no_retry,
    )

    def make(function: Callable[..., Any]) -> Task[Any, Any]:
        if isinstance(function, Task):
            raise UsageError(f"{function.name} is a task already")
        return Task(function, name or function.__name__, options)

    return make if func is None else make(func)


def tasks_of_module(module_name: str) -> list[Task[Any, Any]]:
    """Every task defined at the top level of a module (for `jobbroker worker myapp.tasks`).

    Raises:
        UsageError: the module cannot be imported or defines no task.
    """
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r}: {exc}") from exc
    found = [value for value in vars(module).values() if isinstance(value, Task)]
    if not found:
        raise UsageError(f"module {module_name!r} defines no @task")
    return found


def _name_the_argument(
    name: str, args: Sequence[Any], kwargs: Mapping[str, Any], serializer: Serializer | None
) -> UnencodablePayload | None:
    """Which argument of a task call cannot be encoded, as an error naming it."""
    encode = serializer.dumps if serializer is not None else functools.partial(msgpack.packb, use_bin_type=True)
    named: list[tuple[str, Any]] = [(f"argument {i + 1}", value) for i, value in enumerate(args)]
    named += [(f"argument {key!r}", value) for key, value in kwargs.items()]
    for label, value in named:
        try:
            encode(value)
        except (TypeError, ValueError, OverflowError) as exc:
            hint = "" if serializer is not None else "; give Client(serializer=...) for such types"
            return UnencodablePayload(f"{label} of {name}() ({type(value).__name__}) cannot be encoded: {exc}{hint}")
    return None


def _task_named(module_name: str, qualname: str) -> Task[Any, Any]:
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not isinstance(target, Task):
        raise TypeError(f"{module_name}.{qualname} is not a task")
    return target
