"""broker/config.py: the layering of settings (flag > environment > file > default, errors
naming their source), defaults written once, and BrokerConfig.load() without the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from jobbroker.broker.config import (
    SETTINGS,
    BrokerConfig,
    FsyncMode,
    known_variables,
    layered_settings,
)
from jobbroker.broker.core.scheduler import SchedulerConfig
from jobbroker.broker.errors import ConfigError

from jobbroker.cli import parse_args

README = Path(__file__).resolve().parents[2] / "README.md"


def test_each_layer_wins_over_the_next(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text("port = 1\nheartbeat = 1.5\nmax_queues = 9\n")
    environ = {"JOBBROKER_PORT": "2", "JOBBROKER_HEARTBEAT": "2.5"}
    layered = layered_settings(config, environ)
    assert (layered.values["port"], layered.values["heartbeat"], layered.values["max_queues"]) == (2, 2.5, 9)
    assert layered.values["max_pending"] == SchedulerConfig().max_pending_per_queue  # the default
    assert layered.sources["port"] == "$JOBBROKER_PORT"
    assert layered.sources["max_queues"] == f"{config}: max_queues"
    assert layered.sources["max_pending"] == "default"
    args = parse_args(["serve", "--config", str(config), "--port", "3"], environ)
    assert (args.port, args.heartbeat, args.max_queues) == (3, 2.5, 9)


def test_the_config_file_may_be_named_by_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('fsync = "never"\n')
    assert layered_settings(None, {"JOBBROKER_CONFIG": str(config)}).values["fsync"] == "never"


def test_defaults_come_from_the_dataclasses() -> None:
    by_name = {setting.name: setting for setting in SETTINGS}
    broker, scheduler = BrokerConfig(), SchedulerConfig()
    assert by_name["port"].default == broker.port
    assert by_name["max_write_buffer"].default == broker.max_write_buffer
    assert by_name["heartbeat"].default == scheduler.heartbeat
    assert by_name["lease"].default == scheduler.default_lease
    assert by_name["max_pending"].default == scheduler.max_pending_per_queue
    assert by_name["fsync"].default == FsyncMode.ALWAYS.value
    assert "(default 5)" in by_name["heartbeat"].help_text()


@pytest.mark.parametrize(
    ("environ", "file_text", "overrides", "message"),
    [
        ({"JOBBROKER_GRACE": "soon"}, "", {}, r"\$JOBBROKER_GRACE \(for --grace\): 'soon' is not a valid value"),
        ({}, "no_uvloop = 'maybe'\n", {}, r"broker.toml: no_uvloop \(for --no-uvloop\): 'maybe' is not true or false"),
        ({}, "", {"fsync": "often"}, r"overrides \(for --fsync\): 'often' is not one of always, interval, never"),
        ({}, "", {"colour": 1}, r"overrides: unknown setting 'colour'"),
        ({}, "[queues.q]\nrate = 'fast'\n", {}, r"broker.toml: queues.q.rate: 'fast' is not a rate"),
        ({}, "[queues.q]\nspeed = 1\n", {}, r"unknown queue setting 'speed'"),
        ({}, "", {"memory": True, "data_dir": "/x"}, "--memory, --data-dir and --store exclude each other"),
        ({}, "", {"store": "postgresql://u@h/d", "data_dir": "/x"}, "--memory, --data-dir and --store exclude each"),
        ({}, "", {"tls_cert": "/c.pem"}, "--tls-cert and --tls-key go together"),
    ],
)
def test_errors_name_their_source(
    tmp_path: Path, environ: dict[str, str], file_text: str, overrides: dict[str, object], message: str
) -> None:
    config = tmp_path / "broker.toml"
    config.write_text(file_text)
    with pytest.raises(ConfigError, match=message):
        BrokerConfig.load(config, environ, overrides)


def test_an_embedder_loads_what_serve_would_run(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('port = 0\nmax_pending = 50\nfsync = "interval"\n[queues.mail]\nrate = "20/s"\n')
    loaded = BrokerConfig.load(config, {"XDG_DATA_HOME": str(tmp_path / "xdg"), "JOBBROKER_HEARTBEAT": "2"})
    assert (loaded.port, loaded.fsync, loaded.heartbeat) == (0, FsyncMode.INTERVAL, 2.0)
    assert loaded.scheduler.max_pending_per_queue == 50
    assert loaded.queues == {"mail": {"rate": 20.0}}
    assert loaded.data_dir == tmp_path / "xdg" / "jobbroker" / "data"  # serve's default: on disk
    assert BrokerConfig.load(None, {}, {"memory": True}).data_dir is None
    assert BrokerConfig.load(None, {}, {"data_dir": tmp_path}).data_dir == tmp_path


def test_a_metrics_port_off_loopback_gets_a_generated_token(tmp_path: Path) -> None:
    environ = {"XDG_DATA_HOME": str(tmp_path)}
    loaded = BrokerConfig.load(None, environ, {"memory": True, "metrics_port": 9100, "metrics_host": "0.0.0.0"})
    assert loaded.metrics_token and (tmp_path / "jobbroker" / "metrics-token").exists()
    assert BrokerConfig.load(None, environ, {"memory": True, "metrics_port": 9100}).metrics_token is None


def test_every_variable_readme_documents_is_read() -> None:
    """README's variables (its table of variables and its table of settings) are all known, so
    none is reported as a typo, and each setting's variable sets it."""
    text = README.read_text()
    documented = set(re.findall(r"`(JOBBROKER_[A-Z_]+)`", text))
    assert documented and documented <= known_variables()
    for setting in SETTINGS:
        if setting.from_environment and setting.kind is not bool and setting.choices is None:
            value = "7" if setting.kind in (int, float) else "x"
            layered = layered_settings(None, {setting.variable: value})
            assert layered.sources[setting.name] == f"${setting.variable}", setting.name
            assert not layered.unknown_variables


def test_the_client_side_variables_are_read_by_client_settings(tmp_path: Path) -> None:
    from jobbroker.client.settings import ClientSettings

    secret_file = tmp_path / "secret"
    secret_file.write_bytes(b"z" * 20)
    secret_file.chmod(0o600)
    environ = {"JOBBROKER_CONNECT": "h:1", "JOBBROKER_CREDENTIAL": "reports", "JOBBROKER_SECRET_FILE": str(secret_file)}
    settings = ClientSettings.resolve(environ=environ)
    assert (settings.address, settings.credential, settings.secret, settings.tls) == ("h:1", "reports", b"z" * 20, None)
    assert (
        ClientSettings.resolve(environ={"JOBBROKER_SECRET": "y" * 16, "JOBBROKER_PORT": "9"}).address == "127.0.0.1:9"
    )
    with pytest.raises(ConfigError, match="CA file"):
        ClientSettings.resolve(environ={"JOBBROKER_SECRET": "y" * 16, "JOBBROKER_TLS_CA": str(tmp_path / "none")})
    with pytest.raises(ConfigError, match="no secret"):
        ClientSettings.resolve(environ={"XDG_DATA_HOME": str(tmp_path / "empty")})
