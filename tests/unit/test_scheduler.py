"""The job core on a fake clock: no sockets, no sleeping."""

from __future__ import annotations

from typing import Any

import pytest
from jobbroker.broker.core.clock import FakeClock
from jobbroker.broker.core.scheduler import (
    WORKER_JOBS_SHOWN,
    Deliver,
    JobBuried,
    ProgressReady,
    ResultsReady,
    Revoke,
    Scheduler,
    SchedulerConfig,
    SessionExpired,
    TimeLimitHit,
    WorkerLost,
)
from jobbroker.broker.errors import InvalidRequest, JobNotFound, LimitExceeded, QueueFull

PRODUCER, WORKER_A, WORKER_B = 1, 2, 3


class Harness:
    def __init__(self, **config: Any) -> None:
        self.clock = FakeClock()
        self.scheduler = Scheduler(SchedulerConfig(**config))
        for session in (PRODUCER, WORKER_A, WORKER_B):
            self.scheduler.open_session(session, self.now)

    @property
    def now(self) -> float:
        return self.clock.now()

    def submit(self, payloads: list[Any], queue: str = "q", **options: Any) -> list[int]:
        return self.scheduler.submit(PRODUCER, queue, payloads, self.now, **options)

    def flush(self) -> list[Any]:
        return self.scheduler.flush(self.now)

    def deliveries(self) -> dict[int, list[list[Any]]]:
        return {e.session: e.jobs for e in self.flush() if isinstance(e, Deliver)}

    def jump(self, seconds: float, alive: tuple[int, ...] = (PRODUCER, WORKER_A, WORKER_B)) -> list[Any]:
        """Move time on; the sessions in `alive` heartbeat meanwhile."""
        self.clock.jump(seconds)
        for session in alive:
            self.scheduler.seen(session, self.now)
        self.scheduler.tick(self.now)
        return self.flush()

    def stats(self, queue: str = "q") -> dict[str, Any]:
        return self.scheduler.stats(self.now)["queues"][queue]


def ids(jobs: list[list[Any]]) -> list[int]:
    return [job[0] for job in jobs]


def test_priority_first_then_fifo() -> None:
    h = Harness()
    low = h.submit(["l1", "l2"], priority=0)
    high = h.submit(["h1", "h2"], priority=10)
    mid = h.submit(["m1"], priority=5)
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    assert ids(h.deliveries()[WORKER_A]) == high + mid + low


def test_deliveries_respect_prefetch_and_resume_on_completion() -> None:
    h = Harness()
    h.submit(list(range(5)))
    h.scheduler.reserve(WORKER_A, ["q"], 2, h.now)
    first = h.deliveries()[WORKER_A]
    assert len(first) == 2
    assert h.deliveries() == {}
    job_id, token = first[0][0], first[0][1]
    assert h.scheduler.complete(WORKER_A, [[job_id, token, "r"]], h.now) == [None]
    assert len(h.deliveries()[WORKER_A]) == 1


def test_round_robin_across_waiting_workers() -> None:
    h = Harness()
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    h.scheduler.reserve(WORKER_B, ["q"], 10, h.now)
    h.submit(list(range(6)))
    delivered = h.deliveries()
    assert len(delivered[WORKER_A]) == 3 and len(delivered[WORKER_B]) == 3


def test_delivery_carries_lease_token_attempt_payload_and_time_limit() -> None:
    h = Harness()
    (job_id,) = h.submit([{"n": 7}], lease=12.0, timeout=60.0)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    ((delivered_id, token, queue, payload, attempt, lease, timeout, parents),) = h.deliveries()[WORKER_A]
    assert (delivered_id, queue, payload, attempt, lease, timeout, parents) == (
        job_id,
        "q",
        {"n": 7},
        1,
        12.0,
        60.0,
        None,
    )
    assert token > 0


def test_a_live_worker_keeps_its_jobs_however_long_they_run() -> None:
    h = Harness(heartbeat=1.0)
    (job_id,) = h.submit(["x"], lease=1.0)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    h.scheduler.started(WORKER_A, [[job_id, token]], h.now)
    for _ in range(100):  # 100 s of a 1 s lease, the worker heartbeating
        assert h.jump(1.0) == []
    assert h.scheduler.job_info(job_id)["state"] == "leased"
    assert h.scheduler.complete(WORKER_A, [[job_id, token, "r"]], h.now) == [None]
    info = h.scheduler.job_info(job_id)
    assert info["state"] == "done" and info["attempts"] == 1


