"""The lifecycle's bookkeeping: every change of a job's state, and the records that follow
from its state (docs/architecture.md, "The path of one job").

move() is the one place a job's state changes: it looks the next state up in the lifecycle
table of jobs.py, undoes what the old state recorded (leave) and records the new one (enter):
the queue's count of each state, the pending FIFOs, the dead-letter list, the session's lease
table, and the deadline each state waits on. The Scheduler (scheduler.py) decides what happens
to a job; this room keeps the books. Pure: no I/O, `now` passed in.
"""

from __future__ import annotations

from jobbroker.broker.core.changes import Changes
from jobbroker.broker.core.deadlines import Deadlines, OrderedDeadlines
from jobbroker.broker.core.jobs import TRANSITIONS, Job, JobEvent, JobState, next_state
from jobbroker.broker.core.limits import SchedulerConfig
from jobbroker.broker.core.records import Queue, Session

__all__ = ["HEARTBEATS_MISSED_BEFORE_DEAD", "Lifecycle"]

HEARTBEATS_MISSED_BEFORE_DEAD = 3

# States and events as module constants: in the hot path, an Enum attribute costs about
# 100 ns a look-up (Python 3.11), a global a few.
_WAITING = JobState.WAITING
_PENDING = JobState.PENDING
_DELAYED = JobState.DELAYED
_LEASED = JobState.LEASED
_DEAD = JobState.DEAD
_ON_DELIVER = JobEvent.DELIVER
_ON_REQUEUE = JobEvent.REQUEUE


