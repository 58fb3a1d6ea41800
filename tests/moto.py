"""moto in server mode: the one stand-in allowed, for EC2 and S3 (no real cloud here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import kill_tree, wait_for

# Fake credentials, and nothing of this machine's own AWS configuration.
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-west-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def start_moto(port: int, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """A moto server on 127.0.0.1:``port``, answering once this returns."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, **(extra_env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def up() -> bool:
        assert proc.poll() is None, "moto_server exited"
        try:
            return httpx.get(f"http://127.0.0.1:{port}/moto-api/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 30, "moto_server to listen", every=0.1)
    except BaseException:
        kill_tree(proc.pid)
        proc.wait(10)
        raise
    return proc
