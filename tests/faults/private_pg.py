"""A PostgreSQL server of one test's own, so the test can stop it and start it again.

The machine's server on port 5432 is shared by the whole suite (tests run in
parallel), so a case that takes the store away builds a throwaway cluster
with Debian's ``initdb`` and ``pg_ctl`` in a temporary directory, on a free
loopback port, with trust authentication. Run as root (as CI does), the
cluster belongs to the ``postgres`` user, since PostgreSQL refuses to run as
root.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.helpers import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def available() -> bool:
    """Whether this machine has the server binaries a private cluster needs."""
    return _bin("initdb") is not None and _bin("pg_ctl") is not None


class PrivatePostgres:
    """One cluster in a temporary directory; ``url`` names its ``herder`` database."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="herder-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/herder"
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(
            _bin("initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync"
        )

    def _run(self, *argv: str | None) -> None:
        args = [str(a) for a in argv]
        if self._as_postgres:
            args = ["runuser", "-u", "postgres", "--", *args]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run(
            _bin("pg_ctl"), "-D", str(self.data), "-o", options, "-l",
            str(self.root / "server.log"), "-w", "-t", "60", "start",
        )  # fmt: skip

    def create_database(self) -> None:
        self._run(
            _bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
            "-d", "postgres", "-c", "CREATE DATABASE herder",
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server the way an operator would: sessions are cut, work is kept."""
        self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        """Stop the server if it runs and remove the cluster."""
        if (self.data / "postmaster.pid").exists():
            self._run(_bin("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
