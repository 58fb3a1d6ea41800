"""``make demo`` runs a real herd and exits 0 (here without rebuilding the venv)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_runs_and_checks_its_result() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "final result" in done.stdout
    assert "tasks per node" in done.stdout
    assert time.monotonic() - started < 60
