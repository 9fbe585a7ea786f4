"""`jobbroker serve` settings: flags, then JOBBROKER_* variables, then the config file, then defaults."""

from pathlib import Path

import pytest
from jobbroker.broker.errors import ConfigError

from jobbroker.cli import parse_args


def test_defaults() -> None:
    args = parse_args(["serve"], {})
    assert (args.host, args.port, args.max_pending, args.memory, args.fsync) == (
        "127.0.0.1",
        7878,
        1_000_000,
        False,
        "always",
    )


def test_precedence_flag_then_environment_then_file(tmp_path: Path) -> None:
    config = tmp_path / "jobbroker.toml"
    config.write_text('port = 9000\nmax_pending = 10\nheartbeat = 2.5\nfsync = "interval"\n')
    from_file = parse_args(["serve", "--config", str(config)], {})
    assert (from_file.port, from_file.max_pending, from_file.heartbeat, from_file.fsync) == (9000, 10, 2.5, "interval")

    environ = {"JOBBROKER_MAX_PENDING": "20", "JOBBROKER_MEMORY": "true", "JOBBROKER_CONFIG": str(config)}
    from_environment = parse_args(["serve"], environ)
    assert (from_environment.port, from_environment.max_pending, from_environment.memory) == (9000, 20, True)

    from_flags = parse_args(["serve", "--max-pending", "30", "--port", "1"], environ)
    assert (from_flags.port, from_flags.max_pending, from_flags.heartbeat) == (1, 30, 2.5)


@pytest.mark.parametrize(
    ("environ", "file_text", "message"),
    [
        ({"JOBBROKER_PORT": "seventy"}, "", r"\$JOBBROKER_PORT \(for --port\): 'seventy' is not a valid value"),
        (
            {"JOBBROKER_FSYNC": "sometimes"},
            "",
            r"\$JOBBROKER_FSYNC \(for --fsync\): 'sometimes' is not one of always, interval, never",
        ),
        ({"JOBBROKER_MEMORY": "perhaps"}, "", r"\$JOBBROKER_MEMORY \(for --memory\): 'perhaps' is not true or false"),
        ({}, "port = 'x'\n", r"jobbroker.toml: port \(for --port\): 'x' is not a valid value"),
        ({}, "colour = 'blue'\n", "unknown setting 'colour'"),
        ({}, "max_pendng = 5\n", r"unknown setting 'max_pendng' \(did you mean 'max_pending'\?\)"),
        ({}, "port = [1\n", "cannot read config file"),
    ],
)
def test_bad_settings_are_clear_errors(tmp_path: Path, environ: dict[str, str], file_text: str, message: str) -> None:
    config = tmp_path / "jobbroker.toml"
    config.write_text(file_text)
    with pytest.raises(ConfigError, match=message):
        parse_args(["serve", "--config", str(config)], environ)


def test_other_commands_are_untouched_by_serve_settings() -> None:
    args = parse_args(["stats", "--json"], {"JOBBROKER_PORT": "not-a-port"})
    assert args.json and args.command == "stats"


def test_every_serve_setting_is_in_the_readme_table() -> None:
    """README's one table of settings: a row per flag, with its variable and config key."""
    from jobbroker.broker.config import SETTINGS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for setting in SETTINGS:
        if setting.name in ("secret_file", "log_level", "log_format"):
            continue
        row = f"| `{setting.flag}` | `{setting.variable}` | `{setting.name}` |"
        assert row in readme, f"README's settings table lacks {setting.flag}"


def test_clients_follow_the_brokers_port_variable() -> None:
    from jobbroker.client.connection import default_address

    assert default_address({}) == "127.0.0.1:7878"
    assert default_address({"JOBBROKER_PORT": "9000"}) == "127.0.0.1:9000"
    assert default_address({"JOBBROKER_PORT": "9000", "JOBBROKER_CONNECT": "h:1"}) == "h:1"


def test_a_misspelt_variable_is_said_not_silently_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    parse_args(["serve"], {"JOBBROKER_HEARTBEET": "1", "JOBBROKER_CONNECT": "h:1"})
    assert "ignoring $JOBBROKER_HEARTBEET: no such setting (did you mean 'JOBBROKER_HEARTBEAT'?)" in (
        capsys.readouterr().err
    )


def test_a_bad_queue_name_in_the_config_file_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "jobbroker.toml"
    config.write_text('[queues."-bad"]\npaused = true\n')
    with pytest.raises(ConfigError, match=r"jobbroker.toml: \[queues.-bad\]"):
        parse_args(["serve", "--config", str(config)], {})
    config.write_text('[schedules.x]\nqueue = "-bad"\nevery = 5\n')
    with pytest.raises(ConfigError, match=r"\[schedules.x\]"):
        parse_args(["serve", "--config", str(config)], {})


def test_retry_is_never_filtered_by_a_tasks_retry_rules() -> None:
    from jobbroker.client.tasks import TaskOptions

    from jobbroker import Retry

    options = TaskOptions(retry_on=(KeyError,), no_retry=(Exception,))
    assert not options.is_final(Retry(delay=1))
    assert options.is_final(ValueError("x"))
