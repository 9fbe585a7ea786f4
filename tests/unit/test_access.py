"""broker/access.py: the credentials file, the roles' permissions, the auth throttle and the
warning limiter."""

from pathlib import Path

import pytest
from jobbroker.broker.access import (
    PERMISSIONS,
    AuthThrottle,
    Role,
    WarningLimiter,
    default_credentials,
    load_credentials,
)
from jobbroker.broker.errors import ConfigError
from jobbroker.broker.protocol.credentials import Credential
from jobbroker.broker.protocol.messages import (
    Cancel,
    Complete,
    DeadList,
    Drain,
    Fail,
    JobInfo,
    Reserve,
    Started,
    Stats,
    Submit,
    Watch,
)


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


def write_secret(path: Path, secret: bytes) -> None:
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)


def test_a_credentials_file_gives_names_roles_and_rotating_secrets(tmp_path: Path) -> None:
    write_secret(tmp_path / "a.secret", b"a" * 20)
    write_secret(tmp_path / "a-next.secret", b"n" * 20)
    write_secret(tmp_path / "w.secret", b"w" * 20)
    path = tmp_path / "credentials.toml"
    path.write_text(
        '[app]\nrole = "producer"\nsecret_files = ["a.secret", "a-next.secret"]\n'
        '[runner]\nrole = "worker"\nsecret_files = ["w.secret"]\n'
    )
    loaded = load_credentials(path)
    assert loaded["app"] == Credential("app", "producer", (b"a" * 20, b"n" * 20))  # relative to the file
    assert loaded["runner"].role == Role.WORKER


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "names no credential"),
        ('app = "x"\n', "must be a table"),
        ('[app]\nrole = "boss"\nsecret_files = ["s"]\n', "has role 'boss'"),
        ('[app]\nrole = "admin"\n', "needs secret_files"),
        ('[app]\nrole = "admin"\nsecret_files = ["missing"]\n', "cannot read secret file"),
        ("[app\n", "cannot read credentials file"),
        ('[app]\nrole = "admin"\nsecret_files = [' + ", ".join(['"s"'] * 9) + "]\n", "more than 8 secrets"),
    ],
)
def test_a_bad_credentials_file_is_a_config_error_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "credentials.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_credentials(path)


def test_roles_grant_what_docs_security_says() -> None:
    producer, worker, admin = (PERMISSIONS[role] for role in (Role.PRODUCER, Role.WORKER, Role.ADMIN))
    assert {Submit.op, Watch.op, Cancel.op, JobInfo.op} <= producer and Reserve.op not in producer
    assert {Reserve.op, Complete.op, Fail.op, Started.op} <= worker and Submit.op not in worker
    assert producer | worker <= admin and {Stats.op, Drain.op, DeadList.op} <= admin
    assert Stats.op not in producer | worker
    assert default_credentials(b"k" * 20) == {"default": Credential("default", Role.ADMIN, (b"k" * 20,))}


def test_the_throttle_doubles_its_delay_per_failure_up_to_its_cap_and_forgets() -> None:
    throttle = AuthThrottle(base=0.1, cap=0.5, forget_after=60.0, max_addresses=2)
    assert throttle.delay("a", 0.0) == 0.0
    for n in range(4):
        throttle.failed("a", float(n))
    assert throttle.delay("a", 4.0) == 0.5  # 0.1, 0.2, 0.4, then capped
    assert throttle.delay("a", 100.0) == 0.0  # quiet long enough: forgotten
    throttle.succeeded("a")
    assert throttle.delay("a", 5.0) == 0.0
    for address in ("b", "c", "d"):
        throttle.failed(address, 0.0)
    assert throttle.delay("b", 0.0) == 0.0 and throttle.delay("d", 0.0) == 0.1  # at most 2 remembered
