"""What a node reports of itself with every heartbeat: cheap psutil readings.

CPU, memory, free disk where tasks write, load, network rates and, where
``nvidia-smi`` exists, each GPU's utilisation and memory. Rates (CPU %,
network bytes/s) are measured between two samples, so the sampler keeps
the previous counters; ``nvidia-smi`` costs tens of milliseconds, so it is
asked at most every ``GPU_EVERY_S`` and its last answer reused between.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import psutil

GPU_EVERY_S = 5.0
_GPU_QUERY = "utilization.gpu,memory.used,memory.total"


class Sampler:
    """One per agent: ``sample()`` about every second."""

    def __init__(self, disk_path: str) -> None:
        self._disk_path = disk_path
        self._net = psutil.net_io_counters()
        self._net_at = time.monotonic()
        self._nvidia_smi = shutil.which("nvidia-smi")
        self._gpus: dict[str, float] = {}
        self._gpus_at = -GPU_EVERY_S
        psutil.cpu_percent(None)  # the first reading is since this call

    def sample(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        try:
            disk_free = psutil.disk_usage(self._disk_path).free
        except OSError:  # not made yet: where it will be is on the root filesystem
            disk_free = psutil.disk_usage("/").free
        reading = {
            "cpu_percent": psutil.cpu_percent(None),
            "memory_percent": memory.percent,
            "mem_used_mb": (memory.total - memory.available) / 2**20,
            "mem_total_mb": memory.total / 2**20,
            "disk_free_gb": disk_free / 2**30,
            "load1": os.getloadavg()[0],
            **self._network(),
        }
        reading.update(self._gpu_readings())
        return reading

    def _network(self) -> dict[str, float]:
        now, counters = time.monotonic(), psutil.net_io_counters()
        elapsed = max(now - self._net_at, 1e-3)
        rates = {
            "net_sent_bps": (counters.bytes_sent - self._net.bytes_sent) / elapsed,
            "net_recv_bps": (counters.bytes_recv - self._net.bytes_recv) / elapsed,
        }
        self._net, self._net_at = counters, now
        return rates

    def _gpu_readings(self) -> dict[str, float]:
        """``gpu0_util`` (%), ``gpu0_mem_used_mb``, ``gpu0_mem_total_mb``, … (none without GPUs)."""
        if self._nvidia_smi is None or time.monotonic() - self._gpus_at < GPU_EVERY_S:
            return self._gpus
        self._gpus_at = time.monotonic()
        try:
            out = subprocess.run(
                [self._nvidia_smi, f"--query-gpu={_GPU_QUERY}", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            self._gpus = {}  # a broken driver: report no GPUs rather than stale numbers
            return self._gpus
        self._gpus = parse_gpus(out)
        return self._gpus


def parse_gpus(csv: str) -> dict[str, float]:
    """``nvidia-smi --query-gpu=utilization.gpu,memory.used,memory.total`` output as readings."""
    readings: dict[str, float] = {}
    for index, line in enumerate(row for row in csv.splitlines() if row.strip()):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3:
            continue
        try:
            util, used, total = (float(p) for p in parts)
        except ValueError:  # "[N/A]" on some boards: that GPU reports nothing
            continue
        readings[f"gpu{index}_util"] = util
        readings[f"gpu{index}_mem_used_mb"] = used
        readings[f"gpu{index}_mem_total_mb"] = total
    return readings
