"""What the broker's HTTP port reports (/metrics and the dashboard), made from plain data.

The server hands over a ReportSource (its counts, stats and dead letters as dicts and lists,
the traffic counters); this module shapes them into the two documents that broker/web.py
serves. It imports nothing from broker/core/: the job core's figures arrive as plain data.
Every call is made on the broker's event loop (web.py arranges that).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["DASHBOARD_DEAD_LETTERS", "ReportSource", "TrafficCounters", "metrics", "overview"]

DASHBOARD_DEAD_LETTERS = 100  # the latest dead letters the dashboard lists


@dataclass(slots=True)
class TrafficCounters:
    """What the server counts as it goes: plain integers, bumped on the event loop."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    auth_failures: int = 0
    dead_workers: int = 0


class ReportSource(Protocol):
    """What the server hands the reports."""

    @property
    def traffic(self) -> TrafficCounters: ...

    def counts(self) -> dict[str, Any]:
        """Per queue gauges, totals and run-time histograms (with "run_time_bounds", the
        histogram's bucket bounds in seconds); "workers" and "sessions" connected."""
        ...

    def stats(self) -> dict[str, Any]:
        """What the `stats` request answers: queues with rates, workers, sessions, jobs."""
        ...

    def dead_letters(self, queue: str, limit: int) -> list[dict[str, Any]]:
        """The latest dead jobs of a queue, as the `dead_list` request answers."""
        ...

    def about(self) -> dict[str, Any]:
        """The broker itself: "address", "version", "durable", "uptime_seconds"."""
        ...


def metrics(source: ReportSource) -> dict[str, Any]:
    """The figures /metrics shows: the scheduler's counts and the traffic counters."""
    return {**source.counts(), "traffic": dataclasses.asdict(source.traffic)}


def overview(source: ReportSource) -> dict[str, Any]:
    """What the dashboard shows: the broker, its queues with rates, its workers with their
    running jobs, the latest dead letters with their errors (not their payloads)."""
    stats = source.stats()
    for worker in stats["workers"]:
        worker["in_flight"] = len(worker["in_flight"])
    dead = [
        {"queue": name, **{k: job[k] for k in ("id", "attempts", "max_attempts", "error")}}
        for name, counts in sorted(stats["queues"].items())
        if counts["dead"]
        for job in source.dead_letters(name, DASHBOARD_DEAD_LETTERS)
    ]
    broker = {
        **source.about(),
        "draining": stats.pop("draining"),
        "sessions": stats.pop("sessions"),
        "jobs": stats.pop("jobs"),
    }
    traffic = dataclasses.asdict(source.traffic)
    return {**stats, "broker": broker, "dead": dead[:DASHBOARD_DEAD_LETTERS], "traffic": traffic}
