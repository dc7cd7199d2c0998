"""The job manager: accepts jobs, routes them, runs an attempt per instance, keeps the results.

::

    submit ─► new_job (pure, 400 naming node/field) ─► route (core.routing: least loaded READY,
           gpu pin, 503 when saturated; reserved at once) ─► task: run_attempt ─► finish
    get    ─► the stored result (bounded by JOB_RESULTS_MAX and JOB_RESULTS_TTL)

An instance that goes away before it started a job gets the job resubmitted once to another;
one that goes away mid-job fails it with the reason. A job past its deadline is interrupted,
reported as a timeout, and (when it was executing) reported to the directory as a hung
instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

import aiohttp
from prometheus_client import CollectorRegistry

from orchestrator.comfy.client import ComfyCallError, ComfyClient, describe, new_session
from orchestrator.comfy.protocol import Dialect
from orchestrator.core.errors import JobError
from orchestrator.core.instances import InstanceDirectory, InstanceView
from orchestrator.core.routing import RouteError, all_saturated, route
from orchestrator.core.settings import Settings
from orchestrator.core.workflow import WorkflowError
from orchestrator.jobs.attempt import Rejected, Result, run_attempt
from orchestrator.jobs.follow import Down, Tracking
from orchestrator.jobs.metrics import JobMetrics
from orchestrator.jobs.schemas import ErrorType, JobErrorInfo, JobRequest
from orchestrator.jobs.store import Job, ResultStore, new_job

log = logging.getLogger(__name__)


class JobManager:
    """Accepts jobs, routes them, follows them on their instance, keeps their results.

    Args:
        settings: MAX_QUEUE_DEPTH, JOB_TIMEOUT, JOB_RESULTS_MAX, JOB_RESULTS_TTL are read here.
        directory: the monitor's live view of the instances.
        registry: where the job metrics are registered (never the global registry).
        poll_interval: seconds between /history polls when the socket is gone, and the silence
            (no event of the job's prompt) after which a followed socket is backed by one.
        check_interval: how often a job re-reads the directory and its deadline while waiting.
    """

    def __init__(
        self,
        settings: Settings,
        directory: InstanceDirectory,
        registry: CollectorRegistry,
        *,
        poll_interval: float = 0.5,
        check_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.directory = directory
        self._clock = clock
        self._wall = wall
        self.store = ResultStore(settings.job_results_max, settings.job_results_ttl, clock)
        self._inflight: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.draining = False  # shutting down: new jobs are refused (503 draining)
        # A known upstream instance is posted to without waiting for its greeting (one round
        # trip less); a fork's client_id message seen later switches it back.
        self.tracking = Tracking(directory, clock, poll_interval, check_interval)
        self.metrics = JobMetrics(registry, self.inflight, directory.snapshot)

    @property
    def dialects(self) -> dict[int, Dialect]:
        """GPU index -> "upstream" | "fork", learned from each instance's /ws greeting."""
        return self.tracking.dialects

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the HTTP session and the results pruner (call inside the serving event loop)."""
        if self._session is None:
            self._session = new_session(total=60, connect=5)
        if self._pruner is None:
            self._pruner = asyncio.create_task(self._prune_loop())

    async def close(self) -> None:
        """Stop following jobs (they keep running on their instances) and close the session."""
        tasks = [*self._tasks, *([self._pruner] if self._pruner else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pruner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _prune_loop(self) -> None:
        interval = min(60.0, max(1.0, self.store.ttl / 4))
        while True:
            await asyncio.sleep(interval)
            self.store.prune()

    # ------------------------------------------------------------ queries
    def inflight(self) -> dict[int, int]:
        """GPU index → jobs sent to that instance and not finished (a missing GPU means 0)."""
        return dict(self._inflight)

    def get(self, job_id: str) -> Job | None:
        return self.store.get(job_id)

    def saturated(self) -> bool:
        """Every READY instance has MAX_QUEUE_DEPTH or more (for /readyz with READYZ_SATURATION)."""
        return all_saturated(self.directory.snapshot(), self._inflight, self.settings.max_queue_depth)

    def drain(self) -> None:
        """Shutdown: refuse new jobs (503 ``draining``); those in flight go on until :meth:`idle`."""
        self.draining = True

    def idle(self) -> bool:
        return not self._tasks

    # ------------------------------------------------------------ submission
    async def submit(self, request: JobRequest) -> Job:
        """Validate, route and start following a job; returns at once (await ``job.done``).

        Raises:
            WorkflowError: the workflow or an override is invalid (HTTP 400).
            RouteError: no instance can take it (HTTP 400 for an unknown gpu, else 503).
            JobError: the manager is not started.
        """
        if self._session is None:
            raise JobError("the job manager is not started; call start() inside the event loop first")
        if self.draining:
            self.metrics.refused("rejected")
            raise RouteError("this machine is draining (shutting down): send the job to another machine",
                             status=503, reason="draining")
        try:
            job = new_job(request, default_timeout=self.settings.job_timeout, now=self._clock(), wall=self._wall())
        except WorkflowError:
            self.metrics.refused("invalid")
            raise
        view = self._route(job, exclude=())
        self.store.add(job)
        task = asyncio.create_task(self._run(job, view, self._session), name=f"job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Wait until the job is final; False when ``timeout`` passed first."""
        if job.final:
            return True
        try:
            await asyncio.wait_for(job.done.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _route(self, job: Job, exclude: Iterable[int], *, count_refusal: bool = True) -> InstanceView:
        try:
            view = route(
                self.directory.snapshot(),
                self._inflight,
                max_queue_depth=self.settings.max_queue_depth,
                gpu=job.gpu,
                exclude=exclude,
            )
        except RouteError as exc:
            if count_refusal:
                self.metrics.refused("invalid" if exc.status == 400 else "rejected")
            raise
        # Reserve now, in the same event-loop step as the decision, so a burst spreads out.
        self._inflight[view.index] = self._inflight.get(view.index, 0) + 1
        job.instance = view
        job.attempts += 1
        return view

    def _release(self, view: InstanceView) -> None:
        self._inflight[view.index] = max(0, self._inflight.get(view.index, 0) - 1)

    # ------------------------------------------------------------ following a job
    async def _run(self, job: Job, view: InstanceView, session: aiohttp.ClientSession) -> None:
        current: InstanceView | None = view
        try:
            try:
                result = await run_attempt(job, view, ComfyClient(session, view.base_url), self.tracking)
            except Down as down:
                if down.started:
                    raise
                # Not started there: resubmit once to another instance.
                self._release(view)
                current = None
                try:
                    current = self._route(job, exclude=(view.index,), count_refusal=False)
                except RouteError as exc:
                    raise Down(f"{down.reason}; no other instance to resubmit to ({exc})", started=False) from None
                log.warning("job %s: %s before it started; resubmitted to GPU %d", job.id, down.reason, current.index)
                job.prompt_id = None
                job.progress = None
                job.status = "pending"
                result = await run_attempt(job, current, ComfyClient(session, current.base_url), self.tracking)
            self._finish(job, result)
        except Down as down:
            self._fail(job, "instance", down.reason)
        except Rejected as rejected:
            self._finish(job, Result("error", rejected.info))
        except asyncio.CancelledError:
            self._fail(job, "internal", "the job API shut down while the job was in flight")
            raise
        except (ComfyCallError, OSError, ValueError) as exc:
            name = job.instance.name if job.instance else "the instance"
            reason = exc.reason if isinstance(exc, ComfyCallError) else describe(exc)
            self._fail(job, "internal", f"talking to {name}: {reason}")
        finally:
            if current is not None:
                self._release(current)
            if not job.final:
                self._fail(job, "internal", "the job ended without a result")

    # ------------------------------------------------------------ outcomes
    def _fail(self, job: Job, kind: ErrorType, message: str) -> None:
        self._finish(job, Result("error", JobErrorInfo(type=kind, message=message)))

    def _finish(self, job: Job, result: Result) -> None:
        if job.final:
            return
        job.finish(result.status, result.error, self._clock(), self._wall())
        self.metrics.finished(job)
        self.store.finished(job)
        job.done.set()
        where = f" on GPU {job.instance.index}" if job.instance else ""
        error = result.error
        log.info("job %s%s: %s%s", job.id, where, result.status, f" ({error.message})" if error else "")
