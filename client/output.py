"""The client-side commands' text: tables of stats, jobs and schedules (client/cli.py)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

__all__ = ["controls_text", "error_text", "format_stats", "table", "when"]


def when(unix_time: float) -> str:
    return datetime.datetime.fromtimestamp(unix_time, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def controls_text(settings: Mapping[str, Any]) -> str:
    parts = ["paused" if settings.get("paused") else "delivering"]
    if settings.get("concurrency") is not None:
        parts.append(f"at most {settings['concurrency']} held at once")
    if settings.get("rate") is not None:
        parts.append(f"at most {settings['rate']:g} a second")
    return ", ".join(parts)


def controls_brief(queue: Mapping[str, Any]) -> str:
    """A queue's controls in a stats column: "paused", "max 2", "20/s" ("-": none)."""
    parts = ["paused"] if queue.get("paused") else []
    if queue.get("concurrency") is not None:
        parts.append(f"max {queue['concurrency']}")
    if queue.get("rate") is not None:
        parts.append(f"{queue['rate']:g}/s")
    return " ".join(parts) or "-"


def format_stats(info: dict[str, Any]) -> str:
    """Stats as readable tables: queues, workers, then running jobs that report progress."""
    from jobbroker.client.progress import progress_bar

    columns = [
        "queue",
        "pending",
        "waiting",
        "delayed",
        "in_flight",
        "dead",
        "done",
        "failed",
        "done/s",
        "workers",
        "controls",
    ]
    rows = [
        [
            name,
            q["pending"],
            q.get("waiting", 0),
            q["delayed"],
            q["in_flight"],
            q["dead"],
            q["done"],
            q["failed"],
            f"{q['done_per_second']:.1f}",  # the broker sends exact rates
            q["workers"],
            controls_brief(q),
        ]
        for name, q in sorted(info["queues"].items())
    ]
    lines = table(columns, rows) if rows else ["(no queues)"]
    worker_rows = [
        [
            w["session"],
            w["name"],
            w["peer"],
            ",".join(w["queues"]),
            len(w["in_flight"]),
            f"{w['last_heartbeat_age']:.1f}s",
        ]
        for w in info["workers"]
    ]
    lines.append("")
    if worker_rows:
        lines += table(["session", "worker", "peer", "queues", "in_flight", "last_seen"], worker_rows)
    else:
        lines.append("(no workers)")
    progress_rows = [
        [
            job["id"],
            job["queue"],
            w["session"],
            f"{progress_bar(job['progress']['fraction'], 20)} {job['progress']['fraction']:4.0%}",
            job["progress"]["message"],
            f"{job['running_seconds']:.1f}s",
        ]
        for w in info["workers"]
        for job in w.get("running", ())
        if job["progress"] is not None
    ]
    if progress_rows:
        lines.append("")
        lines += table(["job", "queue", "session", "progress", "message", "running"], progress_rows)
    return "\n".join(lines)


def table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [columns] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]


def error_text(error: dict[str, Any] | None) -> str:
    return "" if not error else f"{error.get('type')}: {error.get('message')}"
