"""The architecture, checked: pure layers import no asyncio; public names are as listed."""

import subprocess
import sys

import pytest

import broker
import client


@pytest.mark.parametrize(
    "module",
    [
        "broker.protocol.framing",
        "broker.protocol.messages",
        "broker.protocol.auth",
        "broker.protocol.connection",
        "broker.core.scheduler",
        "broker.core.clock",
    ],
)
def test_pure_layers_import_no_asyncio_or_sockets(module: str) -> None:
    code = f"import sys, {module}; print(sorted(m for m in ('asyncio', 'socket', 'selectors') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_client_imports_only_the_protocol_and_errors_of_the_broker() -> None:
    code = "import sys, client; print(sorted(m for m in sys.modules if m.startswith('broker.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = eval(out)
    assert loaded and all(m == "broker.errors" or m.startswith("broker.protocol") for m in loaded), loaded


@pytest.mark.parametrize(
    ("package", "expected"),
    [
        (broker, {"Broker", "BrokerConfig", "SchedulerConfig", "serve"}),
        (client, {"Client", "Worker", "JobbrokerError", "QueueFull", "JobDead", "ResultTimeout"}),
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
