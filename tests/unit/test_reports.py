from typing import Any

import pytest
from jobbroker.broker.core import reports
from jobbroker.broker.core.jobs import Job, JobState
from jobbroker.broker.core.records import Queue, Session
from jobbroker.broker.errors import InvalidRequest


def job(job_id: int, state: JobState, **fields: Any) -> Job:
    j = Job(job_id, "q", None, priority=0, max_attempts=3, lease_seconds=30, backoff=1, key=None, state=state)
    for name, value in fields.items():
        setattr(j, name, value)
    return j


def test_stats_are_exact_values_a_display_rounds() -> None:
    queue = Queue("q", now=0.0)
    queue.submitted = 1
    queue.sample(0.5)
    worker = Session(2, "w", "peer", now=0.0)
    worker.queues = ("q",)
    worker.leased[1] = job(1, JobState.LEASED, started_at=0.0, delivered_at=0.0)
    stats = reports.stats({"q": queue}, [worker], jobs=1, draining=False, now=1.23456)
    assert stats["queues"]["q"]["submitted_per_second"] == 0.1
    assert stats["workers"][0]["last_heartbeat_age"] == 1.23456
    assert stats["workers"][0]["running"][0]["running_seconds"] == 1.23456
    assert stats["queues"]["q"]["workers"] == 1 and stats["sessions"] == 1


def test_job_list_pages_by_id_and_shows_an_owner_its_own() -> None:
    queue = Queue("q")
    pending = [job(i, JobState.PENDING, owner="a" if i % 2 else "b") for i in range(1, 8)]
    for j in pending[:5]:
        queue.push(j)
    unstored = pending[5:]
    page = reports.job_list(queue, "pending", jobs=[], sessions=[], unstored=unstored, after=2, limit=3, owner=None)
    assert [row["id"] for row in page] == [3, 4, 5]
    mine = reports.job_list(queue, "pending", jobs=[], sessions=[], unstored=unstored, after=0, limit=10, owner="a")
    assert [row["id"] for row in mine] == [1, 3, 5, 7]
    assert "payload" not in mine[0]
    with pytest.raises(InvalidRequest):
        reports.job_list(queue, "done", jobs=[], sessions=[], unstored=[], after=0, limit=10, owner=None)
    assert reports.job_list(None, "dead", jobs=[], sessions=[], unstored=[], after=0, limit=10, owner=None) == []


def test_dead_list_is_oldest_first_and_bounded() -> None:
    queue = Queue("q")
    for i in (3, 1, 2):
        queue.dead[i] = job(i, JobState.DEAD, error={"type": "E", "message": "m"})
    assert [row["id"] for row in reports.dead_list(queue, 2)] == [3, 1]
    assert reports.dead_list(queue, 0) == [] and reports.dead_list(None, 5) == []


def test_describe_names_the_worker_holding_the_job() -> None:
    worker = Session(2, "", "10.0.0.1:5", now=0.0)
    info = reports.describe(job(1, JobState.LEASED, worker=2), {2: worker})
    assert info["worker_name"] == "worker (10.0.0.1:5)" and info["state"] == "leased"
    assert reports.describe(job(1, JobState.PENDING), {})["worker_name"] is None


def test_metrics_count_workers_apart_from_sessions() -> None:
    worker, producer = Session(1, "w", "p", 0.0), Session(2, "p", "p", 0.0)
    worker.queues = ("q",)
    metrics = reports.metrics({"q": Queue("q")}, [worker, producer])
    assert metrics["workers"] == 1 and metrics["sessions"] == 2
    assert metrics["queues"]["q"]["pending"] == 0 and metrics["queues"]["q"]["paused"] is False
