"""The access rules' pure parts: the warning limiter (the throttle is tested in test_auth)."""

from jobbroker.broker.access import WarningLimiter


def test_one_warning_line_per_source_per_interval_with_a_count() -> None:
    limiter = WarningLimiter(interval=10.0)
    assert limiter.hit("auth failed", "10.0.0.1", 0.0) == 1  # the first is logged at once
    assert [limiter.hit("auth failed", "10.0.0.1", t / 100) for t in range(1, 1000)] == [0] * 999
    assert limiter.hit("auth failed", "10.0.0.2", 1.0) == 1  # another source has its own line
    assert limiter.hit("refusing", "10.0.0.1", 1.0) == 1  # and another kind
    assert limiter.flush(5.0) == []  # the interval has not ended
    assert limiter.flush(10.5) == [("auth failed", "10.0.0.1", 999)]
    assert limiter.hit("auth failed", "10.0.0.1", 12.0) == 0  # a new interval began at the flush
    assert limiter.hit("auth failed", "10.0.0.1", 21.0) == 2  # this one and the one hidden
    assert limiter.flush(40.0) == [] and limiter.flush(60.0) == []  # quiet sources are forgotten
    assert limiter.hit("auth failed", "10.0.0.1", 61.0) == 1


def test_the_warning_limiter_remembers_a_bounded_number_of_sources() -> None:
    limiter = WarningLimiter(interval=10.0, max_sources=100)
    for i in range(1000):
        limiter.hit("auth failed", f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limiter._sources) == 100
