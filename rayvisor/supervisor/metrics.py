"""The supervisor's metrics: Ray metrics (``ray.util.metrics``) plus a local mirror that
``client.metrics()`` and ``rayvisor metrics`` read (Ray exports metrics only to Prometheus)."""

from __future__ import annotations

import logging
from collections import defaultdict

from ray.util import metrics as ray_metrics

from ..messages import HistogramSummary, MetricsSnapshot

logger = logging.getLogger("rayvisor.metrics")

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]


def _key(name: str, tags: dict[str, str]) -> str:
    return name + "".join(f"|{k}={v}" for k, v in sorted(tags.items()))


class SupervisorMetrics:
    """Every number the supervisor publishes, each changed through one method."""

    def __init__(self, worker_id: str) -> None:
        self._tags = {"worker_id": worker_id}
        self._counters: dict[str, float] = defaultdict(float)
        self._gauges: dict[str, float] = {}
        self._histograms: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
        self._ray: dict[str, object] = {}
        specs = {
            "rayvisor_jobs_admitted": (ray_metrics.Counter, ("worker_id", "agent")),
            "rayvisor_jobs_rejected": (ray_metrics.Counter, ("worker_id", "reason")),
            "rayvisor_jobs_ended": (ray_metrics.Counter, ("worker_id", "state", "cause")),
            "rayvisor_job_restarts": (ray_metrics.Counter, ("worker_id", "cause")),
            "rayvisor_job_kills": (ray_metrics.Counter, ("worker_id", "cause")),
            "rayvisor_job_cause_corrections": (ray_metrics.Counter, ("worker_id", "was", "now")),
            "rayvisor_pool_prewarm_failures": (ray_metrics.Counter, ("worker_id", "agent")),
            "rayvisor_active_jobs": (ray_metrics.Gauge, ("worker_id",)),
            "rayvisor_idle_actors": (ray_metrics.Gauge, ("worker_id", "agent")),
            "rayvisor_prewarming_actors": (ray_metrics.Gauge, ("worker_id", "agent")),
            "rayvisor_pool_backoff_seconds": (ray_metrics.Gauge, ("worker_id", "agent")),
            "rayvisor_supervisor_rss_bytes": (ray_metrics.Gauge, ("worker_id",)),
            "rayvisor_job_records": (ray_metrics.Gauge, ("worker_id",)),
            "rayvisor_stored_job_snapshots": (ray_metrics.Gauge, ("worker_id",)),
            "rayvisor_supervisor_tasks": (ray_metrics.Gauge, ("worker_id",)),
            "rayvisor_autoscaler_requested_bundles": (ray_metrics.Gauge, ("worker_id",)),
        }
        for name, (kind, keys) in specs.items():
            self._ray[name] = self._make(kind, name, keys)
        for name in ("rayvisor_job_start_seconds", "rayvisor_job_shutdown_seconds"):
            self._ray[name] = self._make(ray_metrics.Histogram, name, ("worker_id",), boundaries=LATENCY_BOUNDARIES)

    @staticmethod
    def _make(kind, name: str, keys: tuple[str, ...], **kwargs):
        try:
            return kind(name, description=name.replace("_", " "), tag_keys=keys, **kwargs)
        except Exception as err:  # metrics are best effort; the local mirror still counts
            logger.warning("cannot create Ray metric %s: %r", name, err)
            return None

    def _count(self, name: str, **tags: str) -> None:
        self._counters[_key(name, tags)] += 1
        metric = self._ray.get(name)
        if metric is not None:
            metric.inc(1, tags={**self._tags, **tags})

    def _set(self, name: str, value: float, **tags: str) -> None:
        self._gauges[_key(name, tags)] = value
        metric = self._ray.get(name)
        if metric is not None:
            metric.set(value, tags={**self._tags, **tags})

    def _observe(self, name: str, seconds: float) -> None:
        summary = self._histograms[name]
        summary[0] += 1
        summary[1] += seconds
        summary[2] = max(summary[2], seconds)
        metric = self._ray.get(name)
        if metric is not None:
            metric.observe(seconds, tags=self._tags)

    def admitted(self, agent: str) -> None:
        self._count("rayvisor_jobs_admitted", agent=agent)

    def rejected(self, reason: str) -> None:
        self._count("rayvisor_jobs_rejected", reason=reason)

    def ended(self, state: str, cause: str) -> None:
        self._count("rayvisor_jobs_ended", state=state, cause=cause)

    def restarted(self, cause: str) -> None:
        self._count("rayvisor_job_restarts", cause=cause)

    def cause_corrected(self, *, state: str, was: str, now: str, restarted: bool) -> None:
        """An ended attempt recorded ``was`` (at once) turned out to be ``now`` (Ray's later
        verdict): the local counts move over; Ray's counters only count up, so they count
        the correction (``rayvisor_job_cause_corrections``) and the end under its new cause."""
        if restarted:  # the attempt was counted as a restart, not as the job's end
            self._counters[_key("rayvisor_job_restarts", {"cause": was})] -= 1
            self._count("rayvisor_job_restarts", cause=now)
        else:
            self._counters[_key("rayvisor_jobs_ended", {"state": state, "cause": was})] -= 1
            self._count("rayvisor_jobs_ended", state=state, cause=now)
        self._count("rayvisor_job_cause_corrections", was=was, now=now)

    def killed(self, cause: str) -> None:
        self._count("rayvisor_job_kills", cause=cause)

    def prewarm_failed(self, agent: str, *, backoff: float) -> None:
        """A prewarm failed; the pool's next one waits ``backoff`` seconds."""
        self._count("rayvisor_pool_prewarm_failures", agent=agent)
        self._set("rayvisor_pool_backoff_seconds", backoff, agent=agent)

    def active_jobs(self, count: int) -> None:
        self._set("rayvisor_active_jobs", count)

    def prewarm_recovered(self, agent: str) -> None:
        """A prewarm succeeded after failures: the pool no longer backs off."""
        self._set("rayvisor_pool_backoff_seconds", 0.0, agent=agent)

    def pool_actors(self, agent: str, *, idle: int, prewarming: int) -> None:
        self._set("rayvisor_idle_actors", idle, agent=agent)
        self._set("rayvisor_prewarming_actors", prewarming, agent=agent)

    def footprint(self, *, rss_bytes: int, job_records: int, stored_snapshots: int, tasks: int) -> None:
        """The supervisor's own size: memory, records kept (live + bounded history),
        snapshots in Ray's KV, and background tasks. Flat over time, or something leaks."""
        self._set("rayvisor_supervisor_rss_bytes", rss_bytes)
        self._set("rayvisor_job_records", job_records)
        self._set("rayvisor_stored_job_snapshots", stored_snapshots)
        self._set("rayvisor_supervisor_tasks", tasks)

    def autoscaler_requested(self, bundles: int) -> None:
        """The job bundles the supervisor now asks Ray's autoscaler to make room for."""
        self._set("rayvisor_autoscaler_requested_bundles", bundles)

    def job_started(self, seconds: float) -> None:
        self._observe("rayvisor_job_start_seconds", seconds)

    def job_shut_down(self, seconds: float) -> None:
        self._observe("rayvisor_job_shutdown_seconds", seconds)

    def snapshot(self) -> MetricsSnapshot:
        return MetricsSnapshot(
            counters=dict(self._counters), gauges=dict(self._gauges),
            histograms={k: HistogramSummary(count=int(v[0]), total=v[1], max=v[2]) for k, v in self._histograms.items()},
        )
