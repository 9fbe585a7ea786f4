"""Periodic jobs, pure: cron expressions, intervals, which tick is due, catching up."""

from __future__ import annotations

import datetime
import zoneinfo

import pytest
from jobbroker.broker.core.scheduler import Scheduler
from jobbroker.broker.core.schedules import CronExpression, Schedule, Schedules
from jobbroker.broker.errors import InvalidRequest

UTC = datetime.UTC


def at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def iso(unix: float, zone: datetime.tzinfo = UTC) -> str:
    return datetime.datetime.fromtimestamp(unix, zone).isoformat(timespec="minutes")


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("*/5 * * * *", "2026-11-23T10:02", "2026-11-23T10:05+00:00"),
        ("0 3 * * *", "2026-11-23T10:02", "2026-11-24T03:00+00:00"),
        ("30 9 1 * *", "2026-11-23T10:02", "2026-12-01T09:30+00:00"),
        ("0 0 * * 0", "2026-11-23T10:02", "2026-11-29T00:00+00:00"),  # Sunday
        ("0 0 * * 7", "2026-11-23T10:02", "2026-11-29T00:00+00:00"),  # 7 is Sunday too
        ("0 12 13 * 5", "2026-11-23T10:02", "2026-11-27T12:00+00:00"),  # the 13th or a Friday
        ("15,45 8-9 * * 1-5", "2026-11-27T09:50", "2026-11-30T08:15+00:00"),  # Friday, then Monday
        ("0 0 29 2 *", "2026-03-01T00:00", "2028-02-29T00:00+00:00"),
        ("59 23 31 12 *", "2026-12-31T23:59", "2027-12-31T23:59+00:00"),
    ],
)
def test_cron_next_tick(expression: str, after: str, expected: str) -> None:
    assert iso(CronExpression(expression).next_after(at(after), UTC)) == expected


def test_cron_in_a_time_zone_follows_its_clock_across_dst() -> None:
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    cron = CronExpression("0 9 * * *")
    before_change = datetime.datetime(2026, 3, 28, 10, 0, tzinfo=paris).timestamp()
    tick = cron.next_after(before_change, paris)
    assert iso(tick, paris) == "2026-03-29T09:00+02:00"  # summer time started that night


@pytest.mark.parametrize("bad", ["* * * *", "60 * * * *", "* 24 * * *", "*/0 * * * *", "a * * * *", "0 0 30 2 *"])
def test_bad_cron_expressions_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        CronExpression(bad).next_after(at("2026-01-01T00:00"), UTC)


def test_an_interval_ticks_on_multiples_of_itself_and_a_stall_fires_once() -> None:
    schedules = Schedules()
    schedules.set(Schedule("s", "q", None, every=10.0), 1000.5)
    assert schedules.next_due() == 1010.0
    assert schedules.due(1009.9) == []
    ((fired, tick),) = schedules.due(1010.0)
    assert (fired.name, tick, schedules.next_due()) == ("s", 1010.0, 1020.0)
    ((_, tick),) = schedules.due(1075.0)  # a stall over six ticks: the latest fires, once
    assert (tick, schedules.next_due()) == (1070.0, 1080.0)


@pytest.mark.parametrize(("catch_up", "fired_on_start"), [(True, [1090.0]), (False, [])])
def test_a_tick_missed_while_down_runs_once_on_start_unless_told_not_to(
    catch_up: bool, fired_on_start: list[float]
) -> None:
    stored = Schedule("s", "q", None, every=10.0, catch_up=catch_up, last_tick=1020.0)
    stored.check()
    schedules = Schedules()
    schedules.restore(stored, 1095.0)  # down from 1020 to 1095: seven ticks missed
    assert [tick for _, tick in schedules.due(1095.0)] == fired_on_start  # the latest, once
    assert schedules.next_due() == 1100.0


def test_each_tick_submits_one_job_keyed_by_the_tick() -> None:
    scheduler = Scheduler(track_changes=True)
    scheduler.set_schedule(Schedule("ping", "q", {"n": 1}, every=1.0, options={"priority": 5}), 100.2)
    assert scheduler.fire_schedules(0.0, 100.9) == []
    assert scheduler.fire_schedules(0.0, 101.0) == [("ping", 101.0, None)]
    assert scheduler.fire_schedules(0.0, 101.5) == []
    info = scheduler.job_info(1)
    assert (info["payload"], info["priority"], info["key"]) == ({"n": 1}, 5, "schedule:ping:101.000")
    changes = scheduler.take_changes()
    assert changes.schedules["ping"] is not None and changes.schedules["ping"]["last_tick"] == 101.0
    with pytest.raises(InvalidRequest, match="options"):
        scheduler.set_schedule(Schedule("bad", "q", None, every=1.0, options={"lease": 3}), 0.0)
    with pytest.raises(InvalidRequest, match="time zone"):
        scheduler.set_schedule(Schedule("tz", "q", None, cron="* * * * *", tz="Mars/Base"), 0.0)
