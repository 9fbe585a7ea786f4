import pytest
from jobbroker.broker.core.limits import (
    MAX_RETRY_DELAY,
    SchedulerConfig,
    check_batch,
    check_controls,
    check_keys,
    check_listing,
    check_queue_name,
    check_submit,
    failure,
    retry_delay,
)
from jobbroker.broker.errors import InvalidRequest, LimitExceeded

CONFIG = SchedulerConfig(max_batch=10)
DEFAULTS = {
    "priority": 0,
    "delay": 0.0,
    "max_attempts": None,
    "lease": None,
    "backoff": None,
    "timeout": None,
    "result_ttl": None,
    "max_backoff": None,
    "after": None,
}


@pytest.mark.parametrize("name", ["q", "emails.high", "a:b/c@d-e_f", "x" * 200])
def test_queue_names_accepted(name: str) -> None:
    check_queue_name(name)


@pytest.mark.parametrize("name", ["", ".q", "with space", "é", "x" * 201, "q\n"])
def test_queue_names_refused(name: str) -> None:
    with pytest.raises(InvalidRequest):
        check_queue_name(name)


def test_batches_past_the_limit_are_refused() -> None:
    check_batch(CONFIG, 10)
    with pytest.raises(LimitExceeded):
        check_batch(CONFIG, 11)


def test_submit_fills_in_the_defaults() -> None:
    assert check_submit(CONFIG, **DEFAULTS) == (3, 30.0, 1.0)
    assert check_submit(CONFIG, **{**DEFAULTS, "max_attempts": 1, "lease": 5.0, "backoff": 0.0}) == (1, 5.0, 0.0)


@pytest.mark.parametrize(
    "option",
    [
        {"priority": 2**31},
        {"delay": -1.0},
        {"max_attempts": 0},
        {"lease": 0.0},
        {"backoff": 86401.0},
        {"timeout": 0.0},
        {"result_ttl": 8 * 86400.0},
        {"max_backoff": -1.0},
        {"after": [1], "delay": 1.0},
    ],
)
def test_submit_options_out_of_range_are_refused(option: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        check_submit(CONFIG, **{**DEFAULTS, **option})  # type: ignore[arg-type]


def test_too_many_jobs_to_run_after_is_a_limit() -> None:
    with pytest.raises(LimitExceeded):
        check_submit(CONFIG, **{**DEFAULTS, "after": list(range(11))})  # type: ignore[arg-type]


def test_keys_one_per_payload_each_of_bounded_length() -> None:
    check_keys(["a", None], 2)
    for keys in (["a"], ["", None], ["k" * 201, None]):
        with pytest.raises(InvalidRequest):
            check_keys(keys, 2)


def test_controls_and_listings_in_range() -> None:
    check_controls(0, 0.0)
    check_controls(None, None)
    for concurrency, rate in ((-1, None), (None, float("nan")), (None, 2e6)):
        with pytest.raises(InvalidRequest):
            check_controls(concurrency, rate)
    check_listing("dead", ["pending", "dead"], 1000)
    with pytest.raises(InvalidRequest):
        check_listing("done", ["pending", "dead"], 10)
    with pytest.raises(InvalidRequest):
        check_listing("dead", ["pending", "dead"], 0)


def test_retry_delay_is_clamped_and_nan_means_the_backoff() -> None:
    assert retry_delay(None) is None
    assert retry_delay(float("nan")) is None
    assert retry_delay(-5.0) == 0.0
    assert retry_delay(1e12) == MAX_RETRY_DELAY


def test_a_failure_is_bounded_and_keeps_a_traceback_only_when_given() -> None:
    assert failure("E", "m") == {"type": "E", "message": "m"}
    long = failure("E" * 10_000, "m" * 100_000, "t" * 1_000_000)
    assert len(long["type"]) < 10_000 and len(long["message"]) < 100_000 and len(long["traceback"]) < 1_000_000
    assert long["traceback"].endswith("t")  # the end of a traceback is kept: where it failed