def test_an_attempt_counts_from_its_start_not_its_delivery() -> None:
    h = Harness()
    first, second = h.submit(["a", "b"])
    h.scheduler.reserve(WORKER_A, ["q"], 2, h.now)
    delivered = h.deliveries()[WORKER_A]
    assert [d[4] for d in delivered] == [1, 1]  # the attempt each will be if it starts
    assert h.scheduler.started(WORKER_A, [[first, delivered[0][1]]], h.now) == [None]
    assert h.scheduler.job_info(first)["attempts"] == 1
    assert h.scheduler.job_info(second)["attempts"] == 0  # buffered: nothing used
    (worker,) = h.scheduler.stats(h.now)["workers"]
    assert [(r["id"], r["started"]) for r in worker["running"]] == [(first, True), (second, False)]
    # A worker dying with the buffered job does not spend its attempt; the started one is spent.
    h.scheduler.close_session(WORKER_A, h.now)
    assert h.scheduler.job_info(first)["attempts"] == 1
    assert h.scheduler.job_info(second)["attempts"] == 0
    h.scheduler.reserve(WORKER_B, ["q"], 2, h.now)
    assert sorted((d[0], d[4]) for d in h.deliveries()[WORKER_B]) == [(first, 2), (second, 1)]


def test_an_answer_implies_the_start() -> None:
    h = Harness()
    (job_id,) = h.submit(["x"])
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    assert h.scheduler.fail(WORKER_A, [[job_id, token, "E", "m"]], h.now) == [None]
    assert h.scheduler.job_info(job_id)["attempts"] == 1


def test_time_limit_is_the_brokers_backstop_after_the_workers_grace() -> None:
    h = Harness(heartbeat=1.0)
    (job_id,) = h.submit(["x"], timeout=10.0, max_attempts=2, backoff=0.0)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    h.jump(5.0)  # waiting in the buffer: the limit has not started
    h.scheduler.started(WORKER_A, [[job_id, token]], h.now)
    grace = h.scheduler.time_limit_grace
    assert h.jump(10.0 + grace - 0.1) == []  # the worker has until then to end it itself
    effects = h.jump(0.1)
    assert TimeLimitHit(job_id, "q", WORKER_A, False) in effects
    assert Revoke(WORKER_A, [[job_id, token, "time limit"]]) in effects
    info = h.scheduler.job_info(job_id)
    assert info["error"]["type"] == "TimeLimitExceeded" and info["attempts"] == 1
    assert h.scheduler.complete(WORKER_A, [[job_id, token, "late"]], h.now) == ["lease_lost"]


def test_a_stale_worker_is_fenced_after_its_session_dies() -> None:
    h = Harness()
    (job_id,) = h.submit(["x"])
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    stale_token = h.deliveries()[WORKER_A][0][1]
    h.scheduler.started(WORKER_A, [[job_id, stale_token]], h.now)
    h.scheduler.close_session(WORKER_A, h.now)
    h.scheduler.open_session(WORKER_A, h.now)  # the same worker, reconnected: a new session
    h.scheduler.reserve(WORKER_B, ["q"], 1, h.now)
    ((fresh_id, fresh_token, _, _, attempt, _, _, _),) = h.deliveries()[WORKER_B]
    assert fresh_id == job_id and attempt == 2 and fresh_token != stale_token
    assert h.scheduler.complete(WORKER_A, [[job_id, stale_token, "old"]], h.now) == ["lease_lost"]
    assert h.scheduler.fail(WORKER_A, [[job_id, stale_token, "E", "old"]], h.now) == ["lease_lost"]
    assert h.scheduler.complete(WORKER_A, [[job_id, fresh_token, "stolen token"]], h.now) == ["lease_lost"]
    assert h.scheduler.complete(WORKER_B, [[job_id, fresh_token, "new"]], h.now) == [None]
    assert h.scheduler.job_info(job_id)["result"] == "new"
    assert h.scheduler.complete(WORKER_B, [[job_id, fresh_token, "again"]], h.now) == ["lease_lost"]


def test_touch_only_checks_the_lease() -> None:
    h = Harness()
    (job_id,) = h.submit(["x"], lease=10.0)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    assert h.scheduler.touch(WORKER_A, [[job_id, token, 10.0], [job_id, token + 1, 0.0]], h.now) == [
        None,
        "lease_lost",
    ]


