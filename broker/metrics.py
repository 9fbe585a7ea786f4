"""Prometheus metrics (`jobbroker serve --metrics-port P`, served by broker/web.py), through
prometheus_client.

Nothing here runs on the hot paths: the server keeps plain integer counters and the scheduler
its own counts; at each scrape, the HTTP thread asks the event loop for one consistent
snapshot (broker/reports.py's metrics(), plain data) and turns it into metric families.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

__all__ = ["MetricsCollector"]


_QUEUE_GAUGES = {
    "pending": "Jobs waiting for a worker",
    "delayed": "Jobs waiting for their not-before time or a retry",
    "in_flight": "Jobs leased to workers",
    "dead": "Jobs in the dead-letter list",
}
_QUEUE_COUNTERS = {
    "submitted": "Jobs submitted",
    "completed": "Jobs completed",
    "failed": "Failed attempts",
    "buried": "Jobs moved to the dead-letter list",
    "requeued": "Jobs requeued after a lost lease (expired, or their worker died)",
}
_TRAFFIC = {
    "frames_in": "Frames received",
    "frames_out": "Frames sent",
    "bytes_in": "Bytes received",
    "bytes_out": "Bytes sent",
    "auth_failures": "Failed authentications",
    "dead_workers": "Workers declared dead (connection lost or heartbeats missed) while holding jobs",
}


class MetricsCollector:
    """Turns one snapshot (reports.metrics(): the scheduler's counts with "run_time_bounds",
    plus "traffic") into metric families."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        data = self._snapshot()
        queues: dict[str, dict[str, Any]] = data["queues"]
        for name, help_text in _QUEUE_GAUGES.items():
            family = GaugeMetricFamily(f"jobbroker_jobs_{name}", help_text, labels=["queue"])
            for queue, counts in queues.items():
                family.add_metric([queue], counts[name])
            yield family
        paused = GaugeMetricFamily("jobbroker_queue_paused", "1 if the queue's deliveries are paused", labels=["queue"])
        limits = GaugeMetricFamily(
            "jobbroker_queue_concurrency_limit",
            "Jobs of the queue held by workers at most (set limits only)",
            labels=["queue"],
        )
        rates = GaugeMetricFamily(
            "jobbroker_queue_rate_limit", "Deliveries a second at most (set limits only)", labels=["queue"]
        )
        for queue, counts in queues.items():
            paused.add_metric([queue], 1.0 if counts["paused"] else 0.0)
            if counts["concurrency"] is not None:
                limits.add_metric([queue], counts["concurrency"])
            if counts["rate"] is not None:
                rates.add_metric([queue], counts["rate"])
        yield from (paused, limits, rates)
        for name, help_text in _QUEUE_COUNTERS.items():
            counter = CounterMetricFamily(f"jobbroker_jobs_{name}", help_text, labels=["queue"])
            for queue, counts in queues.items():
                counter.add_metric([queue], counts[name])
            yield counter
        run_time = HistogramMetricFamily(
            "jobbroker_job_run_seconds", "Time from delivery to completion", labels=["queue"]
        )
        bounds = [*map(str, data["run_time_bounds"]), "+Inf"]
        for queue, counts in queues.items():
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, counts["run_time_counts"], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            run_time.add_metric([queue], buckets, counts["run_time_sum"])
        yield run_time
        yield GaugeMetricFamily("jobbroker_workers_connected", "Connected workers", value=data["workers"])
        yield GaugeMetricFamily("jobbroker_clients_connected", "Authenticated connections", value=data["sessions"])
        for name, help_text in _TRAFFIC.items():
            yield CounterMetricFamily(f"jobbroker_{name}", help_text, value=data["traffic"][name])
