"""Change tracking for a durable store: which jobs, queue controls and schedules to write
since the last take (docs/protocol.md, "Durability"). The scheduler records; the store
(broker/store/rows.py) turns a Changes into rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jobbroker.broker.core.controls import QueueControls
from jobbroker.broker.core.jobs import Job

__all__ = ["Changes"]


@dataclass(slots=True)
class Changes:
    """What a durable store must write. Each job appears once: `created` jobs in their
    current state (created and changed since the last take), `updated` jobs whose state,
    attempts, result, error or times changed, and the ids of jobs `forgotten`."""

    created: dict[int, Job] = field(default_factory=dict)
    updated: dict[int, Job] = field(default_factory=dict)
    forgotten: list[int] = field(default_factory=list)
    # queue name -> its controls as they are now (None: none set any more)
    controls: dict[str, QueueControls | None] = field(default_factory=dict)
    # schedule name -> its record as it is now (None: removed)
    schedules: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.created or self.updated or self.forgotten or self.controls or self.schedules)

    def __contains__(self, job_id: object) -> bool:
        """Whether the job has a change not yet taken."""
        return job_id in self.created or job_id in self.updated

    def create(self, job: Job) -> None:
        self.created[job.id] = job

    def update(self, job: Job) -> None:
        """The job changed; a job created since the last take is written as it is then anyway."""
        if job.id not in self.created:
            self.updated[job.id] = job

    def forget(self, job_id: int) -> None:
        self.updated.pop(job_id, None)
        if self.created.pop(job_id, None) is None:  # never written: nothing to delete
            self.forgotten.append(job_id)
