"""The stores, SQLite on a temporary directory and PostgreSQL in a database of the tests' own
server (tests/conftest.py), against one contract (the tests taking `open_store`); SQLite's own
faults and recovery; the scheduler's restore()."""

from __future__ import annotations

import contextlib
import errno
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
from jobbroker.broker.core.clock import FakeClock
from jobbroker.broker.core.jobs import Job, JobState
from jobbroker.broker.core.scheduler import Deliver, Scheduler, SchedulerConfig
from jobbroker.broker.errors import StorageError, StorageFailed
from jobbroker.broker.store import (
    SESSION_BLOCK,
    TOKEN_BLOCK,
    IdCeilings,
    SqliteStore,
    Store,
    WriteBatch,
    recover,
    serialize,
)
from jobbroker.broker.store.sqlite import _write_error

WALL = 1_800_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Opens a store on one place, anew at each call (a restart): a data directory, or a new
    database of the tests' PostgreSQL server (skipped, saying why, where there is none)."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "data")
    from jobbroker.broker.pgstore import PostgresStore

    url = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)


def scheduler_with_history(clock: FakeClock) -> Scheduler:
    """Jobs in every state: pending, delayed, leased, done, dead, cancelled."""
    scheduler = Scheduler(SchedulerConfig(result_ttl=100.0), track_changes=True)
    now = clock.now()
    scheduler.open_session(1, now)
    scheduler.submit(1, "q", [b"pending-1", b"pending-2"], now, priority=1, keys=["k1", None])
    scheduler.submit(1, "q", [b"delayed"], now, delay=30.0)
    scheduler.submit(1, "q", [b"to-lease", b"to-finish", b"to-kill"], now, priority=9, max_attempts=1)
    scheduler.submit(1, "q", [b"to-cancel"], now)
    scheduler.cancel([7], now)
    scheduler.stored(scheduler.next_job_id)  # as the broker does once their creation is committed
    scheduler.reserve(1, ["q"], 3, now)
    (deliver,) = [e for e in scheduler.flush(now) if isinstance(e, Deliver)]
    (leased, leased_token), (finished, finished_token), (killed, killed_token) = [(j[0], j[1]) for j in deliver.jobs]
    assert leased == 4
    scheduler.started(1, [[leased, leased_token]], now)
    scheduler.complete(1, [[finished, finished_token, msgpack.packb({"answer": 42})]], now)
    scheduler.fail(1, [[killed, killed_token, "ValueError", "boom"]], now)
    scheduler.reserve(1, ["q"], 0, now)
    return scheduler


def test_rows_round_trip_through_the_store(open_store: Callable[[], Store]) -> None:
    clock = FakeClock()
    original = scheduler_with_history(clock)
    store = open_store()
    batch = serialize(original.take_changes(), clock.now(), WALL)
    assert len(batch.inserts) == 7 and batch.updates == [] and batch.deletes == []
    store.write(batch, original.next_job_id)
    store.close()

    reopened = open_store()
    later = FakeClock(start=5000.0)  # another process: another monotonic origin
    recovered = reopened.load(later.now(), WALL + 10.0)  # ten seconds later
    reopened.close()
    assert recovered.next_job_id == 8
    by_id = {job.id: job for job in recovered.jobs}
    assert [job.id for job in recovered.jobs] == sorted(by_id)
    assert {i: str(j.state) for i, j in by_id.items()} == {
        1: "pending",
        2: "pending",
        3: "delayed",
        4: "pending",  # leases are not written: as it was before its delivery
        5: "done",
        6: "dead",
        7: "cancelled",
    }
    assert by_id[1].key == "k1" and by_id[1].payload == b"pending-1" and by_id[1].priority == 1
    assert by_id[3].not_before == pytest.approx(later.now() + 20.0)
    assert by_id[4].attempts == 0
    assert msgpack.unpackb(by_id[5].result) == {"answer": 42} and by_id[5].expires_at == pytest.approx(
        later.now() + 90.0
    )
    assert by_id[6].error == {"type": "ValueError", "message": "boom"}