def test_failure_keeps_a_bounded_traceback() -> None:
    h = Harness()
    (job_id,) = h.submit(["x"], max_attempts=1)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    trace = "Traceback (most recent call last):\n" + "  frame\n" * 5000 + "ValueError: boom\n"
    h.scheduler.fail(WORKER_A, [[job_id, token, "ValueError", "boom", trace]], h.now)
    error = h.scheduler.job_info(job_id)["error"]
    assert error["type"] == "ValueError" and error["message"] == "boom"
    assert len(error["traceback"]) < 8300 and error["traceback"].endswith("ValueError: boom\n")
    assert error["traceback"].startswith("[... ") and "characters cut" in error["traceback"]


def test_failures_retry_with_exponential_backoff_then_go_dead() -> None:
    h = Harness()
    (job_id,) = h.submit(["x"], max_attempts=3, backoff=2.0)
    h.scheduler.watch(PRODUCER, [job_id])
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    waits = []
    delivered = h.deliveries()[WORKER_A]
    for attempt in (1, 2, 3):
        ((_, token, _, _, delivered_attempt, _, _, _),) = delivered
        assert delivered_attempt == attempt
        assert h.scheduler.fail(WORKER_A, [[job_id, token, "ValueError", f"bad {attempt}"]], h.now) == [None]
        effects = h.flush()
        if attempt < 3:
            waited = 0.0
            while h.scheduler.job_info(job_id)["state"] == "delayed":
                effects = h.jump(0.5)
                waited += 0.5
            waits.append(waited)
            (deliver,) = [e for e in effects if isinstance(e, Deliver)]
            delivered = deliver.jobs
    assert waits == [2.0, 4.0]
    assert JobBuried(job_id, "q", {"type": "ValueError", "message": "bad 3"}) in effects
    assert h.stats()["dead"] == 1
    (dead,) = h.scheduler.dead_list("q")
    assert dead["id"] == job_id and dead["error"]["message"] == "bad 3" and dead["attempts"] == 3


def test_dead_outcome_reaches_watchers_and_dead_jobs_can_be_requeued() -> None:
    h = Harness()
    (job_id,) = h.submit(["x"], max_attempts=1)
    h.scheduler.watch(PRODUCER, [job_id])
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    h.scheduler.fail(WORKER_A, [[job_id, token, "E", "m"]], h.now)
    (results,) = [e for e in h.flush() if isinstance(e, ResultsReady)]
    assert results.items == [[job_id, "dead", {"type": "E", "message": "m"}]]
    assert h.scheduler.dead_requeue("q", None, h.now) == [job_id]
    ((again_id, _, _, _, attempt, _, _, _),) = h.deliveries()[WORKER_A]
    assert again_id == job_id and attempt == 1 and h.stats()["dead"] == 0


def test_worker_lost_requeues_its_leases_at_once() -> None:
    h = Harness()
    submitted = h.submit(list(range(4)))
    h.scheduler.reserve(WORKER_A, ["q"], 4, h.now)
    assert len(h.deliveries()[WORKER_A]) == 4
    h.scheduler.close_session(WORKER_A, h.now)
    h.scheduler.close_session(WORKER_A, h.now)  # idempotent
    h.scheduler.reserve(WORKER_B, ["q"], 10, h.now)
    effects = h.flush()
    (lost,) = [e for e in effects if isinstance(e, WorkerLost)]
    assert sorted(lost.requeued) == submitted
    (deliver,) = [e for e in effects if isinstance(e, Deliver)]
    assert deliver.session == WORKER_B and sorted(ids(deliver.jobs)) == submitted


def test_silent_session_is_declared_dead_after_three_heartbeats() -> None:
    h = Harness(heartbeat=5.0)
    h.submit(["x"])
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    h.deliveries()
    for _ in range(4):  # WORKER_A keeps talking; PRODUCER and WORKER_B do too
        h.clock.jump(4.0)
        for session in (PRODUCER, WORKER_A, WORKER_B):
            h.scheduler.seen(session, h.now)
        h.scheduler.tick(h.now)
        assert not any(isinstance(e, SessionExpired) for e in h.flush())
    effects = h.jump(14.9, alive=(PRODUCER, WORKER_B))
    assert not any(isinstance(e, SessionExpired) for e in effects)
    effects = h.jump(0.2, alive=(PRODUCER, WORKER_B))
    assert SessionExpired(WORKER_A) in effects
    assert any(isinstance(e, WorkerLost) and e.session == WORKER_A for e in effects)
    assert h.stats()["pending"] == 1


def test_a_job_that_keeps_losing_its_worker_goes_dead_instead_of_looping() -> None:
    h = Harness()
    (job_id,) = h.submit(["poison"], max_attempts=2)
    for _ in range(2):
        h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
        ((_, token, *_),) = h.deliveries()[WORKER_A]
        h.scheduler.started(WORKER_A, [[job_id, token]], h.now)
        h.scheduler.close_session(WORKER_A, h.now)
        h.scheduler.open_session(WORKER_A, h.now)
    info = h.scheduler.job_info(job_id)
    assert info["state"] == "dead" and info["error"]["type"] == "LeaseLost"


