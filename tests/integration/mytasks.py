"""Tasks that the integration tests serve from real worker processes (`jobbroker worker mytasks`)."""

from __future__ import annotations

import asyncio

from jobbroker import Fail, Retry, current_job, task


@task(queue="math")
def add(a: int, b: int) -> int:
    return a + b


@task(queue="math")
async def mul(a: int, b: int = 1) -> int:
    await asyncio.sleep(0)
    return a * b


@task(queue="math", max_attempts=5, backoff=0.0)
def flaky(marker: str) -> str:
    """Asks to be retried in 0.2 s on its first two attempts."""
    attempt = current_job().attempt
    if attempt < 3:
        raise Retry(delay=0.2, reason=f"not yet ({marker})")
    return f"done on attempt {attempt}"


@task(queue="math", max_attempts=5)
def refuse(reason: str) -> None:
    raise Fail(reason)


@task(queue="math", max_attempts=5, backoff=0.0, no_retry=(ValueError,))
def strict(n: int) -> int:
    raise ValueError(f"{n} is not acceptable")


@task(queue="math", max_attempts=3, backoff=0.0, retry_on=(ConnectionError,))
def picky(kind: str) -> None:
    raise ConnectionError("try again") if kind == "connection" else KeyError(kind)


@task(queue="flow")
def double(n: int) -> int:
    return 2 * n


@task(queue="flow")
def plus_one_of_previous() -> int:
    """A link of a chain: the result of the job it runs after, plus one."""
    (previous,) = current_job().parent_results or [0]
    return previous + 1


@task(queue="flow")
async def total() -> int:
    """The reduce of a chord: the sum of the results of the jobs it runs after."""
    return sum(r for r in current_job().parent_results or [] if r is not None)  # None: a part that failed


@task(queue="flow", max_attempts=1)
def broken() -> None:
    raise RuntimeError("this part fails")