def test_restore_brings_jobs_held_as_leased_back_and_keeps_order_keys_and_results(tmp_path: Path) -> None:
    clock = FakeClock()
    original = scheduler_with_history(clock)
    jobs: list[Job] = sorted(original.take_changes().created.values(), key=lambda j: j.id)
    restored = Scheduler(SchedulerConfig(result_ttl=100.0), track_changes=True)
    restored.restore(jobs, original.next_job_id, clock.now())
    now = clock.now()
    restored.open_session(1, now)

    info = restored.job_info(4)  # was leased on its only attempt: dead, not looping
    assert info["state"] == "dead" and info["error"]["type"] == "LeaseLost"
    assert restored.submit(1, "q", [b"again"], now, keys=["k1"]) == [1]  # the key still dedupes
    assert restored.submit(1, "q", [b"new"], now) == [8]  # ids are never reused
    assert msgpack.unpackb(restored.job_info(5)["result"]) == {"answer": 42}
    restored.reserve(1, ["q"], 10, now)
    restored.stored(restored.next_job_id)
    (deliver,) = [e for e in restored.flush(now) if isinstance(e, Deliver)]
    assert [j[0] for j in deliver.jobs] == [1, 2, 8]  # priority then FIFO; cancelled 7 skipped
    assert {j["id"] for j in restored.dead_list("q")} == {4, 6}


def test_leased_job_with_attempts_left_comes_back_pending_with_the_attempt_counted() -> None:
    job = Job(1, "q", "x", priority=0, max_attempts=3, lease_seconds=30, backoff=1, key=None, state=JobState.LEASED)
    job.attempts = 1
    scheduler = Scheduler()
    scheduler.restore([job], 2, 0.0)
    scheduler.open_session(9, 0.0)
    scheduler.reserve(9, ["q"], 1, 0.0)
    (deliver,) = [e for e in scheduler.flush(0.0) if isinstance(e, Deliver)]
    assert deliver.jobs[0][4] == 2  # second attempt


def test_deletes_free_the_rows(open_store: Callable[[], Store]) -> None:
    store = open_store()
    clock = FakeClock()
    scheduler = scheduler_with_history(clock)
    batch = serialize(scheduler.take_changes(), clock.now(), WALL)
    store.write(batch, 8)
    store.write(WriteBatch(deletes=[row[0] for row in batch.inserts]), 8)
    assert store.load(0.0, WALL).jobs == []
    store.close()


def test_a_second_store_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "data")
    with pytest.raises(StorageError, match="in use by another broker"):
        SqliteStore(tmp_path / "data")
    first.close()
    SqliteStore(tmp_path / "data").close()  # free again once the first is closed


def test_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="corrupt"):
        SqliteStore(data)


def test_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(StorageError, match="cannot create data directory"):
        SqliteStore(tmp_path / "a-file" / "data")


def test_later_changes_are_written_as_updates(open_store: Callable[[], Store]) -> None:
    clock = FakeClock()
    scheduler = Scheduler(SchedulerConfig(result_ttl=100.0), track_changes=True)
    scheduler.open_session(1, clock.now())
    done_id, retried_id = scheduler.submit(1, "q", [b"a", b"b"], clock.now(), backoff=5.0)
    store = open_store()
    first = serialize(scheduler.take_changes(), clock.now(), WALL)
    assert len(first.inserts) == 2
    store.write(first, scheduler.next_job_id)
    scheduler.stored(scheduler.next_job_id)

    scheduler.reserve(1, ["q"], 2, clock.now())
    (deliver,) = [e for e in scheduler.flush(clock.now()) if isinstance(e, Deliver)]
    tokens = {job[0]: job[1] for job in deliver.jobs}
    scheduler.complete(1, [[done_id, tokens[done_id], b"\x92\x01\x02"]], clock.now())
    scheduler.fail(1, [[retried_id, tokens[retried_id], "E", "later"]], clock.now())
    second = serialize(scheduler.take_changes(), clock.now(), WALL)
    assert second.inserts == [] and len(second.updates) == 2
    store.write(second, scheduler.next_job_id)
    store.close()

    reopened = open_store()
    jobs = {job.id: job for job in reopened.load(0.0, WALL).jobs}
    reopened.close()
    assert jobs[done_id].state is JobState.DONE and jobs[done_id].result == b"\x92\x01\x02"
    assert jobs[done_id].payload == b"a"
    assert jobs[retried_id].state is JobState.DELAYED and jobs[retried_id].attempts == 1
    assert jobs[retried_id].not_before == pytest.approx(5.0) and jobs[retried_id].error == {
        "type": "E",
        "message": "later",
    }