def test_a_job_whose_workers_die_before_saying_it_started_still_goes_dead() -> None:
    h = Harness()
    (job_id,) = h.submit(["kills its worker at once"], max_attempts=2)
    losses = 0
    while h.scheduler.job_info(job_id)["state"] != "dead":
        h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
        assert ids(h.deliveries()[WORKER_A]) == [job_id]
        h.scheduler.close_session(WORKER_A, h.now)
        h.scheduler.open_session(WORKER_A, h.now)
        losses += 1
    assert losses == 4  # max_attempts losses free, then max_attempts counted


def test_release_hands_back_without_counting_the_attempt() -> None:
    h = Harness()
    first, _ = h.submit(["a", "b"])
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    h.scheduler.reserve(WORKER_A, ["q"], 0, h.now)
    assert h.scheduler.release(WORKER_A, [[first, token]], h.now) == [None]
    h.scheduler.reserve(WORKER_B, ["q"], 1, h.now)
    ((job_id, _, _, _, attempt, _, _, _),) = h.deliveries()[WORKER_B]
    assert (job_id, attempt) == (first, 1)  # back at the front, attempt refunded


def test_delayed_jobs_wait_for_their_time() -> None:
    h = Harness()
    (job_id,) = h.submit(["later"], delay=30.0)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    assert h.deliveries() == {} and h.stats()["delayed"] == 1
    assert h.jump(29.9) == []
    (deliver,) = [e for e in h.jump(0.1) if isinstance(e, Deliver)]
    assert ids(deliver.jobs) == [job_id]


def test_idempotency_keys_return_the_first_id() -> None:
    h = Harness()
    first = h.submit(["a", "b"], keys=["k1", None])
    again = h.submit(["a2", "c"], keys=["k1", "k2"])
    assert again[0] == first[0] and again[1] not in first
    assert h.submit(["x"], queue="other", keys=["k1"]) != [first[0]]  # keys are per queue
    assert h.stats()["submitted"] == 3


def test_queue_full_refuses_the_whole_batch() -> None:
    h = Harness(max_pending_per_queue=3)
    h.submit([1, 2])
    with pytest.raises(QueueFull, match="limit is 3"):
        h.submit([3, 4])
    assert h.stats()["pending"] == 2
    h.submit([3])


def test_cancel_pending_delayed_and_running_jobs() -> None:
    h = Harness()
    running, pending = h.submit(["r", "p"])
    (delayed,) = h.submit(["d"], delay=5.0)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    ((_, token, *_),) = h.deliveries()[WORKER_A]
    h.scheduler.watch(PRODUCER, [pending])
    assert h.scheduler.cancel([pending, delayed, 999, running], h.now) == [None, None, "not_found", None]
    effects = h.flush()
    assert Revoke(WORKER_A, [[running, token, "cancelled"]]) in effects
    (results,) = [e for e in effects if isinstance(e, ResultsReady)]
    assert results.items == [[pending, "cancelled", None]]
    assert h.stats()["pending"] == 0 and h.stats()["delayed"] == 0 and h.stats()["in_flight"] == 0
    assert h.scheduler.complete(WORKER_A, [[running, token, "late"]], h.now) == ["lease_lost"]
    assert h.scheduler.cancel([running], h.now) == ["invalid_state"]  # finished already
    h.scheduler.reserve(WORKER_B, ["q"], 5, h.now)
    assert h.deliveries() == {}  # the cancelled job is skipped
    assert h.jump(10.0) == []


def test_results_are_pushed_to_watchers_and_expire_after_the_ttl() -> None:
    h = Harness(result_ttl=60.0)
    (job_id,) = h.submit([3], watch=True)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    h.scheduler.complete(WORKER_A, [[job_id, token, 9]], h.now)
    (results,) = [e for e in h.flush() if isinstance(e, ResultsReady)]
    assert results == ResultsReady(PRODUCER, [[job_id, "done", 9]])
    h.scheduler.watch(PRODUCER, [job_id])  # a late watcher gets it at once
    assert ResultsReady(PRODUCER, [[job_id, "done", 9]]) in h.flush()
    h.jump(60.0)
    with pytest.raises(JobNotFound):
        h.scheduler.job_info(job_id)
    h.scheduler.watch(PRODUCER, [job_id])
    assert ResultsReady(PRODUCER, [[job_id, "unknown", None]]) in h.flush()


