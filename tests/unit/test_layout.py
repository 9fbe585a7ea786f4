"""The architecture, checked: pure layers import no asyncio; public names are as listed."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import jobbroker.broker as broker
import jobbroker.client as client
import pytest

import jobbroker


@pytest.mark.parametrize(
    "module",
    [
        "jobbroker.broker.protocol.framing",
        "jobbroker.broker.protocol.messages",
        "jobbroker.broker.protocol.schema",
        "jobbroker.broker.protocol.auth",
        "jobbroker.broker.protocol.credentials",
        "jobbroker.broker.protocol.connection",
        "jobbroker.broker.core.scheduler",
        "jobbroker.broker.core.clock",
        "jobbroker.broker.core.effects",
        "jobbroker.broker.core.records",
        "jobbroker.broker.core.limits",
        "jobbroker.broker.core.reports",
        "jobbroker.broker.core.changes",
        "jobbroker.broker.core.lifecycle",
        "jobbroker.broker.core.dependencies",
        "jobbroker.broker.core.delivery",
        "jobbroker.broker.server.dispatch",
    ],
)
def test_pure_layers_import_no_asyncio_or_sockets(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('asyncio', 'socket', 'selectors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["jobbroker.broker.reports", "jobbroker.broker.metrics"])
def test_the_reports_of_the_http_port_import_nothing_of_the_job_core(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('jobbroker.broker.core')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


BROKER = Path(__file__).resolve().parents[2] / "broker"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of each `import` and `from ... import` of a source file."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return found


def test_the_http_port_imports_nothing_of_the_job_core() -> None:
    """web.py serves what reports.py makes of the server's plain data."""
    for name in ("web.py", "reports.py", "metrics.py"):
        modules = [module for module, _ in _imports(BROKER / name)]
        assert not [m for m in modules if m.startswith("jobbroker.broker.core")], name


def test_the_rooms_of_the_server_use_no_private_names_of_each_other() -> None:
    for path in sorted((BROKER / "server").glob("*.py")):
        for module, names in _imports(path):
            if module.startswith("jobbroker.broker.server"):
                assert not [n for n in names if n.startswith("_")], (path.name, module, names)


@pytest.mark.parametrize("module", ["jobbroker.client", "jobbroker.client.cli", "jobbroker.client.settings"])
def test_client_imports_only_the_protocol_and_errors_of_the_broker(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith('jobbroker.broker.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert loaded and all(
        m == "jobbroker.broker.errors" or m.startswith("jobbroker.broker.protocol") for m in loaded
    ), loaded


def test_the_credentials_module_needs_only_the_standard_library() -> None:
    code = "import sys, jobbroker.broker.protocol.credentials; print('msgpack' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_environment_is_read_in_one_place_per_side() -> None:
    """broker/config.py on the broker's side, client/settings.py on the client's; the rest
    is handed the mapping (web.py's `environ` is WSGI's, not the process's)."""
    root = Path(__file__).resolve().parents[2]
    readers = {
        path.relative_to(root).as_posix()
        for folder in ("broker", "client", "jobbroker")
        for path in (root / folder).rglob("*.py")
        if re.search(r"os\.environ|os\.getenv", path.read_text())
    }
    assert readers == {"broker/config.py", "client/settings.py", "jobbroker/cli.py"}, readers


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        (broker, {"Broker", "BrokerConfig", "SchedulerConfig", "serve"}),
        (client, {"Client", "Worker", "JobbrokerError", "QueueFull", "JobDead", "ResultTimeout"}),
        (jobbroker, {"Client", "Worker", "SyncClient", "task", "current_job", "Retry", "Fail", "Broker", "serve"}),
    ],
)
def test_public_names_are_listed_once_and_resolve(package: object, expected: set[str]) -> None:
    names = package.__all__  # type: ignore[attr-defined]
    assert len(names) == len(set(names))
    assert expected <= set(names)
    for name in names:
        assert getattr(package, name) is not None
    public = {n for n in vars(package) if not n.startswith("_") and not isinstance(getattr(package, n), type(sys))}
    assert public - {"annotations", "importlib", "TYPE_CHECKING", "Any"} <= set(names)


def test_one_import_name_and_no_generic_top_level_packages() -> None:
    """`import jobbroker` is the API; the repository's broker/ and client/ folders are its
    subpackages, never importable as `broker` or `client` from an installed copy."""
    code = (
        "import sys, jobbroker, jobbroker.broker.server, jobbroker.broker.cli, jobbroker.broker.web; "
        "jobbroker.broker.web._read_asset('index.html'); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'broker', 'client'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    assert out.strip() == "[]"
    errors = {name for name in jobbroker.__all__ if name.endswith(("Error", "Exceeded", "Closed", "Failed"))}
    assert {"JobbrokerError", "BrokerError", "TimeLimitExceeded", "ConnectionClosed", "AuthenticationFailed"} <= errors


def test_the_top_level_names_are_the_clients() -> None:
    assert set(client.__all__) <= set(jobbroker.__all__)


@pytest.mark.parametrize(
    ("module", "names"),
    [
        (
            "jobbroker.broker.store",
            ["SqliteStore", "MemoryStore", "FsyncMode", "WriteBatch", "serialize", "recover", "open_store", "Row"],
        ),
        ("jobbroker.client.connection", ["Connection", "Link", "Rotation", "backoff_delays", "parse_addresses"]),
    ],
)
def test_names_moved_by_a_split_stay_importable_from_their_old_module(module: str, names: list[str]) -> None:
    """Each name in a fresh process, the old module imported first or last (a module and the
    one it re-exports from may import each other)."""
    for name in names:
        for first in ("", f"import jobbroker.client.link, {module}; "):
            code = f"{first}from {module} import {name}"
            subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