def test_a_job_created_and_forgotten_between_writes_is_never_written() -> None:
    scheduler = Scheduler(SchedulerConfig(result_ttl=1.0), track_changes=True)
    scheduler.open_session(1, 0.0)
    (job_id,) = scheduler.submit(1, "q", [b"x"], 0.0)
    scheduler.cancel([job_id], 0.0)
    scheduler.tick(2.0)
    assert not scheduler.take_changes()


def test_deliveries_are_not_written_and_jobs_that_changed_alike_are_updated_together(
    open_store: Callable[[], Store],
) -> None:
    clock = FakeClock()
    scheduler = Scheduler(track_changes=True)
    scheduler.open_session(1, clock.now())
    scheduler.open_session(2, clock.now())
    ids = scheduler.submit(1, "q", [msgpack.packb(n) for n in range(50)], clock.now())
    store = open_store()
    store.write(serialize(scheduler.take_changes(), clock.now(), WALL), scheduler.next_job_id)
    scheduler.stored(scheduler.next_job_id)
    scheduler.reserve(2, ["q"], 40, clock.now())
    (deliver,) = scheduler.flush(clock.now())
    scheduler.started(2, [job[:2] for job in deliver.jobs], clock.now())  # counted from here
    assert not scheduler.take_changes()  # leases live in memory: a crash delivers the jobs again
    scheduler.close_session(2, clock.now())  # the worker is lost: 40 jobs requeued, attempt counted
    batch = serialize(scheduler.take_changes(), clock.now(), WALL)
    assert len(batch.updates) == 40 and len({update[:-1] for update in batch.updates}) == 1
    store.write(batch, scheduler.next_job_id)
    store.close()
    reopened = open_store()
    states = {job.id: (str(job.state), job.attempts) for job in reopened.load(0.0, WALL).jobs}
    reopened.close()
    assert [states[i] for i in ids] == [("pending", 1)] * 40 + [("pending", 0)] * 10


def test_a_new_job_is_delivered_only_once_its_creation_is_stored() -> None:
    scheduler = Scheduler(track_changes=True)
    scheduler.open_session(1, 0.0)
    scheduler.reserve(1, ["q"], 10, 0.0)
    first, cancelled = scheduler.submit(1, "q", [b"x", b"cancelled"], 0.0)
    delayed = scheduler.submit(1, "q", [b"soon"], 0.0, delay=0.5)[0]
    assert not [e for e in scheduler.flush(0.0) if isinstance(e, Deliver)]
    assert scheduler.stats(0.0)["queues"]["q"]["pending"] == 2
    scheduler.cancel([cancelled], 0.0)
    boundary = scheduler.next_job_id
    assert len(serialize(scheduler.take_changes(), 0.0, WALL).inserts) == 3
    scheduler.tick(1.0)  # the delayed job is due before its commit completes: it waits too
    (later,) = scheduler.submit(1, "q", [b"later"], 1.0)  # after the changes were taken
    assert not [e for e in scheduler.flush(1.0) if isinstance(e, Deliver)]
    scheduler.stored(boundary)  # the commit of the first three is done
    (deliver,) = [e for e in scheduler.flush(1.0) if isinstance(e, Deliver)]
    assert [job[0] for job in deliver.jobs] == [first, delayed]
    scheduler.complete(1, [[first, deliver.jobs[0][1], "done"]], 1.0)
    batch = serialize(scheduler.take_changes(), 1.0, WALL)
    assert [row[0] for row in batch.inserts] == [later] and sorted(u[-1] for u in batch.updates) == [first, delayed]
    scheduler.stored(scheduler.next_job_id)
    (deliver,) = [e for e in scheduler.flush(1.0) if isinstance(e, Deliver)]
    assert [job[0] for job in deliver.jobs] == [later]
    assert scheduler.stats(1.0)["queues"]["q"]["pending"] == 0


