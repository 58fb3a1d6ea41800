"""A herd on the ssh provider, for ``herder up --herd tests.ssh_herds:KeepTwoOverSSH``.

The hosts exist only while a test runs (network namespaces it makes), so
they come from the environment: ``HERDER_TEST_SSH_HOSTS`` holds a JSON list
of :class:`~herder.providers.ssh.SSHHost` fields.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from herder.herd import Herd
from herder.providers.ssh import SSH, SSHHost


def _hosts() -> list[SSHHost]:
    fields: list[dict[str, Any]] = json.loads(os.environ.get("HERDER_TEST_SSH_HOSTS", "[]"))
    return [SSHHost(**_with_paths(f)) for f in fields]


def _with_paths(fields: dict[str, Any]) -> dict[str, Any]:
    """JSON has no paths: make ``key`` and ``known_hosts`` paths again."""
    paths = ("key", "known_hosts")
    return {k: Path(v) if k in paths and v is not None else v for k, v in fields.items()}


class KeepTwoOverSSH(Herd):
    """Two agents, one per host; installs offline (the hosts reach no index)."""

    provider = SSH(_hosts(), install="offline", connect_timeout=5) if _hosts() else None
    target = 2
    max_nodes = 2
    boot_timeout_s = 60.0
    inventory_s = 2.0
