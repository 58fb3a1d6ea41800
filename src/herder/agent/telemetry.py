"""What a node reports of itself with every heartbeat: cheap psutil readings."""

from __future__ import annotations

import os

import psutil


def sample(disk_path: str) -> dict[str, float]:
    """CPU %, memory, free disk where tasks write, load; about 100 µs.

    ``cpu_percent`` is measured since the previous call (the first is 0).
    """
    memory = psutil.virtual_memory()
    try:
        disk_free = psutil.disk_usage(disk_path).free
    except OSError:
        disk_free = psutil.disk_usage("/").free
    return {
        "cpu_percent": psutil.cpu_percent(None),
        "mem_used_mb": (memory.total - memory.available) / 2**20,
        "mem_total_mb": memory.total / 2**20,
        "disk_free_gb": disk_free / 2**30,
        "load1": os.getloadavg()[0],
    }