def test_a_worker_on_several_queues() -> None:
    h = Harness()
    a = h.submit(["a"], queue="alpha")
    b = h.submit(["b"], queue="beta")
    h.scheduler.reserve(WORKER_A, ["alpha", "beta"], 10, h.now)
    assert sorted(ids(h.deliveries()[WORKER_A])) == sorted(a + b)


def test_stats_count_states_and_workers() -> None:
    h = Harness()
    h.submit(list(range(3)))
    h.submit(["d"], delay=10)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    h.deliveries()
    stats = h.scheduler.stats(h.now)
    assert {k: stats["queues"]["q"][k] for k in ("pending", "delayed", "in_flight", "dead", "done")} == {
        "pending": 2,
        "delayed": 1,
        "in_flight": 1,
        "dead": 0,
        "done": 0,
    }
    (worker,) = stats["workers"]
    assert worker["session"] == WORKER_A and len(worker["in_flight"]) == 1


def test_stats_show_a_workers_running_jobs_progress_first_and_capped() -> None:
    h = Harness()
    h.submit(list(range(WORKER_JOBS_SHOWN + 5)))
    h.scheduler.reserve(WORKER_A, ["q"], WORKER_JOBS_SHOWN + 5, h.now)
    leased = h.deliveries()[WORKER_A]
    for job_id, token, *_ in leased:
        h.scheduler.started(WORKER_A, [[job_id, token]], h.now)
    h.clock.jump(4.0)
    last_id, last_token = leased[-1][0], leased[-1][1]
    h.scheduler.progress(WORKER_A, [[last_id, last_token, 0.25, "a quarter"]], h.now)
    (worker,) = h.scheduler.stats(h.now)["workers"]
    assert len(worker["in_flight"]) == WORKER_JOBS_SHOWN + 5
    assert len(worker["running"]) == WORKER_JOBS_SHOWN
    first = worker["running"][0]
    assert first["id"] == last_id and first["progress"] == {"fraction": 0.25, "message": "a quarter"}
    assert first["running_seconds"] == 4.0 and first["queue"] == "q" and first["attempts"] == 1
    assert all(job["progress"] is None for job in worker["running"][1:])


@pytest.mark.parametrize(
    "options",
    [
        {"queue": ""},
        {"queue": "x" * 201},
        {"queue": "bad\nname"},
        {"delay": -1.0},
        {"max_attempts": 0},
        {"lease": 0.0},
        {"timeout": 0.0},
        {"keys": ["only-one"]},
        {"keys": ["", None]},
    ],
)
def test_bad_submits_are_refused(options: dict[str, Any]) -> None:
    h = Harness()
    queue = options.pop("queue", "q")
    with pytest.raises(InvalidRequest):
        h.scheduler.submit(PRODUCER, queue, [1, 2], h.now, **options)


def test_million_jobs_flow_without_sleeping() -> None:
    h = Harness()
    h.scheduler.reserve(WORKER_A, ["q"], 1000, h.now)
    total = 0
    for _ in range(20):
        h.submit(list(range(1000)))
        for job_id, token, *_ in h.deliveries().get(WORKER_A, []):
            h.scheduler.complete(WORKER_A, [[job_id, token, None]], h.now)
            total += 1
    assert total == 20_000 and h.stats()["done"] == 20_000


def test_idempotency_keys_belong_to_their_owner() -> None:
    h = Harness()
    (first,) = h.scheduler.submit(PRODUCER, "q", ["a"], h.now, keys=["k"], owner="alice")
    (other,) = h.scheduler.submit(PRODUCER, "q", ["b"], h.now, keys=["k"], owner="bob")
    assert other != first
    assert h.scheduler.submit(PRODUCER, "q", ["a2"], h.now, keys=["k"], owner="alice") == [first]


def test_progress_is_fenced_kept_and_sent_to_watchers() -> None:
    h = Harness()
    (job_id,) = h.submit(["x"], watch=True)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    assert h.scheduler.progress(WORKER_A, [[job_id, token, 1.5, "over"], [job_id, 999, 0.1, "stale"]], h.now) == [
        None,
        "lease_lost",
    ]
    assert ProgressReady(PRODUCER, [[job_id, 1.0, "over"]]) in h.flush()  # clamped to 0..1
    assert h.scheduler.job_info(job_id)["progress"] == {"fraction": 1.0, "message": "over"}


