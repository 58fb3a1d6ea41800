"""bench/compare.py's arithmetic: best peer per run, ratios within a run, the targets.

The benchmark itself is ``make bench`` (minutes, peers in their own venv);
this checks only how its figures are combined, on made-up runs.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import compare
from compare_common import Sizes, percentile


def record(**figures: float) -> dict[str, Any]:
    return {"load_before": [1.0, 1.0, 1.0], "figures": figures}


def a_run(herder_a: float, dask: float, dask_inf: float, ray: float) -> dict[str, Any]:
    return {
        "herder": record(a_tasks_per_s=herder_a, b_p50_ms=2.0, e_rss_mb=40.0),
        "pool": record(a_tasks_per_s=10_000.0, b_p50_ms=0.25),
        "dask": record(a_tasks_per_s=dask, b_p50_ms=10.0, e_rss_mb=500.0),
        "dask-inf": record(a_tasks_per_s=dask_inf, b_p50_ms=12.0, e_rss_mb=480.0),
        "ray": record(a_tasks_per_s=ray, b_p50_ms=2.5, e_rss_mb=360.0),
        "celery": {"load_before": [1.0, 1.0, 1.0], "error": "exited 1"},
    }


def test_dask_counts_with_its_better_setting_and_a_failed_peer_is_left_out() -> None:
    values = compare.peer_values(a_run(3000, 600, 2000, 1700), "a_tasks_per_s", higher=True)
    assert values == {"dask": 2000, "ray": 1700, "celery": None}
    assert compare.best(values, higher=True) == ("dask", 2000)
    lower = compare.peer_values(a_run(3000, 600, 2000, 1700), "b_p50_ms", higher=False)
    assert compare.best(lower, higher=False) == ("ray", 2.5)


def test_ratios_are_paired_within_each_run_then_their_median_taken() -> None:
    runs = [a_run(3000, 600, 2000, 1700), a_run(1000, 300, 500, 400), a_run(4000, 2000, 4000, 1)]
    ratios = compare.ratios(runs)
    assert ratios["a_tasks_per_s"]["best_peer"] == pytest.approx(1.5)  # of 1.5, 2.0, 1.0
    assert ratios["a_tasks_per_s"]["pool"] == pytest.approx(0.3)
    assert ratios["b_p50_ms"]["best_peer"] == pytest.approx(0.8)
    assert "best_peer" not in ratios["c_wall_s"]  # measured by nobody


def test_targets_say_met_missed_or_not_measured() -> None:
    runs = [a_run(3000, 600, 2000, 1700)]
    sizes = Sizes()
    med = {s: {"g_cpu_percent": None} for s in compare.SYSTEMS}
    med["herder"] = {"f_tasks_per_s_1000": 1000.0, "f_tasks_per_s_1000000": 700.0}
    verdicts = {t["target"]: t["met"] for t in compare.targets(med, compare.ratios(runs), sizes)}
    assert verdicts["A vs best peer"] is True
    assert verdicts["A vs process pool"] is True
    assert verdicts["B p50"] is True
    assert verdicts["E queue RSS"] is True  # 40 / 360
    assert verdicts["F 1,000,000 vs 1,000 queued"] is False  # 0.7
    assert verdicts["C DAG"] is None
    assert verdicts["G 200 nodes"] is None


def test_sizes_travel_to_the_runners_as_json_and_percentiles_are_nearest_rank() -> None:
    quick = Sizes.pick(quick=True)
    assert Sizes.from_json(quick.to_json()) == quick
    assert Sizes().dag_expected == sum(range(1, 1001))
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 99) == 99.0
