"""A job's peak GPU memory: the most the monitor's GPU sampler saw used on its device while it ran.

The job tracker does not talk to NVML itself: it reads the samples the monitor's sampler takes
every GPU_SAMPLE_INTERVAL (``core.readiness.GpuStatus``) and keeps, per running job, the
largest ``memory_used`` of its instance's GPU among the samples taken between the job's start
and now. So the figure is the device's memory used (every process on it, not the instance's
alone), a job shorter than the sampling interval may get none, and mock GPUs give none.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence

from orchestrator.core.readiness import GpuStatus
from orchestrator.jobs.store import Job

INTERVAL = 0.5  # seconds between reads of the sampler's latest values (they are cached there)


def job_started_wall(job: Job) -> float | None:
    """Unix time the job started executing, or None while it has not."""
    if job.started_mono is None:
        return None
    return job.created_at + (job.started_mono - job.created_mono)


def update_peak(job: Job, statuses: Sequence[GpuStatus]) -> None:
    """Raise ``job.peak_vram_bytes`` to its GPU's latest sample, if taken since the job started."""
    started = job_started_wall(job)
    if job.instance is None or started is None:
        return
    for status in statuses:
        if status.gpu.index != job.instance.index or status.gpu.mock:
            continue
        sample, at = status.sample, status.sampled_at
        if sample is None or sample.failed or sample.memory_used is None or at is None or at < started:
            continue
        job.peak_vram_bytes = max(job.peak_vram_bytes or 0, sample.memory_used)


async def watch_peaks(
    jobs: Callable[[], Iterable[Job]], statuses: Callable[[], Sequence[GpuStatus]], interval: float = INTERVAL
) -> None:
    """Forever: update the peak of every running job from the sampler's latest values."""
    while True:
        running = [j for j in jobs() if j.status == "running"]
        if running:
            latest = statuses()
            for job in running:
                update_peak(job, latest)
        await asyncio.sleep(interval)


class PeakWatcher:
    """The job manager's watch over its running jobs' peaks (idle without ``statuses``)."""

    def __init__(self, statuses: Callable[[], Sequence[GpuStatus]] | None) -> None:
        self._statuses = statuses
        self._task: asyncio.Task[None] | None = None

    def start(self, jobs: Callable[[], Iterable[Job]]) -> None:
        """Start watching (inside the event loop)."""
        if self._task is None and self._statuses is not None:
            self._task = asyncio.create_task(watch_peaks(jobs, self._statuses))

    def observe(self, job: Job) -> None:
        """One last read as the job ends."""
        if self._statuses is not None:
            update_peak(job, self._statuses())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
