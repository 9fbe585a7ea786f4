from typing import Any

import pytest
from jobbroker.broker.core import jobs
from jobbroker.broker.core.jobs import TRANSITIONS, Job, JobEvent, JobState, transition
from jobbroker.broker.errors import InvalidTransition


def make_job(state: JobState) -> Job:
    return Job(1, "q", None, priority=0, max_attempts=3, lease_seconds=30, backoff=1, key=None, state=state)


@pytest.mark.parametrize(("state", "event"), list(TRANSITIONS))
def test_every_table_row_is_a_legal_transition(state: JobState, event: JobEvent) -> None:
    job = make_job(state)
    transition(job, event)
    assert job.state is TRANSITIONS[state, event]


@pytest.mark.parametrize(
    ("state", "event"),
    [(s, e) for s in JobState for e in JobEvent if (s, e) not in TRANSITIONS],
)
def test_everything_else_is_refused(state: JobState, event: JobEvent) -> None:
    job = make_job(state)
    with pytest.raises(InvalidTransition):
        transition(job, event)
    assert job.state is state


def test_final_states_have_no_way_out_but_revival_from_dead() -> None:
    leaving = {state for state, _ in TRANSITIONS}
    assert JobState.DONE not in leaving and JobState.CANCELLED not in leaving
    assert {e for s, e in TRANSITIONS if s is JobState.DEAD} == {JobEvent.REVIVE}


def _job(job_id: int = 1, **options: Any) -> Job:
    return Job(job_id, "q", b"p", state=JobState.PENDING, **options)


def test_jobs_submitted_alike_share_one_options_record() -> None:
    first, second = _job(1, max_attempts=3, lease_seconds=5.0), _job(2, max_attempts=3, lease_seconds=5.0)
    assert first.options is second.options
    assert (first.max_attempts, first.lease_seconds, first.priority) == (3, 5.0, 0)
    assert _job(3, max_attempts=4).options is not first.options


def test_the_interned_options_stay_bounded_and_jobs_keep_theirs() -> None:
    """A peer sending a new lease with every submit cannot grow the table without bound."""
    first = _job(1, lease_seconds=0.5)
    for n in range(jobs._INTERNED_MAX + 10):
        _job(n, lease_seconds=1.0 + n)
    assert len(jobs._INTERNED) <= jobs._INTERNED_MAX
    assert first.lease_seconds == 0.5


def test_extras_are_made_on_the_first_value_other_than_the_default_and_never_shared() -> None:
    plain, watched = _job(1), _job(2)
    plain.watchers = None
    plain.waiting_on = 0
    assert plain.extras is jobs._NO_EXTRAS  # defaults written: nothing made
    watched.watchers = [7]
    watched.unstarted_losses += 1
    assert watched.extras is not jobs._NO_EXTRAS
    assert (watched.watchers, watched.unstarted_losses) == ([7], 1)
    assert (plain.watchers, plain.unstarted_losses, _job(3).watchers) == (None, 0, None)
    assert _job(4, key="k").key == "k" and _job(5).key is None
