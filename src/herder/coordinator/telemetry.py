"""Telemetry as time series: what nodes (and tasks) report, kept with bounded retention.

Every heartbeat carries the node's readings (cpu %, memory, disk, load,
network, GPUs); tasks add their own (``herder.task.telemetry``). Samples are
kept at two resolutions: every second for ``FINE_KEEP_S`` (10 min), and
rolled up into one-minute averages kept for ``COARSE_KEEP_S`` (24 h).

The coordinator keeps the latest reading of each node in memory (a cache
for ``executors()`` and live views) and writes what arrived once a second
in one batch: 200 nodes cost one transaction a second, not 200.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from herder.store.base import Sample, Store

log = logging.getLogger("herder.coordinator")

FINE_S = 1  # the resolution of raw samples
COARSE_S = 60  # the resolution of rolled-up samples
FINE_KEEP_S = 10 * 60.0
COARSE_KEEP_S = 24 * 3600.0
ROLLUP_EVERY_S = 30.0


@dataclass
class TelemetrySeries:
    """Buffers readings, writes them in batches, rolls them up and answers queries."""

    store: Store
    latest: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)
    _pending: list[Sample] = field(default_factory=list)
    _last_rollup: float = 0.0

    def record(self, node_id: str, data: dict[str, float], task_id: str = "") -> None:
        """A reading from a heartbeat (``task_id`` empty) or a task; kept until :meth:`flush`.

        Readings within one second of the same series are merged (the last
        value of each key wins), so the fine series has one point a second.
        """
        now = time.time()
        if not task_id:
            self.latest[node_id] = (now, data)
        self._pending.append(Sample(node_id, task_id, FINE_S, float(int(now)), dict(data)))

    def forget(self, node_id: str) -> None:
        """A node left: its latest reading is no longer live (its history stays)."""
        self.latest.pop(node_id, None)

    async def flush(self) -> None:
        """Write what arrived since the last flush; roll up and prune now and then."""
        pending, self._pending = self._pending, []
        if pending:
            await self.store.add_samples(_merged(pending))
        now = time.time()
        if now - self._last_rollup >= ROLLUP_EVERY_S:
            self._last_rollup = now
            moved = await self.store.roll_up_samples(
                fine_before=now - FINE_KEEP_S,
                coarse_before=now - COARSE_KEEP_S,
                resolution=COARSE_S,
            )
            if moved:
                log.debug("telemetry: %d fine samples rolled up", moved)

    async def series(
        self, node_id: str, window_s: float, task_id: str = ""
    ) -> tuple[int, list[dict[str, Any]]]:
        """``(resolution_s, points)`` of one series over the last ``window_s``: the fine
        samples for a window they cover, else the one-minute ones."""
        since = time.time() - window_s
        resolution = FINE_S if window_s <= FINE_KEEP_S else COARSE_S
        samples = await self.store.samples(node_id, since, resolution, task_id=task_id)
        return resolution, [{"at": s.at, **s.data} for s in samples]

    async def usage(self, window_s: float) -> dict[str, Any]:
        """Per node now, average and maximum over the window; and the herd's totals."""
        since = time.time() - window_s
        resolution = FINE_S if window_s <= FINE_KEEP_S else COARSE_S
        history = await self.store.samples(None, since, resolution)
        by_node: dict[str, list[dict[str, float]]] = {}
        for s in history:
            by_node.setdefault(s.node_id, []).append(s.data)
        nodes: dict[str, Any] = {}
        for node_id in sorted(set(by_node) | set(self.latest)):
            points = by_node.get(node_id, [])
            nodes[node_id] = {
                "now": self.latest.get(node_id, (0.0, {}))[1],
                "avg": _aggregate(points, "avg"),
                "max": _aggregate(points, "max"),
            }
        return {"window_s": window_s, "nodes": nodes, "total": _totals(nodes)}


def _merged(samples: list[Sample]) -> list[Sample]:
    """One sample per series and second (later readings overwrite earlier keys)."""
    merged: dict[tuple[str, str, float], Sample] = {}
    for s in samples:
        key = (s.node_id, s.task_id, s.at)
        if key in merged:
            merged[key].data.update(s.data)
        else:
            merged[key] = s
    return list(merged.values())


def _aggregate(points: list[dict[str, float]], how: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for p in points:
        for key, value in p.items():
            values.setdefault(key, []).append(value)
    if how == "max":
        return {k: max(v) for k, v in values.items()}
    return {k: sum(v) / len(v) for k, v in values.items()}


# Readings that add up across nodes (the rest are averaged: percentages, load).
_ADDITIVE = ("mem_used_mb", "mem_total_mb", "disk_free_gb", "net_sent_bps", "net_recv_bps")


def _totals(nodes: dict[str, Any]) -> dict[str, Any]:
    """The herd as one: additive readings summed, the others averaged over nodes."""
    out: dict[str, Any] = {}
    for part in ("now", "avg"):
        summed: dict[str, float] = {}
        counted: dict[str, int] = {}
        for node in nodes.values():
            for key, value in node[part].items():
                summed[key] = summed.get(key, 0.0) + value
                counted[key] = counted.get(key, 0) + 1
        out[part] = {k: (v if k in _ADDITIVE else v / counted[k]) for k, v in summed.items()}
    out["nodes"] = len(nodes)
    return out
