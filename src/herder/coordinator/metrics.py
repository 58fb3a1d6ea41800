"""Prometheus metrics of one coordinator, served at ``/metrics`` (authenticated).

A registry of its own per coordinator (no process-wide state, so several
coordinators in one test process do not mix). Histograms are observed on
the hot paths (a claim, a result, a commit: a few hundred nanoseconds
each); gauges that need the store (tasks by state, nodes) are read when
scraped, at most every ``SCRAPE_CACHE_S``, so a scraper polling fast does
not add a full count of a million-row table per scrape.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    generate_latest,
)

SCRAPE_CACHE_S = 2.0

# Seconds, from a fast local dispatch (well under a millisecond) to a long wait.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)
_DURATION_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)


class Metrics:
    """The coordinator's instruments; ``render`` refreshes the gauges and writes the text."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks = Gauge("herder_tasks", "Tasks in the store by state.", ["state"], registry=r)
        self.queue_depth = Gauge(
            "herder_queue_depth", "Ready tasks waiting for a slot.", registry=r
        )
        self.nodes = Gauge(
            "herder_nodes", "Nodes by state and provider.", ["state", "provider"], registry=r
        )
        self.agents = Gauge("herder_agents_connected", "Agents paired now.", registry=r)
        self.watched = Gauge(
            "herder_watched_tasks",
            "Unfinished tasks whose outcome a connected client waits for.",
            registry=r,
        )
        self.heartbeat_lag = Gauge(
            "herder_heartbeat_lag_seconds",
            "Seconds since each connected node was last heard.",
            ["node"],
            registry=r,
        )
        self.dispatch_latency = Histogram(
            "herder_dispatch_latency_seconds",
            "From a task's submission to its lease, for tasks that waited on nothing.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.task_duration = Histogram(
            "herder_task_duration_seconds",
            "How long attempts ran on their node, by outcome.",
            ["outcome"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.commit_latency = Histogram(
            "herder_store_commit_seconds",
            "How long one store transaction (a batch of submissions, claims, results) took.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._refreshed = 0.0

    async def render(self, refresh: Callable[[Metrics], Awaitable[None]]) -> bytes:
        """The exposition text; ``refresh`` sets the store-backed gauges (cached briefly)."""
        now = time.monotonic()
        if now - self._refreshed >= SCRAPE_CACHE_S:
            self._refreshed = now
            await refresh(self)
        data: bytes = generate_latest(self.registry)
        return data

    def set_tasks(self, counts: dict[str, int], states: list[str]) -> None:
        for state in states:
            self.tasks.labels(state=state).set(counts.get(state, 0))
        self.queue_depth.set(counts.get("ready", 0))

    def set_nodes(self, counts: dict[tuple[str, str], int]) -> None:
        self.nodes.clear()
        for (state, provider), n in counts.items():
            self.nodes.labels(state=state, provider=provider).set(n)

    def set_heartbeat_lag(self, lags: dict[str, float]) -> None:
        self.heartbeat_lag.clear()
        for node, lag in lags.items():
            self.heartbeat_lag.labels(node=node).set(lag)

    def observe_results(self, durations: list[tuple[str, float]]) -> None:
        for outcome, seconds in durations:
            self.task_duration.labels(outcome=outcome).observe(seconds)

    def observe_dispatch(self, waits: list[float]) -> None:
        for seconds in waits:
            self.dispatch_latency.observe(seconds)


# The content type Prometheus expects for the text format.
CONTENT_TYPE = str(CONTENT_TYPE_LATEST)
