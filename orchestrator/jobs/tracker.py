"""The job manager: accepts jobs, routes them, runs an attempt per instance, keeps the results.

::

    submit ─► new_job (pure, 400 naming node/field) ─► route (core.routing: least loaded READY,
           gpu pin, 503 when saturated; reserved at once) ─► task: run_attempt ─► finish
    get    ─► the stored result (bounded by JOB_RESULTS_MAX and JOB_RESULTS_TTL)

An instance that goes away before it started a job gets the job resubmitted once to another;
one that goes away mid-job fails it with the reason. A job past its deadline is reported as a
timeout at once: removed from its instance's queue, or (executing) interrupted; the instance is
reported hung only when the interrupt does not take within JOB_INTERRUPT_GRACE. A ``timeout``
below JOB_MIN_TIMEOUT is refused (400), so a client cannot make instances look hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from orchestrator.comfy.client import ComfyClient, new_session
from orchestrator.comfy.protocol import Dialect
from orchestrator.core.errors import JobError
from orchestrator.core.instances import InstanceDirectory, InstanceView
from orchestrator.core.readiness import GpuStatus
from orchestrator.core.routing import RouteError, all_saturated
from orchestrator.core.routing_score import profile
from orchestrator.core.settings import Settings
from orchestrator.core.workflow import WorkflowError
from orchestrator.jobs.attempt import Result, confirm_stopped, run_attempt, settled
from orchestrator.jobs.follow import Down, Tracking
from orchestrator.jobs.journal import JobJournal
from orchestrator.jobs.metrics import JobMetrics
from orchestrator.jobs.recovery import restore
from orchestrator.jobs.schemas import ErrorType, JobErrorInfo, JobRequest
from orchestrator.jobs.speeds import SpeedBook, choose_instance
from orchestrator.jobs.store import Job, ResultStore, new_job
from orchestrator.jobs.uploads import OutputUploader
from orchestrator.jobs.vram import PeakWatcher
from orchestrator.jobs.webhooks import Webhooks

log = logging.getLogger(__name__)


def check_timeout(request: JobRequest, least: float) -> None:
    """A ``timeout`` below JOB_MIN_TIMEOUT is refused (a client cannot make instances look hung)."""
    if request.timeout is not None and request.timeout < least:
        raise WorkflowError(
            f"timeout: {request.timeout:g} s is below the {least:g} s minimum (JOB_MIN_TIMEOUT); "
            f"ask for {least:g} s or more",
            field="timeout",
        )


class JobManager:
    """Accepts jobs, routes them, follows them on their instance, keeps their results.

    Longer than 200 lines because it is the one place a job's path is told end to end.

    Args:
        settings: MAX_QUEUE_DEPTH, JOB_TIMEOUT, JOB_RESULTS_MAX, JOB_RESULTS_TTL are read here.
        directory: the monitor's live view of the instances.
        registry: where the job metrics are registered (never the global registry).
        poll_interval: seconds between /history polls when the socket is gone, and the silence
            (no event of the job's prompt) after which a followed socket is backed by one.
        check_interval: how often a job re-reads the directory and its deadline while waiting.
        journal: where each job's record is kept, so that a restarted manager serves the results
            of the jobs it had accepted and follows those still running (None: memory only).
        gpu_statuses: the monitor's GPU samples, for each job's peak GPU memory (``jobs.vram``).
        uploader: sends finished jobs' outputs to OUTPUT_UPLOAD (None: they stay local).
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
        journal: JobJournal | None = None,
        gpu_statuses: Callable[[], Sequence[GpuStatus]] | None = None,
        uploader: OutputUploader | None = None,
    ) -> None:
        self.settings = settings
        self.journal = journal
        self.uploader = uploader
        self.directory = directory
        self._clock = clock
        self._wall = wall
        self.store = ResultStore(settings.job_results_max, settings.job_results_ttl, clock)
        self._inflight: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._pruner: asyncio.Task[None] | None = None
        self.vram = PeakWatcher(gpu_statuses)
        self.draining = False  # shutting down: new jobs are refused (503 draining)
        # A known upstream instance is posted to without waiting for its greeting (one round
        # trip less); a fork's client_id message seen later switches it back.
        self.tracking = Tracking(directory, clock, poll_interval, check_interval)
        self.tracking.saved = journal.record if journal else self.tracking.saved
        self.metrics = JobMetrics(registry, self.inflight, directory.snapshot)
        self.speeds = SpeedBook()  # learned from completed jobs; read by capacity routing
        self.webhooks = Webhooks(settings, registry, journal.directory if journal else None, clock=clock, wall=wall)

    @property
    def dialects(self) -> dict[int, Dialect]:
        """GPU index -> "upstream" | "fork", learned from each instance's /ws greeting."""
        return self.tracking.dialects

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the HTTP session and the results pruner (call inside the serving event loop)."""
        if self._session is None:
            self._session = new_session(total=60, connect=5)
            if self.journal is not None:
                restore(self, self.journal, self._session)
        if self._pruner is None:
            journal = self.journal
            forget = (lambda kept: journal.forget(journal.ids() - kept)) if journal else None
            self._pruner = asyncio.create_task(self.store.prune_periodically(forget))
        self.vram.start(self.store.__iter__)
        await self.webhooks.start(self.store)

    async def close(self) -> None:
        """Stop following jobs (they keep running on their instances) and close the session."""
        tasks = [*self._tasks, *([self._pruner] if self._pruner else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pruner = None
        await self.vram.stop()
        await self.webhooks.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _start(self, job: Job, work: Coroutine[Any, Any, None]) -> None:
        self.store.add(job)
        task = asyncio.create_task(work, name=f"job-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
            check_timeout(request, self.settings.job_min_timeout)
            job = new_job(request, default_timeout=self.settings.job_timeout, now=self._clock(), wall=self._wall())
        except WorkflowError:
            self.metrics.refused("invalid")
            raise
        view = self._route(job, exclude=())
        if self.journal is not None:
            self.journal.record(job)
        self._start(job, self._run(job, view, self._session))
        self.webhooks.watch(job, request.webhook)
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
        job.profile = job.profile or profile(job.workflow)
        try:
            view, job.routing = choose_instance(
                self.directory.snapshot(), self._inflight, job.profile, self.speeds, self.settings, job.gpu, exclude
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
        holding: list[InstanceView] = [view]  # the instance whose in-flight count this job holds

        async def attempts() -> Result:
            try:
                return await run_attempt(job, view, ComfyClient(session, view.base_url), self.tracking)
            except Down as down:
                if down.started:
                    raise
                # Not started there: resubmit once to another instance.
                self._release(holding.pop())
                try:
                    current = self._route(job, exclude=(view.index,), count_refusal=False)
                except RouteError as exc:
                    raise Down(f"{down.reason}; no other instance to resubmit to ({exc})", started=False) from None
                holding.append(current)
                log.warning("job %s: %s before it started; resubmitted to GPU %d", job.id, down.reason, current.index)
                job.prompt_id = None
                job.progress = None
                job.status = "pending"
                return await run_attempt(job, current, ComfyClient(session, current.base_url), self.tracking)

        try:
            result = await self._outcome(job, attempts())
            if result.interrupted and holding:  # the instance stays reserved until the prompt has left it
                held = holding[-1]
                client, grace = ComfyClient(session, held.base_url), self.settings.job_interrupt_grace
                await confirm_stopped(job, held, client, self.tracking, grace)
        finally:
            for held in holding:
                self._release(held)

    async def _outcome(self, job: Job, work: Awaitable[Result]) -> Result:
        """Await an attempt and record how it ended, whatever it raised."""
        try:
            result = await settled(job, work)
            if result.status == "success" and self.uploader is not None:
                await self.uploader.upload(job)
        except asyncio.CancelledError:
            if self.journal is None:  # with one, the record stays as it is: the next monitor follows the job
                self._fail(job, "internal", "the job API shut down while the job was in flight")
            raise
        except Exception:
            self._fail(job, "internal", "the job ended without a result")
            raise
        self._finish(job, result)
        return result

    # ------------------------------------------------------------ outcomes
    def _fail(self, job: Job, kind: ErrorType, message: str) -> None:
        self._finish(job, Result("error", JobErrorInfo(type=kind, message=message)))

    def _finish(self, job: Job, result: Result) -> None:
        if job.final:
            return
        self.vram.observe(job)
        job.finish(result.status, result.error, self._clock(), self._wall())
        if self.journal is not None:
            self.journal.record(job)
        self.metrics.finished(job)
        self.speeds.learn(job)
        self.store.finished(job)
        job.done.set()
        where = f" on GPU {job.instance.index}" if job.instance else ""
        error = result.error
        log.info("job %s%s: %s%s", job.id, where, result.status, f" ({error.message})" if error else "")
