"""Per-state records follow from the lifecycle table: after any sequence of operations, each
queue's counts, FIFOs, dead-letter list, the sessions' lease tables and the deadlines equal a
recount over every job. Seeded random sequences on a fake clock: no sockets, no sleeping."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from jobbroker.broker.core.clock import FakeClock
from jobbroker.broker.core.jobs import FINAL_STATES, JobState
from jobbroker.broker.core.scheduler import Deliver, Scheduler, SchedulerConfig
from jobbroker.broker.errors import BrokerError

QUEUES = ("a", "b")
PRODUCER = 1


def recount(s: Scheduler) -> None:
    """Every per-state record of `s` against a recount over its jobs."""
    counts: Counter[tuple[str, JobState]] = Counter((job.queue, job.state) for job in s._jobs.values())
    for name, queue in s._queues.items():
        for state in (JobState.PENDING, JobState.WAITING, JobState.DELAYED, JobState.LEASED, JobState.DEAD):
            assert queue.count(state) == counts[name, state], (name, state)
        finished = counts[name, JobState.DONE] + counts[name, JobState.CANCELLED]
        assert queue.finished_count == finished, name
        assert all(job.state is JobState.DEAD and job.queue == name for job in queue.dead.values())
        in_line = {job.id for fifo in queue.pending.values() for job in fifo if job.state is JobState.PENDING}
        unstored = {job.id for job in s._lifecycle.unstored if job.state is JobState.PENDING and job.queue == name}
        pending = {job.id for job in s._jobs.values() if job.queue == name and job.state is JobState.PENDING}
        assert in_line | unstored == pending and not in_line & unstored, name
    assert all((job.queue, job.state) in counts for job in s._jobs.values())  # no job without its queue
    leased = {job.id: job for job in s._jobs.values() if job.state is JobState.LEASED}
    held = {job_id: session.id for session in s._sessions.values() for job_id in session.leased}
    assert held == {job.id: job.worker for job in leased.values()}
    assert set(s._lifecycle.due_deadlines._live) == {j.id for j in s._jobs.values() if j.state is JobState.DELAYED}
    timed = {j.id for j in leased.values() if j.started_at is not None and j.timeout is not None}
    assert set(s._lifecycle.run_deadlines._live) == timed
    finished = {j.id for j in s._jobs.values() if j.state in FINAL_STATES and j.state is not JobState.DEAD}
    assert set(s._lifecycle.expiry_deadlines._live) | set(s._lifecycle.own_ttl_deadlines._live) == finished
    assert not set(s._lifecycle.expiry_deadlines._live) & set(s._lifecycle.own_ttl_deadlines._live)
    assert s.in_flight == len(leased)


class Run:
    """One random sequence of operations on one scheduler."""

    def __init__(self, seed: int, *, track_changes: bool) -> None:
        self.rng = random.Random(seed)
        self.clock = FakeClock()
        self.s = Scheduler(
            SchedulerConfig(heartbeat=1.0, result_ttl=5.0, max_pending_per_queue=60), track_changes=track_changes
        )
        self.s.open_session(PRODUCER, self.clock.now())
        self.workers: list[int] = []
        self.next_session = 2
        self.held: list[list[Any]] = []  # deliveries not yet answered: [job_id, token, ...]

    def step(self) -> None:
        rng, s, now = self.rng, self.s, self.clock.now()
        op = rng.choice(
            ["submit", "submit", "submit", "worker", "flush", "flush", "answer", "answer", "cancel",
             "jump", "close", "dead", "purge", "control", "stored"]
        )  # fmt: skip
        try:
            getattr(self, op)(rng, s, now)
        except BrokerError:
            pass  # a refused request (a full queue, say) changes nothing: the recount says so
        for session in [PRODUCER, *self.workers]:
            s.seen(session, self.clock.now())

    def submit(self, rng: random.Random, s: Scheduler, now: float) -> None:
        options: dict[str, Any] = {"priority": rng.choice([0, 0, 5]), "max_attempts": rng.choice([1, 2, 3])}
        kind = rng.random()
        if kind < 0.2:
            options["delay"] = rng.choice([0.5, 2.0])
        elif kind < 0.4 and s._jobs:
            options["after"] = rng.sample(sorted(s._jobs), k=min(2, len(s._jobs)))
            options["run_anyway"] = rng.random() < 0.3
        if rng.random() < 0.3:
            options["timeout"] = 1.0
        if rng.random() < 0.2:
            options["result_ttl"] = rng.choice([0.0, 3.0])
        if rng.random() < 0.2:
            options["keys"] = [rng.choice("xyz") for _ in range(2)]
            payloads = [1, 2]
        else:
            payloads = list(range(rng.randint(1, 4)))
        s.submit(PRODUCER, rng.choice(QUEUES), payloads, now, watch=rng.random() < 0.3, **options)

    def worker(self, rng: random.Random, s: Scheduler, now: float) -> None:
        session = self.next_session
        self.next_session += 1
        s.open_session(session, now)
        s.reserve(session, rng.sample(QUEUES, k=rng.randint(1, 2)), rng.randint(1, 4), now)
        self.workers.append(session)

    def flush(self, rng: random.Random, s: Scheduler, now: float) -> None:
        for effect in s.flush(now):
            if isinstance(effect, Deliver):
                self.held += [[effect.session, *job] for job in effect.jobs]

    def answer(self, rng: random.Random, s: Scheduler, now: float) -> None:
        if not self.held:
            return
        session, job_id, token, *_ = self.held.pop(rng.randrange(len(self.held)))
        how = rng.choice(["complete", "complete", "complete", "fail", "final", "release", "started", "progress"])
        if how == "complete":
            s.complete(session, [[job_id, token, "r"]], now)
        elif how in ("fail", "final"):
            s.fail(session, [[job_id, token, "E", "m", None, how == "final", rng.choice([None, 0.5])]], now)
        elif how == "release":
            s.release(session, [[job_id, token]], now)
        else:
            s.started(session, [[job_id, token]], now)
            if how == "progress":
                s.progress(session, [[job_id, token, 0.5, "half"]], now)
            self.held.append([session, job_id, token])

    def cancel(self, rng: random.Random, s: Scheduler, now: float) -> None:
        if s._jobs:
            s.cancel([rng.choice(sorted(s._jobs))], now)

    def jump(self, rng: random.Random, s: Scheduler, now: float) -> None:
        self.clock.jump(rng.choice([0.1, 0.6, 1.5, 4.0]))
        if rng.random() < 0.2 and self.workers:  # a silent worker: missed heartbeats end it
            self.workers.remove(rng.choice(self.workers))
        s.tick(self.clock.now())

    def close(self, rng: random.Random, s: Scheduler, now: float) -> None:
        if self.workers:
            session = self.workers.pop(rng.randrange(len(self.workers)))
            s.close_session(session, now)

    def dead(self, rng: random.Random, s: Scheduler, now: float) -> None:
        queue = rng.choice(QUEUES)
        if rng.random() < 0.5:
            s.dead_requeue(queue, None, now)
        else:
            s.dead_purge(queue, None)

    def purge(self, rng: random.Random, s: Scheduler, now: float) -> None:
        s.purge_queue(rng.choice(QUEUES), now)

    def control(self, rng: random.Random, s: Scheduler, now: float) -> None:
        s.configure_queue(rng.choice(QUEUES), now, paused=rng.random() < 0.2, concurrency=rng.choice([0, 2]))

    def stored(self, rng: random.Random, s: Scheduler, now: float) -> None:
        if s.track_changes:
            s.take_changes()
            s.stored(s.next_job_id)


SEEDS = range(12)


def run_and_recount(seed: int, track_changes: bool, steps: int = 400) -> set[JobState]:
    """Run a random sequence, recounting after each step; returns the states jobs were seen in."""
    run = Run(seed, track_changes=track_changes)
    seen: set[JobState] = set()
    for _ in range(steps):
        run.step()
        recount(run.s)
        seen |= {job.state for job in run.s._jobs.values()}
    return seen


@pytest.mark.parametrize("track_changes", [False, True], ids=["memory", "durable"])
@pytest.mark.parametrize("seed", SEEDS)
def test_per_state_records_equal_a_recount_after_random_operations(seed: int, track_changes: bool) -> None:
    assert len(run_and_recount(seed, track_changes)) >= 5  # the run went through most states


def test_the_random_runs_go_through_every_state() -> None:
    """So that the test above checks every state's records, not only those easy to reach."""
    seen = set().union(*(run_and_recount(seed, track_changes=seed % 2 == 0) for seed in SEEDS))
    assert seen == set(JobState)


def test_a_restored_scheduler_recounts_the_same() -> None:
    """restore() enters each job through the same bookkeeping as the moves."""
    run = Run(7, track_changes=True)
    for _ in range(300):
        run.step()
    jobs = sorted(run.s._jobs.values(), key=lambda job: job.id)
    for job in jobs:
        job.watchers = None
    restored = Scheduler(run.s.config, track_changes=True)
    restored.restore(jobs, run.s.next_job_id, run.clock.now(), next_token=run.s.next_token)
    recount(restored)
    assert restored._jobs.keys() == run.s._jobs.keys()
    assert not any(job.state is JobState.LEASED for job in restored._jobs.values())
