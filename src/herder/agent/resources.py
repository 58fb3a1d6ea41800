"""What a node has to run tasks with: detected once, overridable from the command line.

Announced in ``Hello`` so the coordinator places a task that asks for
``resources={"cpus": 2, "gpus": 1}`` only where it fits, and a selector can
say ``mem_gb >= 8``.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess

import psutil

log = logging.getLogger("herder.agent")


@functools.cache
def detect_resources() -> dict[str, float]:
    """cpus, mem_gb, disk_gb (free, where scratch lives) and gpus of this machine."""
    usage = psutil.disk_usage(
        os.path.expanduser("~") if os.path.isdir(os.path.expanduser("~")) else "/"
    )
    return {
        "cpus": float(os.cpu_count() or 1),
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 2),
        "disk_gb": round(usage.free / 2**30, 2),
        "gpus": float(_count_gpus()),
    }


def _count_gpus() -> int:
    """GPUs that ``nvidia-smi`` lists; 0 when it is not installed or fails."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed, announcing no GPUs: %s", exc)
        return 0
    return sum(1 for line in out.splitlines() if line.strip())


def parse_resource_overrides(items: list[str]) -> dict[str, float]:
    """``["gpus=2", "mem_gb=7.5"]`` -> amounts; ValueError naming the bad item."""
    known = ("cpus", "mem_gb", "disk_gb", "gpus")
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise ValueError(
                f"--resource {item!r} must be NAME=AMOUNT, NAME one of {', '.join(known)}"
            )
        try:
            amount = float(value)
        except ValueError:
            raise ValueError(f"--resource {item!r}: {value!r} is not a number") from None
        if not amount >= 0 or amount == float("inf"):
            raise ValueError(f"--resource {item!r}: the amount must be 0 or more")
        out[name] = amount
    return out
