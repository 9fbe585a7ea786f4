from jobbroker.broker.core.changes import Changes
from jobbroker.broker.core.jobs import Job, JobState


def job(job_id: int) -> Job:
    return Job(
        job_id, "q", None, priority=0, max_attempts=3, lease_seconds=30, backoff=1, key=None, state=JobState.PENDING
    )


def test_a_job_created_since_the_last_take_is_written_once_as_created() -> None:
    changes = Changes()
    changes.create(job(1))
    changes.update(changes.created[1])
    assert list(changes.created) == [1] and not changes.updated
    assert 1 in changes and 2 not in changes


def test_forgetting_a_job_never_written_leaves_nothing_to_delete() -> None:
    changes = Changes()
    changes.create(job(1))
    changes.forget(1)
    assert not changes


def test_forgetting_a_stored_job_drops_its_update_and_deletes_it() -> None:
    changes = Changes()
    changes.update(job(2))
    changes.forget(2)
    assert not changes.updated and changes.forgotten == [2] and changes
