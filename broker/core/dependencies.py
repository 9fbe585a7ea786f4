"""Jobs that run after others (docs/protocol.md, "after"): a waiting job counts the jobs it
still waits for; when one ends, its result is handed down, and a job whose parent did not
succeed is cancelled (unless it runs anyway), and so on down the chain. Pure: `now` passed in.
"""

from __future__ import annotations

from collections.abc import Callable

from jobbroker.broker.core.jobs import FINAL_STATES, Job, JobEvent, JobState
from jobbroker.broker.core.lifecycle import Lifecycle
from jobbroker.broker.core.limits import failure

__all__ = ["Dependencies"]

_WAITING = JobState.WAITING
_DONE = JobState.DONE


class Dependencies:
    """Which waiting jobs run after which job.

    Args:
        lifecycle: the books, to move a job that may run, or is cancelled.
        finish: what the scheduler does when a job reaches done or cancelled (tell its
            watchers; with cascade, settle its own dependents).
    """

    def __init__(self, lifecycle: Lifecycle, finish: Callable[..., None]) -> None:
        self._lifecycle = lifecycle
        self._finish = finish
        self.dependents: dict[int, list[Job]] = {}  # job id -> the waiting jobs that run after it

    def wait_for(self, job: Job, parents: list[Job], run_anyway: bool, now: float, *, restored: bool = False) -> None:
        """A job runs after `parents`: note what has ended already, wait for the rest. A
        restored job keeps its parents and the results stored."""
        if not restored:
            job.parents = [parent.id for parent in parents]
            job.parent_results = [None] * len(parents)
        assert job.parents is not None and job.parent_results is not None
        job.run_anyway = run_anyway
        failed: Job | None = None
        for parent in {parent.id: parent for parent in parents}.values():  # one wait per job named
            if parent.state in FINAL_STATES:
                if parent.state is _DONE:
                    for index, parent_id in enumerate(job.parents):
                        if parent_id == parent.id:
                            job.parent_results[index] = parent.result
                elif failed is None:
                    failed = parent
            else:
                job.waiting_on += 1
                waiting = self.dependents.setdefault(parent.id, [])
                if not waiting or waiting[-1] is not job:  # named twice: one entry
                    waiting.append(job)
        if failed is not None and not run_anyway:
            self.cancel(job, failed, now)
        elif job.waiting_on == 0:
            self._lifecycle.move(job, JobEvent.READY, now)

    def settle(self, ended: Job, now: float) -> None:
        """A job ended: the jobs waiting for it get its result, run if nothing else holds them,
        or are cancelled if it did not succeed (unless they run anyway), and so on down their
        own dependents: iteratively, for chains of any length."""
        lifecycle = self._lifecycle
        stack = [ended]
        while stack:
            parent = stack.pop()
            for child in self.dependents.pop(parent.id, ()):
                if child.state is not _WAITING:  # cancelled meanwhile
                    continue
                assert child.parents is not None and child.parent_results is not None
                for index, parent_id in enumerate(child.parents):
                    if parent_id == parent.id and parent.state is _DONE:
                        child.parent_results[index] = parent.result
                if lifecycle.track_changes:
                    lifecycle.changes.update(child)
                if parent.state is not _DONE and not child.run_anyway:
                    self.cancel(child, parent, now, cascade=False)
                    stack.append(child)
                    continue
                child.waiting_on -= 1
                if child.waiting_on == 0:
                    lifecycle.move(child, JobEvent.READY, now)

    def cancel(self, job: Job, failed: Job, now: float, *, cascade: bool = True) -> None:
        """Cancel `job`: `failed`, which it runs after, did not succeed."""
        job.error = failure("DependencyFailed", f"job {failed.id}, which it runs after, ended {failed.state}")
        self._lifecycle.move(job, JobEvent.CANCEL, now)
        self._finish(job, now, cascade=cascade)