def test_memory_mode_delivers_at_once() -> None:
    scheduler = Scheduler()
    scheduler.open_session(1, 0.0)
    scheduler.reserve(1, ["q"], 10, 0.0)
    scheduler.submit(1, "q", [b"x"], 0.0)
    assert [e for e in scheduler.flush(0.0) if isinstance(e, Deliver)]


def test_ids_continue_above_stored_ceilings_after_a_restart(open_store: Callable[[], Store]) -> None:
    store = open_store()
    first = store.load(0.0, WALL)
    assert (first.next_token, first.next_session) == (1, 1)
    assert first.ceilings == IdCeilings(1 + TOKEN_BLOCK, 1 + SESSION_BLOCK)
    store.write(WriteBatch(ceilings=IdCeilings(5 * TOKEN_BLOCK, 7 * SESSION_BLOCK)), 1)
    store.close()
    reopened = open_store()
    second = reopened.load(0.0, WALL)
    reopened.close()
    # Whatever the first run handed out stayed below its ceilings: the second starts there.
    assert (second.next_token, second.next_session) == (5 * TOKEN_BLOCK, 7 * SESSION_BLOCK)
    assert second.ceilings == IdCeilings(6 * TOKEN_BLOCK, 8 * SESSION_BLOCK)


def test_restore_counts_lease_tokens_from_the_recovered_value() -> None:
    scheduler = Scheduler(track_changes=True)
    scheduler.restore([], 1, 0.0, next_token=1000)
    scheduler.open_session(1, 0.0)
    (job_id,) = scheduler.submit(1, "q", [b"x"], 0.0)
    scheduler.stored(scheduler.next_job_id)
    scheduler.reserve(1, ["q"], 1, 0.0)
    (deliver,) = [e for e in scheduler.flush(0.0) if isinstance(e, Deliver)]
    assert deliver.jobs[0][:2] == (job_id, 1000) and scheduler.next_token == 1001


def test_merged_batches_keep_the_higher_ceilings() -> None:
    earlier = WriteBatch(deletes=[1], ceilings=IdCeilings(10, 30))
    later = WriteBatch(deletes=[2], ceilings=IdCeilings(20, 5))
    assert earlier.then(later).ceilings == IdCeilings(20, 30) and earlier.then(later).deletes == [1, 2]
    assert WriteBatch().then(later).ceilings == later.ceilings and bool(WriteBatch(ceilings=IdCeilings()))


def test_a_database_behind_its_commit_file_is_refused(tmp_path: Path) -> None:
    """What a lost WAL looks like: the commit file counts commits the database does not hold."""
    store = SqliteStore(tmp_path / "data")
    store.load(0.0, WALL)
    store.write(WriteBatch(deletes=[1]), 1)
    store.close()
    behind = tmp_path / "behind"
    behind.mkdir()
    shutil.copy(tmp_path / "data" / "jobs.sqlite3", behind / "jobs.sqlite3")
    reopened = SqliteStore(tmp_path / "data")
    reopened.write(WriteBatch(deletes=[2]), 1)  # one more commit, then the database goes back
    reopened.close()
    shutil.copy(behind / "jobs.sqlite3", tmp_path / "data" / "jobs.sqlite3")
    with pytest.raises(StorageError, match=r"holds 2 commits but 3 were acknowledged.*jobbroker recover"):
        SqliteStore(tmp_path / "data")
    (tmp_path / "data" / "jobs.sqlite3").unlink()  # the database gone altogether
    with pytest.raises(StorageError, match="holds 0 commits but 3 were acknowledged"):
        SqliteStore(tmp_path / "data")
    SqliteStore(tmp_path / "data-new").close()  # a new directory has nothing to be behind of


def test_a_full_disk_is_retried_and_any_other_write_error_stops_the_broker() -> None:
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    fsync = sqlite3.OperationalError("disk I/O error")
    fsync.sqlite_errorcode = 10 | (4 << 8)  # type: ignore[attr-defined]
    enospc = OSError(errno.ENOSPC, "No space left on device")
    eio = OSError(errno.EIO, "Input/output error")
    assert [type(_write_error("w", e)) for e in (full, enospc, fsync, eio)] == [
        StorageError,
        StorageError,
        StorageFailed,
        StorageFailed,
    ]


