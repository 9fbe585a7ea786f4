import pytest
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
