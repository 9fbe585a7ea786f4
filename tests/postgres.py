"""A PostgreSQL server of the tests' own: Debian's initdb and pg_ctl in a temporary directory, on
a free loopback port, its Unix socket in that directory. initdb refuses to run as root, so as
root (CI) the server runs as the `postgres` user that Debian's package creates (else `nobody`).
Stopped by its own pg_ctl (or its postmaster's pid) at the end."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

USER = "jobbroker"
PASSWORD = "pg-test-password-7f3e"  # the tests check it never shows in the broker's output


def find_binaries() -> Path | None:
    """The directory of pg_ctl and initdb: Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("pg_ctl")
    return Path(found).resolve().parent if found and shutil.which("initdb") else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """initdb'd in a new temporary directory; start(), restart(), stop(); url(database)."""

    def __init__(self, binaries: Path, *, fsync: bool = False) -> None:
        self.binaries = binaries
        self.fsync = fsync  # off in tests (none of them tests PostgreSQL's own durability)
        self.root = Path(tempfile.mkdtemp(prefix="jobbroker-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = 0
        self._as: list[str] = []
        if os.geteuid() == 0:
            name = "postgres" if _user_exists("postgres") else "nobody"
            entry = pwd.getpwnam(name)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._as = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
        password_file = self.root / "pwfile"
        password_file.write_text(PASSWORD + "\n")
        if self._as:
            os.chown(password_file, pwd.getpwnam("postgres" if _user_exists("postgres") else "nobody").pw_uid, -1)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            "--pwfile",
            str(password_file),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        )
        password_file.unlink()

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> None:
        command = [*self._as, str(self.binaries / tool), *args]
        # Output to a file, not a pipe: a postmaster that pg_ctl starts inherits it and would
        # hold a pipe open for as long as it runs.
        output = self.root / f"{tool}.out"
        with open(output, "wb") as sink:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            said = output.read_text(errors="replace")
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{said}\n{log}")

    def start(self) -> None:
        """Start on a free port, or on the port it had before (after stop_server())."""
        again = self.port != 0
        for attempt in range(1 if again else 3):  # another process may take a free port first
            if not again:
                self.port = _free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
            options += f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=60 -c shared_buffers=128MB"
            if not self.fsync:
                options += " -c full_page_writes=off"
            try:
                self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-o", options, "start")
                return
            except RuntimeError:
                if again or attempt == 2:
                    raise

    def restart(self) -> None:
        """Stop (fast: sessions are cut) and start again on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "-m", "fast", "restart")

    def stop_server(self) -> None:
        """Stop, keeping the data (start() again later)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", "fast", "stop")

    def stop(self) -> None:
        """Stop the server and remove its directory."""
        try:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "-m", "fast", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            with contextlib.suppress(OSError, ValueError, IndexError):  # by its own pid, then
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", *, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database; its URL (with the password)."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