def _store_with_jobs(data: Path, count: int) -> list[int]:
    scheduler = Scheduler(track_changes=True)
    scheduler.open_session(1, 0.0)
    ids = scheduler.submit(1, "q", [msgpack.packb({"n": n, "pad": "x" * 300}) for n in range(count)], 0.0)
    store = SqliteStore(data)
    store.load(0.0, WALL)
    store.write(serialize(scheduler.take_changes(), 0.0, WALL), scheduler.next_job_id)
    store.close()
    return ids


def test_recover_salvages_around_a_corrupt_row(tmp_path: Path) -> None:
    ids = _store_with_jobs(tmp_path / "data", 10)
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "jobs.sqlite3")) as db, db:
        db.execute("UPDATE jobs SET error = x'c1', state = 'dead' WHERE id = ?", (ids[3],))  # not msgpack
    report = recover(tmp_path / "data")
    assert (report.salvaged, report.dropped) == (9, [ids[3]]) and report.next_job_id == 11
    assert "dropped 1 unreadable jobs: ids 4" in report.describe()
    assert report.moved_to is not None and (report.moved_to / "jobs.sqlite3").exists()
    store = SqliteStore(tmp_path / "data")
    jobs = store.load(0.0, WALL).jobs
    store.close()
    assert [job.id for job in jobs] == ids[:3] + ids[4:]