def test_a_late_follower_gets_the_current_progress_at_once() -> None:
    h = Harness()
    (job_id,) = h.submit(["x"])
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    token = h.deliveries()[WORKER_A][0][1]
    h.scheduler.progress(WORKER_A, [[job_id, token, 0.3, "a third"]], h.now)
    h.flush()
    h.scheduler.watch(PRODUCER, [job_id])
    assert ProgressReady(PRODUCER, [[job_id, 0.3, "a third"]]) in h.flush()


# --- queues are freed (issue 11, defect 6) --------------------------------------------------


def test_queues_named_by_a_gone_worker_are_freed_at_the_limit() -> None:
    h = Harness(max_queues=100)
    h.scheduler.reserve(WORKER_A, [f"q{i}" for i in range(100)], 1, h.now)
    with pytest.raises(LimitExceeded):
        h.submit([1], queue="new")  # the worker still names all of them
    h.scheduler.close_session(WORKER_A, h.now)
    h.clock.jump(1.0)
    assert h.submit([1], queue="new") == [1]  # the unused ones went to make room
    assert set(h.scheduler.stats(h.now)["queues"]) == {"new"}


def test_a_queue_lives_while_any_job_refers_to_it() -> None:
    h = Harness(result_ttl=300.0)
    h.flush()  # the first periodic sweep, on an empty broker
    for name in ("pending", "delayed", "leased", "dead", "done", "cancelled"):
        h.submit([name], queue=name, delay=60.0 if name == "delayed" else 0.0, max_attempts=1)
    h.scheduler.cancel([6], h.now)
    h.scheduler.reserve(WORKER_A, ["leased", "dead", "done"], 10, h.now)
    tokens = {job[0]: job[1] for job in h.deliveries()[WORKER_A]}
    h.scheduler.fail(
        WORKER_A,
        [[4, tokens[4], "E", "m"]],
        h.now,
    )
    h.scheduler.complete(WORKER_A, [[5, tokens[5], "r"]], h.now)
    h.scheduler.reserve(WORKER_A, ["leased"], 10, h.now)
    h.scheduler.reserve(WORKER_B, ["idle"], 10, h.now)
    assert h.scheduler.free_unused_queues(h.now) == []
    h.scheduler.reserve(WORKER_B, [], 0, h.now)
    assert h.scheduler.free_unused_queues(h.now) == ["idle"]
    h.scheduler.dead_purge("dead", None)
    assert h.scheduler.free_unused_queues(h.now) == ["dead"]
    h.jump(301.0, alive=(PRODUCER,))  # results expire; the worker dies and its lease goes back
    # ... and the periodic sweep of that flush freed the queues of the expired results.
    assert set(h.scheduler.stats(h.now)["queues"]) == {"pending", "delayed", "leased"}


def test_unused_queues_are_swept_every_minute_without_the_limit() -> None:
    h = Harness()
    h.scheduler.reserve(WORKER_A, ["a", "b"], 1, h.now)
    h.scheduler.reserve(WORKER_A, ["a"], 1, h.now)
    h.flush()
    h.jump(61.0)
    assert set(h.scheduler.stats(h.now)["queues"]) == {"a"}


# --- rates are honest (issue 11, defect 8) --------------------------------------------------


def test_rates_count_a_burst_for_ten_seconds_after_it_ends() -> None:
    h = Harness(max_prefetch=20_000)
    h.scheduler.reserve(WORKER_A, ["q"], 10_000, h.now)
    h.submit([0])
    h.flush()
    h.jump(120.0)  # a long quiet spell: no sample taken meanwhile
    jobs = h.submit(list(range(1000)))
    delivered = h.deliveries()[WORKER_A]
    h.scheduler.complete(WORKER_A, [[job[0], job[1], 0] for job in delivered], h.now)
    h.jump(3.0)
    assert h.stats()["submitted_per_second"] == 100.0  # 1,000 in the last 10 s
    assert h.stats()["done_per_second"] >= 100.0
    h.jump(6.5)
    assert h.stats()["submitted_per_second"] == 100.0
    h.jump(2.0)  # the burst is now more than 10 s old (give or take the 1 s sampling interval)
    assert h.stats()["submitted_per_second"] == 0.0 and h.stats()["done_per_second"] == 0.0
    assert len(jobs) == 1000


# --- queue controls (issue 14) ------------------------------------------------------------


def test_a_paused_queue_takes_submits_and_delivers_nothing_until_resumed() -> None:
    h = Harness()
    h.scheduler.configure_queue("q", h.now, paused=True)
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    submitted = h.submit([1, 2, 3])
    assert h.deliveries() == {} and h.stats()["paused"] is True and h.stats()["pending"] == 3
    assert h.jump(60.0) == []
    h.scheduler.configure_queue("q", h.now, paused=False)
    assert ids(h.deliveries()[WORKER_A]) == submitted


