"""The job metrics: outcomes, execution time, queue wait, per-node execution time by class,
cached nodes, and jobs in flight per instance.

Registered on the registry the caller passes (never the global one); the in-flight gauge is a
collector that reads the tracker's counts on scrape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchestrator.core.instances import InstanceView
from orchestrator.jobs.store import Job

# comfyui_jobs_total{status}: finished jobs by outcome, plus refusals at submission.
METRIC_STATUSES = ("success", "error", "timeout", "invalid", "rejected")
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
NODE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class InflightCollector(Collector):
    """comfyui_instance_jobs_in_flight{gpu,instance}, read on scrape."""

    def __init__(self, inflight: Callable[[], dict[int, int]], views: Callable[[], Sequence[InstanceView]]) -> None:
        self._inflight = inflight
        self._views = views

    def describe(self) -> list[Metric]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "comfyui_instance_jobs_in_flight",
            "Jobs the job API has sent to the instance and not yet finished",
            labels=["gpu", "instance"],
        )

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        counts = self._inflight()
        names = {v.index: v.name for v in self._views()}
        for index in sorted(set(names) | set(counts)):
            family.add_metric([str(index), names.get(index, f"comfyui_gpu{index}")], counts.get(index, 0))
        yield family


class JobMetrics:
    """comfyui_jobs_total{status}, comfyui_job_duration_seconds, comfyui_job_queue_wait_seconds
    and the in-flight gauge, on ``registry``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        inflight: Callable[[], dict[int, int]],
        views: Callable[[], Sequence[InstanceView]],
    ) -> None:
        self.jobs_total = Counter(
            "comfyui_jobs",
            "Jobs by outcome (invalid/rejected: refused at submission)",
            ["status"],
            registry=registry,
        )
        for status in METRIC_STATUSES:
            self.jobs_total.labels(status)
        self.duration = Histogram(
            "comfyui_job_duration_seconds",
            "Execution time of finished jobs on their instance",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "comfyui_job_queue_wait_seconds",
            "Time from acceptance to the start of execution",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.node_seconds = Histogram(
            "comfyui_node_execution_seconds",
            "Execution time of workflow nodes by class (from the /ws events; cached nodes not counted)",
            ["class_type"],
            buckets=NODE_BUCKETS,
            registry=registry,
        )
        self.nodes_cached = Counter(
            "comfyui_job_nodes_cached",
            "Workflow nodes served from the instance's cache instead of executed",
            registry=registry,
        )
        registry.register(InflightCollector(inflight, views))

    def refused(self, status: str) -> None:
        """A job refused at submission: ``invalid`` (400) or ``rejected`` (no room)."""
        self.jobs_total.labels(status).inc()

    def finished(self, job: Job) -> None:
        """Count a final job: its outcome, queue wait and execution time."""
        error = job.error
        self.jobs_total.labels("invalid" if error is not None and error.type == "validation" else job.status).inc()
        if job.started_mono is not None:
            self.queue_wait.observe(max(0.0, job.started_mono - job.created_mono))
        if job.execution_time is not None:
            self.duration.observe(job.execution_time)
        for node in job.progress.timings() if job.progress is not None else ():
            if node.cached:
                self.nodes_cached.inc()
            else:
                self.node_seconds.labels(node.class_type or "unknown").observe(node.seconds)
