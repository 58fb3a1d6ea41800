"""Draw ``bench/results.png`` from ``results-compare.json``: one panel per workload.

Run by ``compare.py`` in ``bench/.venv-peers`` (matplotlib is not a
dependency of herder): ``python compare_plot.py results-compare.json results.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SYSTEMS = ("herder", "pool", "dask", "dask-inf", "ray", "celery")
LABELS = ("herder", "process\npool", "Dask", "Dask\nsat. inf", "Ray", "Celery")
PANELS = (
    ("a_tasks_per_s", "A throughput (tasks/s, higher is better)"),
    ("b_p50_ms", "B round trip p50 (ms, lower is better)"),
    ("c_wall_s", "C DAG wall time (s, lower is better)"),
    ("d_cold_s", "D cold start (s, lower is better)"),
    ("e_rss_mb", "E queue holder peak RSS, 100k queued (MB, lower)"),
)


def main(source: Path, png: Path) -> None:
    result = json.loads(source.read_text())
    med = result["median"]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8))
    flat = list(axes.flat)
    for ax, (key, title) in zip(flat, PANELS, strict=False):
        values = [med[s].get(key) or 0.0 for s in SYSTEMS]
        colors = ["tab:green" if s == "herder" else "tab:gray" for s in SYSTEMS]
        ax.bar(LABELS, values, color=colors)
        ax.set_title(title, fontsize=10)
        for x, v in enumerate(values):
            ax.annotate(f"{v:,.3g}" if v else "n/a", (x, v), ha="center", va="bottom", fontsize=8)
    herder = med["herder"]
    depths = result["sizes"]["depths"]
    ax = flat[5]
    rates = [herder.get(f"f_tasks_per_s_{d}") or 0.0 for d in depths]
    ax.bar([f"{d:,}" for d in depths], rates, color="tab:green")
    ax.set_title("F herder dispatch rate by tasks queued (tasks/s)", fontsize=10)
    ax = flat[6]
    ax.bar(["coordinator CPU %"], [herder.get("g_cpu_percent") or 0.0], color="tab:green")
    ax.axhline(10, color="tab:red", linestyle="--", label="target < 10 %")
    ax.legend(fontsize=8)
    ax.set_title(f"G {result['sizes']['agents']} nodes heartbeating", fontsize=10)
    ax = flat[7]
    ax.bar(["dispatch rate"], [herder.get("g_tasks_per_s") or 0.0], color="tab:green")
    ax.set_title(f"G tasks/s with {result['sizes']['agents']} nodes paired", fontsize=10)
    fig.suptitle(
        f"herder vs peers, 2 workers x 1 slot, median of {result['repeat']} "
        f"({result['machine']['cpus']} CPUs, {result['machine']['date']})"
    )
    fig.tight_layout()
    fig.savefig(png, dpi=90)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