def test_a_concurrency_limit_holds_across_workers() -> None:
    h = Harness()
    h.scheduler.configure_queue("q", h.now, concurrency=1)
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    h.scheduler.reserve(WORKER_B, ["q"], 10, h.now)
    h.submit(list(range(5)))
    held: list[tuple[int, list[Any]]] = []
    for _ in range(5):
        delivered = h.deliveries()
        assert sum(len(jobs) for jobs in delivered.values()) == 1  # one at a time, whoever takes it
        ((session, (job,)),) = delivered.items()
        held.append((session, job))
        assert h.deliveries() == {}
        h.scheduler.complete(session, [[job[0], job[1], None]], h.now)
    assert {session for session, _ in held} == {WORKER_A, WORKER_B}  # still round robin
    h.scheduler.configure_queue("q", h.now, concurrency=0)  # no limit any more
    h.submit(list(range(4)))
    assert sum(len(jobs) for jobs in h.deliveries().values()) == 4


def test_a_rate_limit_spreads_deliveries_over_time() -> None:
    h = Harness()
    h.scheduler.configure_queue("q", h.now, rate=20.0)
    h.scheduler.reserve(WORKER_A, ["q"], 10_000, h.now)
    h.submit(list(range(1000)))
    delivered = len(h.deliveries().get(WORKER_A, []))
    for _ in range(500):  # 5 s in steps of 10 ms, each step acting on the deadlines that came
        h.clock.jump(0.01)
        h.scheduler.seen(WORKER_A, h.now)
        h.scheduler.tick(h.now)
        delivered += sum(len(e.jobs) for e in h.flush() if isinstance(e, Deliver))
    assert 100 <= delivered <= 102  # 20 a second for 5 s, and at most the bucket's burst


def test_queue_controls_are_changes_to_store_and_keep_the_queue() -> None:
    h = Harness()
    h.scheduler = Scheduler(SchedulerConfig(), track_changes=True)
    h.scheduler.open_session(PRODUCER, h.now)
    settings = h.scheduler.configure_queue("limited", h.now, concurrency=3, rate=5.0)
    assert settings == {"paused": False, "concurrency": 3, "rate": 5.0}
    changes = h.scheduler.take_changes()
    assert changes.controls["limited"] is not None and changes.controls["limited"].concurrency == 3
    assert h.scheduler.free_unused_queues(h.now) == []  # set up, though empty: kept
    h.scheduler.configure_queue("limited", h.now, concurrency=0, rate=0.0)
    assert h.scheduler.take_changes().controls == {"limited": None}
    assert h.scheduler.free_unused_queues(h.now) == ["limited"]


@pytest.mark.parametrize("options", [{"concurrency": -1}, {"rate": -1.0}, {"rate": float("nan")}])
def test_bad_queue_controls_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        Harness().scheduler.configure_queue("q", 0.0, **options)


def test_a_jobs_own_result_ttl_and_backoff_cap() -> None:
    h = Harness(result_ttl=60.0, max_result_ttl=3600.0)
    short, default, long = (h.submit([n], result_ttl=ttl)[0] for n, ttl in ((1, 10.0), (2, None), (3, 600.0)))
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    for job_id, token, *_ in h.deliveries()[WORKER_A]:
        h.scheduler.complete(WORKER_A, [[job_id, token, job_id]], h.now)
    h.jump(11.0)
    with pytest.raises(JobNotFound):
        h.scheduler.job_info(short)
    h.jump(50.0)
    with pytest.raises(JobNotFound):
        h.scheduler.job_info(default)
    assert h.scheduler.job_info(long)["result"] == long  # outlives the default 60 s
    with pytest.raises(InvalidRequest, match="maximum"):
        h.submit([4], result_ttl=7200.0)
    (capped,) = h.submit(["x"], backoff=10.0, max_backoff=15.0, max_attempts=5)
    h.scheduler.reserve(WORKER_A, ["q"], 1, h.now)
    delivered = h.deliveries()[WORKER_A]
    waits = []
    for _ in range(3):
        ((job_id, token, *_),) = delivered
        assert job_id == capped
        h.scheduler.fail(WORKER_A, [[job_id, token, "E", "m"]], h.now)
        waited = 0.0
        while h.scheduler.job_info(capped)["state"] == "delayed":
            effects = h.jump(0.5)
            waited += 0.5
        waits.append(waited)
        (deliver,) = [e for e in effects if isinstance(e, Deliver)]
        delivered = deliver.jobs
    assert waits == [10.0, 15.0, 15.0]  # 10, then 20 and 40 capped at 15


