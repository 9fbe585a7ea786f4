"""Type-check the jobbroker package with mypy (run by `make test`).

mypy cannot follow the package-dir mapping of pyproject.toml (jobbroker.broker lives in
broker/, jobbroker.client in client/), so this lays the package out as installed, with links,
in a temporary directory and checks it there, with the settings of pyproject.toml.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # tests/ is one level down


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="jobbroker-typecheck-") as tmp:
        package = Path(tmp) / "jobbroker"
        shutil.copytree(ROOT / "jobbroker", package, ignore=shutil.ignore_patterns("__pycache__"))
        (package / "broker").symlink_to(ROOT / "broker", target_is_directory=True)
        (package / "client").symlink_to(ROOT / "client", target_is_directory=True)
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "-p", "jobbroker"]
        return subprocess.run(command, cwd=tmp).returncode


if __name__ == "__main__":
    sys.exit(main())
