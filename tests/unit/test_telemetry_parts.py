"""The node's readings: GPU lines from nvidia-smi, and a sample's keys."""

from __future__ import annotations

from pathlib import Path

from herder.agent.telemetry import Sampler, parse_gpus


def test_nvidia_smi_lines_become_readings_per_gpu() -> None:
    out = "87, 10240, 24576\n  3, 512, 24576 \n[N/A], [N/A], 16384\n\n"
    assert parse_gpus(out) == {
        "gpu0_util": 87.0,
        "gpu0_mem_used_mb": 10240.0,
        "gpu0_mem_total_mb": 24576.0,
        "gpu1_util": 3.0,
        "gpu1_mem_used_mb": 512.0,
        "gpu1_mem_total_mb": 24576.0,
    }
    assert parse_gpus("") == {}
    assert parse_gpus("garbage line\n") == {}


def test_a_sample_has_the_node_readings(tmp_path: Path) -> None:
    sampler = Sampler(str(tmp_path / "not-made-yet"))
    reading = sampler.sample()
    for key in (
        "cpu_percent",
        "memory_percent",
        "mem_used_mb",
        "mem_total_mb",
        "disk_free_gb",
        "load1",
        "net_sent_bps",
        "net_recv_bps",
    ):
        assert key in reading
    assert 0 <= reading["memory_percent"] <= 100
    assert reading["net_sent_bps"] >= 0