# --- dependencies (issue 14) --------------------------------------------------------------


def _run_all(h: Harness) -> dict[int, Any]:
    """Complete every job delivered to WORKER_A (result: its payload doubled, with the results
    of the jobs it ran after); returns job id -> parent results seen."""
    seen: dict[int, Any] = {}
    while True:
        delivered = h.deliveries().get(WORKER_A, [])
        if not delivered:
            return seen
        for job_id, token, _, payload, _, _, _, parents in delivered:
            seen[job_id] = parents
            h.scheduler.complete(WORKER_A, [[job_id, token, [payload, parents]]], h.now)


def test_a_chain_runs_in_order_with_each_result_handed_on() -> None:
    h = Harness()
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    (a,) = h.submit(["a"])
    (b,) = h.submit(["b"], after=[a])
    (c,) = h.submit(["c"], after=[b])
    assert h.stats()["waiting"] == 2 and h.scheduler.job_info(c)["state"] == "waiting"
    seen = _run_all(h)
    assert list(seen) == [a, b, c]  # one at a time, in order
    assert seen[b] == [["a", None]] and seen[c] == [["b", [["a", None]]]]
    assert h.stats()["waiting"] == 0 and h.stats()["done"] == 3


def test_a_chord_waits_for_every_part_then_gets_their_results_in_order() -> None:
    h = Harness()
    parts = h.submit([1, 2, 3])
    (reduce,) = h.submit(["sum"], after=list(reversed(parts)))
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    seen = _run_all(h)
    assert seen[reduce] == [[3, None], [2, None], [1, None]]


def test_a_dependent_of_a_dead_job_is_cancelled_with_the_reason_unless_it_runs_anyway() -> None:
    h = Harness()
    (parent,) = h.submit(["p"], max_attempts=1)
    (child,) = h.submit(["c"], after=[parent])
    (grandchild,) = h.submit(["g"], after=[child])
    (anyway,) = h.submit(["x"], after=[parent], run_anyway=True)
    h.scheduler.watch(PRODUCER, [child, grandchild])
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    ((job_id, token, *_),) = h.deliveries()[WORKER_A]
    h.scheduler.fail(WORKER_A, [[job_id, token, "E", "boom"]], h.now)
    info = h.scheduler.job_info(child)
    assert info["state"] == "cancelled" and info["error"]["type"] == "DependencyFailed"
    assert f"job {parent}" in info["error"]["message"] and "dead" in info["error"]["message"]
    assert h.scheduler.job_info(grandchild)["state"] == "cancelled"  # down the chain
    ((ran, _, _, _, _, _, _, parents),) = h.deliveries()[WORKER_A]
    assert ran == anyway and parents == [None]
    with pytest.raises(InvalidRequest, match="unknown"):
        h.submit(["late"], after=[10**6])  # only existing jobs: no cycle can form


def test_a_job_can_run_after_jobs_that_ended_already_and_waiting_jobs_can_be_cancelled() -> None:
    h = Harness()
    (done,) = h.submit(["d"])
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    _run_all(h)
    (after_done,) = h.submit(["n"], after=[done])
    (waits,) = h.submit(["w"], after=[after_done])
    assert h.scheduler.cancel([waits], h.now) == [None]
    seen = _run_all(h)
    assert seen == {after_done: [["d", None]]} and h.stats()["waiting"] == 0


def test_a_job_naming_the_same_job_twice_waits_for_it_once() -> None:
    h = Harness()
    (parent,) = h.submit(["p"])
    (child,) = h.submit(["c"], after=[parent, parent])
    h.scheduler.reserve(WORKER_A, ["q"], 10, h.now)
    seen = _run_all(h)
    assert seen[child] == [["p", None], ["p", None]]


def test_purging_a_queue_cancels_its_waiting_jobs_too() -> None:
    h = Harness()
    (parent,) = h.submit(["p"], queue="other")
    waiting = h.submit(["a", "b"], after=[parent])
    assert sorted(h.scheduler.purge_queue("q", h.now)) == waiting
    assert h.stats()["waiting"] == 0


def test_purge_cancels_a_job_and_the_jobs_waiting_for_it_once() -> None:
    h = Harness()
    first = h.submit(["a"])
    second = h.submit(["b"], after=first)
    assert sorted(h.scheduler.purge_queue("q", h.now)) == first + second
    assert [h.scheduler.job_info(i)["state"] for i in first + second] == ["cancelled", "cancelled"]
    assert h.stats()["pending"] == h.stats()["waiting"] == h.stats()["delayed"] == 0