def test_recover_salvages_the_readable_pages_of_a_damaged_file(tmp_path: Path) -> None:
    ids = _store_with_jobs(tmp_path / "data", 2000)
    database = tmp_path / "data" / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(database)) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    with open(database, "r+b") as file:  # two pages in the middle become noise
        file.seek(page_size * (pages // 2))
        file.write(bytes(range(256)) * (2 * page_size // 256))
    with pytest.raises(StorageError):
        SqliteStore(tmp_path / "data").load(0.0, WALL)
    report = recover(tmp_path / "data")
    assert 1500 < report.salvaged < 2000 and (report.dropped or report.unreadable)
    store = SqliteStore(tmp_path / "data")
    salvaged = store.load(0.0, WALL)
    store.close()
    assert {job.id for job in salvaged.jobs} < set(ids) and salvaged.next_job_id == 2001
    assert all(msgpack.unpackb(job.payload)["pad"] == "x" * 300 for job in salvaged.jobs)


def test_queue_controls_survive_a_restart(open_store: Callable[[], Store]) -> None:
    clock = FakeClock()
    scheduler = Scheduler(track_changes=True)
    scheduler.configure_queue("slow", clock.now(), paused=True, concurrency=2, rate=7.5)
    scheduler.configure_queue("gone", clock.now(), paused=True)
    scheduler.configure_queue("gone", clock.now(), paused=False)
    store = open_store()
    store.write(serialize(scheduler.take_changes(), clock.now(), WALL), scheduler.next_job_id)
    store.close()
    reopened = open_store()
    recovered = reopened.load(0.0, WALL)
    reopened.close()
    assert set(recovered.controls) == {"slow"}
    restored = Scheduler()
    restored.restore(recovered.jobs, recovered.next_job_id, 0.0)
    restored.restore_controls(recovered.controls, 0.0)
    queue = restored.stats(0.0)["queues"]["slow"]
    assert (queue["paused"], queue["concurrency"], queue["rate"]) == (True, 2, 7.5)


def test_a_jobs_own_options_survive_a_restart(open_store: Callable[[], Store]) -> None:
    clock = FakeClock()
    scheduler = Scheduler(track_changes=True)
    scheduler.open_session(1, clock.now())
    (job_id,) = scheduler.submit(1, "q", [b"x"], clock.now(), timeout=9.0, result_ttl=1234.0, max_backoff=7.0)
    store = open_store()
    store.write(serialize(scheduler.take_changes(), clock.now(), WALL), scheduler.next_job_id)
    store.close()
    reopened = open_store()
    (job,) = reopened.load(0.0, WALL).jobs
    reopened.close()
    assert (job.id, job.timeout, job.result_ttl, job.max_backoff) == (job_id, 9.0, 1234.0, 7.0)


def test_jobs_waiting_for_others_survive_a_restart(open_store: Callable[[], Store]) -> None:
    clock = FakeClock()
    scheduler = Scheduler(track_changes=True)
    now = clock.now()
    scheduler.open_session(1, now)
    first, second = scheduler.submit(1, "q", [b"a", b"b"], now)
    (child,) = scheduler.submit(1, "q", [b"c"], now, after=[first, second])
    scheduler.stored(scheduler.next_job_id)
    scheduler.reserve(1, ["q"], 1, now)
    (deliver,) = [e for e in scheduler.flush(now) if isinstance(e, Deliver)]
    ((job_id, token, *_),) = deliver.jobs
    assert job_id == first
    scheduler.complete(1, [[first, token, b"A"]], now)  # the child keeps this result
    store = open_store()
    store.write(serialize(scheduler.take_changes(), now, WALL), scheduler.next_job_id)
    store.close()

    reopened = open_store()
    recovered = reopened.load(0.0, WALL)
    reopened.close()
    restored = Scheduler(track_changes=True)
    restored.restore(recovered.jobs, recovered.next_job_id, 0.0)
    assert restored.job_info(child)["state"] == "waiting" and restored.job_info(child)["waiting_on"] == 1
    restored.open_session(2, 0.0)
    restored.reserve(2, ["q"], 1, 0.0)
    (deliver,) = [e for e in restored.flush(0.0) if isinstance(e, Deliver)]
    ((job_id, token, *_),) = deliver.jobs
    assert job_id == second
    restored.complete(2, [[second, token, b"B"]], 0.0)
    (deliver,) = [e for e in restored.flush(0.0) if isinstance(e, Deliver)]
    ((job_id, _, _, _, _, _, _, parents),) = deliver.jobs
    assert (job_id, parents) == (child, [b"A", b"B"])


def test_schedules_survive_a_restart_and_a_removed_one_is_gone(open_store: Callable[[], Store]) -> None:
    store = open_store()
    nightly, hourly = {"name": "nightly", "cron": "0 3 * * *"}, {"name": "hourly", "every": 3600.0}
    store.write(WriteBatch(schedules={"nightly": msgpack.packb(nightly), "hourly": msgpack.packb(hourly)}), 1)
    store.write(WriteBatch(schedules={"hourly": None}), 1)
    store.close()
    reopened = open_store()
    assert reopened.load(0.0, WALL).schedules == [nightly]
    reopened.close()


def test_a_batch_written_again_after_an_unknown_outcome_is_harmless(open_store: Callable[[], Store]) -> None:
    """A commit whose outcome was not known (a connection lost during COMMIT) is written again,
    merged with what came after: nothing doubles, and every job ends in its latest state."""
    clock = FakeClock()
    scheduler = Scheduler(SchedulerConfig(result_ttl=100.0), track_changes=True)
    scheduler.open_session(1, clock.now())
    first, second = scheduler.submit(1, "q", [b"a", b"b"], clock.now())
    created = serialize(scheduler.take_changes(), clock.now(), WALL)
    scheduler.stored(scheduler.next_job_id)
    scheduler.cancel([first], clock.now())
    cancelled = serialize(scheduler.take_changes(), clock.now(), WALL)
    scheduler.reserve(1, ["q"], 1, clock.now())
    (deliver,) = [e for e in scheduler.flush(clock.now()) if isinstance(e, Deliver)]
    scheduler.complete(1, [[second, deliver.jobs[0][1], b"B"]], clock.now())
    completed = serialize(scheduler.take_changes(), clock.now(), WALL)
    store = open_store()
    store.write(created.then(cancelled), scheduler.next_job_id)  # it landed, but was not known to
    store.write(created.then(cancelled).then(completed), scheduler.next_job_id)  # so again, merged
    store.write(completed, scheduler.next_job_id)
    store.close()
    reopened = open_store()
    recovered = reopened.load(0.0, WALL)
    reopened.close()
    states = {job.id: (str(job.state), job.result) for job in recovered.jobs}
    assert states == {first: ("cancelled", None), second: ("done", b"B")} and recovered.next_job_id == 3
