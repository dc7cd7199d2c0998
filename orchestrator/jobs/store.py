"""Jobs as records: one mutable :class:`Job` per accepted request (owned by the manager's event
loop), built by :func:`new_job`, and the :class:`ResultStore` that keeps them for
JOB_RESULTS_TTL / JOB_RESULTS_MAX once finished.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Literal

from orchestrator.comfy.protocol import NodeProgress
from orchestrator.core.instances import InstanceView
from orchestrator.core.routing_score import JobProfile
from orchestrator.core.workflow import Override, Shorthand, Workflow, prepare_workflow
from orchestrator.jobs.schemas import (
    FINAL_STATUSES,
    InstanceRef,
    JobErrorInfo,
    JobProgress,
    JobRequest,
    JobResponse,
    JobStatus,
    NodeTime,
    OutputFile,
    ReturnMode,
    RoutingInfo,
    decode_image,
)

FinalStatus = Literal["success", "error", "timeout"]


@dataclasses.dataclass
class Job:
    """One job's mutable record (owned by the manager's event loop)."""

    id: str
    workflow: Workflow
    images: list[tuple[str, bytes]]
    return_mode: ReturnMode
    gpu: int | None
    timeout: float
    created_at: float  # unix seconds
    created_mono: float
    deadline: float  # monotonic
    status: JobStatus = "pending"
    prompt_id: str | None = None
    instance: InstanceView | None = None
    outputs: list[OutputFile] = dataclasses.field(default_factory=list)
    error: JobErrorInfo | None = None
    started_mono: float | None = None
    ended_mono: float | None = None
    execution_time: float | None = None
    finished_at: float | None = None
    finished_mono: float | None = None
    attempts: int = 0
    progress: NodeProgress | None = None
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    routing: RoutingInfo | None = None
    profile: JobProfile | None = None
    peak_vram_bytes: int | None = None
    answer: JobResponse | None = None  # a finished job read back from the journal: its answer as it was

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def finish(self, status: FinalStatus, error: JobErrorInfo | None, now: float, wall: float) -> None:
        """Record the outcome (``now`` monotonic, ``wall`` unix seconds); drop the inputs."""
        if self.execution_time is None and self.started_mono is not None:
            self.execution_time = (self.ended_mono or now) - self.started_mono
        self.status = status
        self.error = error
        if status == "success" and self.progress is not None:
            self.progress.finish()
        self.images = []  # inputs are not needed any more; the store keeps results only
        self.workflow = {}
        self.finished_mono = now
        self.finished_at = wall

    def to_response(self) -> JobResponse:
        if self.answer is not None:
            return self.answer
        inst = self.instance
        wait = None if self.started_mono is None else max(0.0, self.started_mono - self.created_mono)
        total = None if self.finished_mono is None else self.finished_mono - self.created_mono
        return JobResponse(
            id=self.id,
            status=self.status,
            prompt_id=self.prompt_id,
            progress=None
            if self.progress is None
            else JobProgress(nodes_done=self.progress.done, nodes_total=self.progress.total),
            instance=None if inst is None else InstanceRef(gpu=inst.index, name=inst.name, port=inst.port),
            outputs=list(self.outputs),
            error=self.error,
            execution_time_seconds=_round(self.execution_time),
            queue_wait_seconds=_round(wait),
            total_seconds=_round(total),
            created_at=round(self.created_at, 3),
            finished_at=None if self.finished_at is None else round(self.finished_at, 3),
            attempts=self.attempts,
            run_seconds=_round(self.execution_time),
            nodes=[]
            if self.progress is None
            else [
                NodeTime(id=n.id, class_type=n.class_type, seconds=round(n.seconds, 4), cached=n.cached)
                for n in self.progress.timings()
            ],
            routing=self.routing,
            peak_vram_bytes=self.peak_vram_bytes,
        )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class ResultStore:
    """Jobs by id; finished ones are dropped after ``ttl`` seconds or beyond ``max_items``."""

    def __init__(self, max_items: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_items = max_items
        self.ttl = ttl
        self._clock = clock
        self._jobs: dict[str, Job] = {}
        self._finished: collections.OrderedDict[str, float] = collections.OrderedDict()

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        """The job, or None when unknown or expired (a pure read: safe from another thread)."""
        job = self._jobs.get(job_id)
        finished_at = self._finished.get(job_id)
        if job is None or (finished_at is not None and self._clock() - finished_at >= self.ttl):
            return None
        return job

    def finished(self, job: Job, at: float | None = None) -> None:
        """Count the job as finished ``at`` (monotonic; default now) for the TTL."""
        self._finished[job.id] = self._clock() if at is None else at
        self._finished.move_to_end(job.id)
        self.prune()

    def prune(self) -> int:
        """Drop expired and surplus finished jobs; jobs in flight are always kept."""
        now = self._clock()
        dropped = 0
        while self._finished:
            job_id, at = next(iter(self._finished.items()))
            if now - at < self.ttl and len(self._finished) <= self.max_items:
                break
            del self._finished[job_id]
            self._jobs.pop(job_id, None)
            dropped += 1
        return dropped

    async def prune_periodically(self, after: Callable[[set[str]], None] | None = None) -> None:
        """Prune every TTL/4 (1 to 60 s) until cancelled; ``after`` gets the ids still kept."""
        interval = min(60.0, max(1.0, self.ttl / 4))
        while True:
            await asyncio.sleep(interval)
            self.prune()
            if after is not None:
                after(self.ids())

    def ids(self) -> set[str]:
        return set(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))


def new_job(request: JobRequest, *, default_timeout: float, now: float, wall: float) -> Job:
    """Validate and patch the workflow, decode the input images; nothing is sent yet.

    Raises:
        WorkflowError: naming the node and field at fault.
    """
    overrides = [Override(o.node_id, o.field, o.value) for o in request.overrides]
    shorthand = Shorthand(
        prompt=request.prompt,
        prompt_node_id=request.prompt_node_id,
        seed=request.seed,
        seed_node_id=request.seed_node_id,
        width=request.width,
        height=request.height,
        size_node_id=request.size_node_id,
    )
    workflow = prepare_workflow(request.workflow, overrides, shorthand)
    images = [(img.name, decode_image(img)) for img in request.images]
    timeout = request.timeout or default_timeout
    return Job(
        id=uuid.uuid4().hex,
        workflow=workflow,
        images=images,
        return_mode=request.return_,
        gpu=request.gpu,
        timeout=timeout,
        created_at=wall,
        created_mono=now,
        deadline=now + timeout,
    )
