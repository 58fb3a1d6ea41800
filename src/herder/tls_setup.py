"""What the coordinator serves TLS with, settled by a short-lived child process.

``herder up`` starts ``python -m herder.certs`` (:func:`herder.certs.main`)
before it imports its own libraries. The child makes the coordinator's own
CA and leaf, or checks the files a user gave, and names the three files.
So the X.509 library (``cryptography``: some 11 MB resident and a tenth of a
second to load) runs once, on the other core while the coordinator
imports, and never loads into the long-running coordinator, which serves
the files with the standard library's ``ssl`` alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from herder.errors import SecurityError
from herder.security import ServedTls

if TYPE_CHECKING:
    from herder.config import Settings

# Making a CA is a key generation and two signatures; a child this slow is stuck.
SETUP_TIMEOUT_S = 60.0


class TlsSetup:
    """A running ``python -m herder.certs``; :meth:`result` waits for its answer."""

    def __init__(self, args: Sequence[str]) -> None:
        self._args = list(args)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "herder.certs", *self._args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    @classmethod
    def for_settings(cls, settings: Settings) -> TlsSetup:
        """The user's own files when all three are given (checked), else the coordinator's
        own CA and a leaf for the address it listens on."""
        if settings.tls_cert is not None and settings.tls_key is not None and settings.tls_ca:
            return cls.given(settings.tls_cert, settings.tls_key, settings.tls_ca)
        return cls.own(settings.tls_dir, [settings.listen_host])

    @classmethod
    def own(cls, directory: Path, hosts: Sequence[str]) -> TlsSetup:
        """Make (or keep, if they still fit) the coordinator's own CA and leaf in ``directory``."""
        return cls(["own", str(directory), *hosts])

    @classmethod
    def given(cls, cert: Path, key: Path, ca: Path) -> TlsSetup:
        """Check the certificate, key and CA a user gave (``herder up --tls-cert ...``)."""
        return cls(["given", str(cert), str(key), str(ca)])

    def result(self, timeout: float = SETUP_TIMEOUT_S) -> ServedTls:
        """The files to serve with; SecurityError with the child's reason if it refused."""
        try:
            out, err = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            raise SecurityError(
                f"setting up TLS ({' '.join(self._args)}) took over {timeout:.0f}s"
            ) from None
        reason = err.decode(errors="replace").strip()
        if self._process.returncode != 0:
            raise SecurityError(
                reason or f"setting up TLS failed (exit code {self._process.returncode})"
            )
        try:
            paths = json.loads(out)
            return ServedTls(
                ca_cert=Path(paths["ca_cert"]), cert=Path(paths["cert"]), key=Path(paths["key"])
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise SecurityError(f"setting up TLS gave no file names ({out[:200]!r})") from exc