class Lifecycle:
    """The jobs, queues and sessions of one scheduler, and the per-state records of each job.

    The Scheduler shares the `jobs`, `queues`, `sessions` and `keys` mappings (never replaced,
    only changed); `ready`, `unstored` and `changes` are replaced as they are taken, so they
    are read through this object.
    """

    def __init__(self, config: SchedulerConfig, *, track_changes: bool) -> None:
        self.config = config
        self.track_changes = track_changes
        self.changes = Changes()
        self.jobs: dict[int, Job] = {}
        self.queues: dict[str, Queue] = {}
        self.sessions: dict[int, Session] = {}
        # (owner, queue, idempotency key) -> job id: one producer's keys never meet another's
        self.keys: dict[tuple[str | None, str, str], int] = {}
        # With track_changes: pending jobs whose creation is not yet committed, in the order
        # they became pending; counted in pending_count but in no FIFO, so that no worker runs
        # a job a crash could still take back (docs/protocol.md, "Durability"). stored() moves
        # them to their queues.
        self.unstored: list[Job] = []
        self.stored_below = 1  # every job with a smaller id is stored (or gone)
        self.ready: dict[str, None] = {}  # queues that may have work for waiters (ordered set)
        # job id of a started job with a time limit: when the broker takes it back if the
        # worker has not ended it (its own limit plus the grace the worker has to report it)
        self.run_deadlines: Deadlines[int] = Deadlines()
        self.rate_deadlines: Deadlines[str] = Deadlines()  # queue name: its next rate token
        self.due_deadlines: Deadlines[int] = Deadlines()  # job id of a delayed job
        # job id of a finished job; TTLs are all alike, so these come in time order
        self.expiry_deadlines: OrderedDeadlines[int] = OrderedDeadlines()
        self.own_ttl_deadlines: Deadlines[int] = Deadlines()  # job id of a job with its own TTL

    @property
    def time_limit_grace(self) -> float:
        """How long past a job's time limit the broker waits for the worker to end it itself."""
        return self.config.heartbeat * HEARTBEATS_MISSED_BEFORE_DEAD + 1.0

    def move(self, job: Job, event: JobEvent, now: float) -> None:
        """Move `job` along the lifecycle table (jobs.py), keeping every per-state record in
        step (see leave and enter). The one place a job's state changes. A delivery is not a
        change for the store: a lease lives in memory only (after a crash the job is pending
        again on disk and goes out anew, this attempt uncounted).

        Raises:
            InvalidTransition: the table has no row for (job.state, event); nothing changed.
        """
        state = TRANSITIONS.get((job.state, event))
        if state is None:
            state = next_state(job, event)  # raises InvalidTransition
        queue = self.queues[job.queue]
        self.leave(job, queue)
        job.state = state
        self.enter(job, queue, now, front=event is _ON_REQUEUE)
        if self.track_changes and event is not _ON_DELIVER:
            self.changes.update(job)

    def enter(self, job: Job, queue: Queue, now: float, *, front: bool = False, restored: bool = False) -> None:
        """Record `job` in its state: a new job, one restored, or one move()d.

        pending: counted, and in line in its queue's FIFO (`front`: a job handed back), or,
            while its creation is not committed, in `unstored` (stored() puts it in line);
        leased: counted, and in its session's lease table (job.worker, set by the delivery);
        delayed: counted, with a deadline at job.not_before;
        waiting: counted (the jobs it waits for hold it in dependencies.py);
        dead: in the queue's dead-letter list;
        done, cancelled: counted, with a deadline when it is forgotten (`restored`: at
            job.expires_at as stored, else the result TTL from `now`).
        """
        state = job.state
        if state is _PENDING:
            queue.pending_count += 1
            if self.track_changes and job.id >= self.stored_below:
                self.unstored.append(job)
            else:
                queue.push(job, front=front)
                self.ready[queue.name] = None
        elif state is _LEASED:
            queue.leased_count += 1
            if job.worker is not None:
                self.sessions[job.worker].leased[job.id] = job
        elif state is _DELAYED:
            queue.delayed_count += 1
            self.due_deadlines.add(job.id, job.not_before)
        elif state is _WAITING:
            queue.waiting_count += 1
        elif state is _DEAD:
            queue.dead[job.id] = job
        else:
            queue.finished_count += 1
            if not restored:
                job.expires_at = now + (self.config.result_ttl if job.result_ttl is None else job.result_ttl)
            # Default TTLs come in time order (a cheap FIFO); a job's own TTL goes to a heap.
            if job.result_ttl is None:
                self.expiry_deadlines.add(job.id, job.expires_at)
            else:
                self.own_ttl_deadlines.add(job.id, job.expires_at)

    def leave(self, job: Job, queue: Queue) -> None:
        """Undo what enter recorded for the job's state. A job that leaves pending stays in
        its FIFO (or `unstored`), where it is skipped; one that leaves waiting stays among the
        dependents of what it waited for, where it is skipped too. A lease that ends frees room
        under the queue's concurrency limit and credit of the session that held it."""
        state = job.state
        if state is _PENDING:
            queue.pending_count -= 1
        elif state is _LEASED:
            queue.leased_count -= 1
            self.run_deadlines.cancel(job.id)
            if queue.controls is not None:  # under a concurrency limit another job may go now
                self.ready[queue.name] = None
            session = self.sessions.get(job.worker) if job.worker is not None else None
            job.worker = None
            if session is not None:  # else a session that ended (close_session clears its table)
                del session.leased[job.id]
                self.offer_credit(session)
        elif state is _DELAYED:
            queue.delayed_count -= 1
            self.due_deadlines.cancel(job.id)
        elif state is _WAITING:
            queue.waiting_count -= 1
        elif state is _DEAD:
            del queue.dead[job.id]
        else:
            queue.finished_count -= 1
            if job.result_ttl is None:
                self.expiry_deadlines.cancel(job.id)
            else:
                self.own_ttl_deadlines.cancel(job.id)

    def forget(self, job: Job) -> None:
        """A finished (or dead) job leaves the broker."""
        self.leave(job, self.queues[job.queue])
        del self.jobs[job.id]
        if job.key is not None:
            self.keys.pop((job.owner, job.queue, job.key), None)
        if self.track_changes:
            self.changes.forget(job.id)

    def start(self, job: Job, now: float) -> float:
        """The worker began the job (said so, or answered for it): count the attempt and start
        its time limit. Idempotent per delivery. Returns when it started."""
        started_at = job.started_at
        if started_at is None:
            started_at = job.started_at = now
            job.attempts += 1
            if job.timeout is not None:
                self.run_deadlines.add(job.id, now + job.timeout + self.time_limit_grace)
        return started_at

    def offer_credit(self, session: Session) -> None:
        """Put a worker with free credit back in line on each of its queues."""
        if session.closed or session.credit <= 0:
            return
        for name in session.queues:
            if name not in session.waiting:
                session.waiting.add(name)
                self.queues[name].waiters.append(session)
            self.ready[name] = None

    def stored(self, next_job_id: int) -> None:
        """The store has committed every job with an id below `next_job_id`: those pending
        go in line in their queues, in the order they were created."""
        if next_job_id <= self.stored_below:
            return
        self.stored_below = next_job_id
        waiting: list[Job] = []
        for job in self.unstored:
            if job.id >= next_job_id:
                waiting.append(job)
            elif job.state is _PENDING:  # not cancelled meanwhile; counted when it became pending
                self.queues[job.queue].push(job)
                self.ready[job.queue] = None
        self.unstored = waiting

    def take_changes(self) -> Changes:
        changes, self.changes = self.changes, Changes()
        return changes
