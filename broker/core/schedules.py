"""Periodic jobs kept by the broker (docs/protocol.md, "schedule_set"): a cron expression or an
interval, the ticks they fall on, and which tick is due. Pure: wall-clock times come in.

Ticks are exact instants (cron: minutes in the schedule's time zone; `every`: multiples of the
interval since the Unix epoch), so that a tick has one name whatever broker fires it and
whenever: the job it submits carries the idempotency key `schedule:NAME:TICK`, and the last
tick fired is stored with that job, in the same commit.
"""

from __future__ import annotations

import datetime
import math
import zoneinfo
from dataclasses import dataclass, field
from typing import Any

import msgpack
from jobbroker.broker.errors import InvalidRequest

__all__ = ["CronExpression", "Schedule", "Schedules", "schedule_from_settings"]

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12), ("day of week", 0, 6))
_SEARCH_YEARS = 5  # a cron expression that matches nothing within this long is refused


class CronExpression:
    """Five fields, minute hour day-of-month month day-of-week, each `*`, `N`, `A-B`, any of
    those with `/STEP`, or a comma list of them; day of week 0-6 from Sunday (7 is Sunday too).
    As in cron, when both day fields are restricted a day matching either one matches."""

    def __init__(self, text: str) -> None:
        parts = text.split()
        if len(parts) != 5:
            raise InvalidRequest(f"a cron expression has 5 fields (minute hour day month weekday), not {text!r}")
        self.text = text
        self.minutes, self.hours, self.days, self.months, weekdays = (
            _field(part, name, low, high + (1 if name == "day of week" else 0))
            for part, (name, low, high) in zip(parts, _FIELDS, strict=True)
        )
        self.weekdays = {day % 7 for day in weekdays}
        self.any_day = parts[2] == "*"
        self.any_weekday = parts[4] == "*"

    def next_after(self, after: float, zone: datetime.tzinfo) -> float:
        """The first tick strictly after `after` (Unix time), as Unix time.

        Raises:
            InvalidRequest: no tick within _SEARCH_YEARS (February 30th).
        """
        local = datetime.datetime.fromtimestamp(after, zone).replace(second=0, microsecond=0, tzinfo=None)
        moment = local + datetime.timedelta(minutes=1)
        limit = moment + datetime.timedelta(days=366 * _SEARCH_YEARS)
        while moment < limit:
            if moment.month not in self.months:
                year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
                moment = moment.replace(year=year, month=month, day=1, hour=0, minute=0)
            elif not self._day_matches(moment):
                moment = (moment + datetime.timedelta(days=1)).replace(hour=0, minute=0)
            elif moment.hour not in self.hours:
                moment = (moment + datetime.timedelta(hours=1)).replace(minute=0)
            elif moment.minute not in self.minutes:
                moment += datetime.timedelta(minutes=1)
            else:
                tick = moment.replace(tzinfo=zone).timestamp()
                if tick > after:  # (a wall-clock hour repeated at a DST change)
                    return tick
                moment += datetime.timedelta(minutes=1)
        raise InvalidRequest(f"the cron expression {self.text!r} matches no time in {_SEARCH_YEARS} years")

    def _day_matches(self, moment: datetime.datetime) -> bool:
        in_month = moment.day in self.days
        in_week = (moment.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week
        return in_month or in_week


def _field(text: str, name: str, low: int, high: int) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        spec, _, step_text = part.partition("/")
        try:
            step = int(step_text) if step_text else 1
            if spec == "*":
                first, last = low, high
            elif "-" in spec:
                first_text, last_text = spec.split("-", 1)
                first, last = int(first_text), int(last_text)
            else:
                first = int(spec)
                last = high if step_text else first
        except ValueError:
            raise InvalidRequest(f"cron {name} field: {text!r} is not a number, range, * or step") from None
        if step < 1 or not low <= first <= last <= high:
            raise InvalidRequest(f"cron {name} field: {text!r} is out of {low}-{high}")
        values.update(range(first, last + 1, step))
    return values


@dataclass(slots=True)
class Schedule:
    """One periodic job. `options` are submit options (priority, max_attempts, timeout...)."""

    name: str
    queue: str
    payload: bytes  # opaque, as a submit's (see payload_bytes)
    cron: str | None = None
    every: float | None = None
    tz: str = "UTC"
    catch_up: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    last_tick: float | None = None  # the last tick fired (Unix time)
    next_tick: float = 0.0  # the next tick due (Unix time)
    _expression: CronExpression | None = field(default=None, repr=False)
    _zone: datetime.tzinfo | None = field(default=None, repr=False)

    def check(self) -> None:
        """Raises InvalidRequest for a schedule that cannot work."""
        if (self.cron is None) == (self.every is None):
            raise InvalidRequest("a schedule has a cron expression or an interval (every), one of them")
        if self.every is not None and not 1.0 <= self.every <= 366 * 86400.0:
            raise InvalidRequest("every is between 1 second and a year")
        try:
            self._zone = zoneinfo.ZoneInfo(self.tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise InvalidRequest(f"unknown time zone {self.tz!r}") from None
        if self.cron is not None:
            self._expression = CronExpression(self.cron)

    def tick_after(self, after: float) -> float:
        """The first tick strictly after `after`."""
        if self.every is not None:
            return (math.floor(after / self.every) + 1) * self.every
        assert self._expression is not None and self._zone is not None
        return self._expression.next_after(after, self._zone)

    def record(self) -> dict[str, Any]:
        """What is stored, and what schedule_list shows."""
        return {
            "name": self.name,
            "queue": self.queue,
            "payload": self.payload,
            "cron": self.cron,
            "every": self.every,
            "tz": self.tz,
            "catch_up": self.catch_up,
            "options": self.options,
            "last_tick": self.last_tick,
            "next_tick": self.next_tick,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Schedule:
        schedule = cls(
            record["name"],
            record["queue"],
            payload_bytes(record["payload"]),
            cron=record.get("cron"),
            every=record.get("every"),
            tz=record.get("tz", "UTC"),
            catch_up=record.get("catch_up", True),
            options=dict(record.get("options") or {}),
            last_tick=record.get("last_tick"),
        )
        schedule.check()
        return schedule


def payload_bytes(value: Any) -> bytes:
    """A schedule's payload as its jobs carry it: bytes as they are (a `schedule_set`'s,
    opaque); nil, and a config file's TOML value (or a record stored by version 1), packed as
    msgpack, which is what the default serializer of the Python client reads."""
    if type(value) is bytes:
        return value
    return msgpack.packb(value, use_bin_type=True)


def schedule_from_settings(name: str, settings: dict[str, Any]) -> Schedule:
    """A schedule from a `schedule_set` request's fields or a config file's [schedules.NAME]
    table: queue, payload, cron or every, tz, catch_up, and submit options.

    Raises:
        InvalidRequest: a field missing or unknown.
    """
    settings = dict(settings)
    try:
        queue = settings.pop("queue")
    except KeyError:
        raise InvalidRequest(f"schedule {name!r} names no queue") from None
    schedule = Schedule(
        name,
        queue,
        payload_bytes(settings.pop("payload", None)),
        cron=settings.pop("cron", None),
        every=None if settings.get("every") is None else float(settings.pop("every")),
        tz=settings.pop("tz", None) or "UTC",
        catch_up=bool(settings.pop("catch_up", True)),
    )
    settings.pop("every", None)
    schedule.options = {key: value for key, value in settings.items() if value is not None}
    return schedule


class Schedules:
    """Every schedule of a broker, and which tick comes next."""

    def __init__(self) -> None:
        self._by_name: dict[str, Schedule] = {}
        # The earliest next tick, kept between changes: the broker asks after every loop turn.
        self._next_due: float | None = None
        self._next_due_known = True

    def __len__(self) -> int:
        return len(self._by_name)

    def set(self, schedule: Schedule, wall: float) -> None:
        """Add or replace a schedule: its next tick is the first after now (a replaced one
        keeps its last tick, so that a tick already fired does not fire again)."""
        schedule.check()
        old = self._by_name.get(schedule.name)
        if old is not None and schedule.last_tick is None:
            schedule.last_tick = old.last_tick
        schedule.next_tick = schedule.tick_after(wall)
        self._by_name[schedule.name] = schedule
        self._next_due_known = False

    def restore(self, schedule: Schedule, wall: float) -> None:
        """A stored schedule, after a restart: a tick missed while the broker was down fires
        once now (the latest of them) if the schedule catches up, else it waits for the next."""
        missed = schedule.tick_after(schedule.last_tick) if schedule.last_tick is not None else None
        if missed is not None and missed <= wall and schedule.catch_up:
            schedule.next_tick = missed
        else:
            schedule.next_tick = schedule.tick_after(wall)
        self._by_name[schedule.name] = schedule
        self._next_due_known = False

    def remove(self, name: str) -> Schedule | None:
        self._next_due_known = False
        return self._by_name.pop(name, None)

    def get(self, name: str) -> Schedule | None:
        return self._by_name.get(name)

    def all(self) -> list[Schedule]:
        return sorted(self._by_name.values(), key=lambda schedule: schedule.name)

    def next_due(self) -> float | None:
        """The earliest next tick (Unix time), or None without schedules."""
        if not self._next_due_known:
            self._next_due = min((s.next_tick for s in self._by_name.values()), default=None)
            self._next_due_known = True
        return self._next_due

    def due(self, wall: float) -> list[tuple[Schedule, float]]:
        """The schedules whose tick has come, each with the one tick to fire (the latest one
        come: a broker that was stalled fires once, not once per tick missed), moved on to
        their next tick."""
        fired: list[tuple[Schedule, float]] = []
        if self._next_due_known and (self._next_due is None or self._next_due > wall):
            return fired
        self._next_due_known = False
        for schedule in self._by_name.values():
            if schedule.next_tick > wall:
                continue
            if schedule.every is not None:  # ticks passed meanwhile: only the latest fires
                tick = math.floor(wall / schedule.every) * schedule.every
                later = tick + schedule.every
            else:
                tick = schedule.next_tick
                later = schedule.tick_after(tick)
                while later <= wall:
                    tick, later = later, schedule.tick_after(later)
            schedule.last_tick = tick
            schedule.next_tick = later
            fired.append((schedule, tick))
        return fired
