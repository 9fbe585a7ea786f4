from jobbroker.broker.core.jobs import Job, JobState
from jobbroker.broker.core.records import RATE_WINDOW, Queue, RunTimes, Session


def job(job_id: int, priority: int = 0, state: JobState = JobState.PENDING) -> Job:
    return Job(job_id, "q", None, priority=priority, max_attempts=3, lease_seconds=30, backoff=1, key=None, state=state)


def test_pop_takes_the_highest_priority_then_the_oldest_and_skips_jobs_no_longer_pending() -> None:
    queue = Queue("q")
    jobs = [job(1), job(2, priority=5), job(3), job(4, priority=5)]
    for j in jobs:
        queue.push(j)
    jobs[1].state = JobState.CANCELLED
    queue.push(job(5), front=True)  # handed back: first of its priority
    assert [queue.pop().id for _ in range(4)] == [4, 5, 1, 3]  # type: ignore[union-attr]
    assert queue.pop() is None
    assert queue.pending == {} and queue.priorities == []


def test_counts_per_state_and_idleness() -> None:
    queue = Queue("q")
    assert queue.idle
    queue.delayed_count = 2
    queue.dead[9] = job(9, state=JobState.DEAD)
    assert queue.count(JobState.DELAYED) == 2 and queue.count(JobState.DEAD) == 1
    assert queue.count(JobState.PENDING) == 0
    assert not queue.idle


def test_rates_cover_the_whole_window_from_the_samples() -> None:
    queue = Queue("q", now=0.0)
    queue.submitted = 50
    queue.sample(1.0)
    queue.submitted, queue.completed = 150, 100
    queue.sample(5.0)
    assert queue.rates(5.0) == (150 / RATE_WINDOW, 100 / RATE_WINDOW)
    queue.sample(30.0)
    assert queue.rates(30.0) == (0.0, 0.0)  # nothing changed in the last window
    assert len(queue.rate_samples) <= 2  # old samples are dropped


def test_run_times_fall_in_their_buckets() -> None:
    times = RunTimes()
    times.observe(0.001)
    times.observe(1000.0)
    assert times.counts[0] == 1 and times.counts[-1] == 1 and times.total == 1000.001


def test_a_session_has_credit_up_to_its_prefetch() -> None:
    session = Session(1, "w", "127.0.0.1:1", now=0.0)
    session.prefetch = 2
    session.leased[1] = job(1, state=JobState.LEASED)
    assert session.credit == 1
