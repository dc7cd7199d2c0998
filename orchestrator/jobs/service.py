"""Jobs: route API-format workflows to the least-busy READY instance and track them to the end.

::

    POST /jobs ─► JobManager.submit ─► prepare_workflow (pure, 400 naming node/field)
                                   ─► route (pure: least loaded READY, gpu pin, 503 when saturated)
                                   ─► task: /ws?clientId (adopt the fork's own client_id)
                                            ─► /upload/image ─► POST /prompt
                                            ─► follow /ws events, and poll /history whenever the
                                               socket is silent for our prompt ─► outputs
    GET /jobs/{id} ─► the stored result (bounded by JOB_RESULTS_MAX and JOB_RESULTS_TTL)

Both WebSocket dialects work: upstream ComfyUI honours ``?clientId=``; the fleet's fork
(stakeordie/ComfyUI master) assigns its own id and announces it in a first ``client_id``
message, which the job then posts its prompt with. The socket is never the only source: a
prompt whose events go elsewhere is still seen finished through ``/history`` within about
``poll_interval`` of its end.

An instance that goes away before it started a job gets the job resubmitted once to another;
one that goes away mid-job fails it with the reason. A job past its deadline is interrupted,
reported as a timeout, and (when it was executing) reported to the directory as a hung
instance.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import aiohttp
from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.core.auth import bearer_ok
from orchestrator.core.errors import JobError
from orchestrator.core.instances import InstanceDirectory, InstanceView
from orchestrator.core.settings import Settings
from orchestrator.core.states import InstanceState
from orchestrator.core.workflow import (
    Override,
    Shorthand,
    Workflow,
    WorkflowError,
    first_node_error,
    format_node_errors,
    prepare_workflow,
)

log = logging.getLogger(__name__)

JobStatus = Literal["pending", "queued", "running", "success", "error", "timeout"]
FINAL_STATUSES = frozenset({"success", "error", "timeout"})
ErrorType = Literal["validation", "execution", "interrupted", "instance", "timeout", "internal"]
ReturnMode = Literal["filenames", "base64"]

# comfyui_jobs_total{status}: finished jobs by outcome, plus refusals at submission.
METRIC_STATUSES = ("success", "error", "timeout", "invalid", "rejected")
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Instance states in which a job sent to it is gone (its process stopped or restarted).
# UNHEALTHY is not among them: the process may still be executing our prompt, and the
# monitor moves a really dead instance on to RESTARTING.
GONE_STATES = frozenset(
    {
        InstanceState.STOPPED,
        InstanceState.STARTING,
        InstanceState.RESTARTING,
        InstanceState.BACKOFF,
        InstanceState.FATAL,
    }
)

_HTTP_ERRORS = (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError)
SUBMIT_TIMEOUT = 30.0  # seconds for the ws handshake, uploads and POST /prompt together
GREETING_TIMEOUT = 2.0  # seconds to wait for the socket's first status (and the fork's client_id)
POLL_CALL_TIMEOUT = 10.0  # seconds for one /history or /queue call while polling
STOP_CALL_TIMEOUT = 3.0  # seconds for POST /interrupt or /queue at the deadline (best effort)
_IMAGE_NAME = re.compile(r"^[\w][\w .()+-]{0,200}$")
_NODE_ID_IN_DETAILS = re.compile(r"#([^'\s]+)'")


# ---------------------------------------------------------------- request / response models
class OverrideIn(BaseModel):
    """Set one value: ``workflow[node_id]`` at the dotted ``field`` path."""

    model_config = ConfigDict(extra="forbid")
    node_id: str = Field(description='Node id in the workflow, e.g. "6"', examples=["6"])
    field: str = Field(description="Dotted path inside the node", examples=["inputs.text"])
    value: Any = Field(description="The new value")

    @field_validator("node_id", mode="before")
    @classmethod
    def _node_id_as_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class InputImage(BaseModel):
    """An input image uploaded to the instance's input folder before the prompt is queued."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="File name that LoadImage nodes refer to", examples=["input.png"])
    image: str = Field(description="Base64 data (a data: URI prefix is accepted)")


class JobRequest(BaseModel):
    """A workflow to run, with overrides or the serverless seed's shorthand."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    workflow: dict[str, dict[str, Any]] = Field(description="ComfyUI workflow in API format")
    overrides: list[OverrideIn] = Field(default_factory=list)
    gpu: int | None = Field(default=None, ge=0, description="Pin the job to this GPU's instance")
    timeout: float | None = Field(
        default=None, gt=0, le=86400, description="Deadline in seconds from submission (default JOB_TIMEOUT)"
    )
    wait: bool = Field(default=True, description="true: answer when the job is done; false: 202 at once")
    return_: ReturnMode = Field(
        default="filenames", alias="return", description="base64: include the output files' data"
    )
    prompt: str | None = Field(default=None, description="Shorthand: text of the prompt node")
    prompt_node_id: str | None = None
    seed: int | None = Field(default=None, description="Shorthand: seed of the sampler/noise node")
    seed_node_id: str | None = None
    width: int | None = Field(default=None, description="Shorthand: latent width")
    height: int | None = Field(default=None, description="Shorthand: latent height")
    size_node_id: str | None = None
    images: list[InputImage] = Field(default_factory=list, description="Input images to upload first")

    @field_validator("prompt_node_id", "seed_node_id", "size_node_id", mode="before")
    @classmethod
    def _ids_as_str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


class OutputFile(BaseModel):
    node_id: str
    filename: str
    subfolder: str = ""
    type: str = "output"
    data: str | None = Field(default=None, description="Base64 file content when return=base64")


class InstanceRef(BaseModel):
    gpu: int
    name: str
    port: int


class JobErrorInfo(BaseModel):
    type: ErrorType
    message: str
    node_id: str | None = None
    node_type: str | None = None
    field: str | None = None


class JobProgress(BaseModel):
    nodes_done: int = Field(description="Nodes finished or served from cache")
    nodes_total: int = Field(description="Nodes in the workflow")


class JobResponse(BaseModel):
    id: str
    status: JobStatus
    prompt_id: str | None = None
    progress: JobProgress | None = Field(
        default=None, description="Per-node progress once the instance has the prompt (from its /ws events)"
    )
    instance: InstanceRef | None = None
    outputs: list[OutputFile] = Field(default_factory=list)
    error: JobErrorInfo | None = None
    execution_time_seconds: float | None = None
    queue_wait_seconds: float | None = None
    total_seconds: float | None = None
    created_at: float = Field(description="Unix time the job was accepted")
    finished_at: float | None = None
    attempts: int = Field(description="Instances the job was sent to (2 after a resubmission)")


class ErrorResponse(BaseModel):
    error: str = Field(
        description="validation, unauthorized, too_large, not_found, no_instance, saturated, not_ready"
    )
    message: str
    node_id: str | None = None
    field: str | None = None
    job_id: str | None = None


# ---------------------------------------------------------------- routing (pure)
class RouteError(JobError):
    """No instance can take the job; ``status`` is the HTTP code, ``reason`` a short word."""

    def __init__(self, message: str, *, status: int, reason: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def instance_load(view: InstanceView, own_inflight: int) -> int:
    """Prompts queued or running on an instance.

    The probe's queue counts include our own jobs once the probe has seen them, and our own
    in-flight count includes jobs submitted since the last probe; the larger of the two is
    the best estimate (adding them would count each of our jobs twice once a probe ran).
    """
    return max(view.queue_pending + view.queue_running, own_inflight)


def route(
    views: Sequence[InstanceView],
    inflight: Mapping[int, int],
    *,
    max_queue_depth: int,
    gpu: int | None = None,
    exclude: Iterable[int] = (),
) -> InstanceView:
    """The READY instance with the least load (ties: lowest GPU index).

    Raises:
        RouteError: 400 for an unknown ``gpu``; 503 when the pinned instance is not ready,
            none is ready, or every candidate has ``max_queue_depth`` or more.
    """
    excluded = set(exclude)
    if gpu is not None:
        pinned = [v for v in views if v.index == gpu]
        if not pinned:
            known = ", ".join(str(v.index) for v in views) or "none"
            raise RouteError(
                f"gpu {gpu} is not an instance on this machine (GPUs: {known})",
                status=400,
                reason="validation",
            )
        view = pinned[0]
        if not view.ready or view.index in excluded:
            raise RouteError(
                f"gpu {gpu} ({view.name}) is {view.state.value}, not READY; retry later or leave gpu out",
                status=503,
                reason="not_ready",
            )
        if instance_load(view, inflight.get(view.index, 0)) >= max_queue_depth:
            raise RouteError(
                f"gpu {gpu} ({view.name}) has {max_queue_depth} or more jobs (MAX_QUEUE_DEPTH); retry later",
                status=503,
                reason="saturated",
            )
        return view
    ready = [v for v in views if v.ready and v.index not in excluded]
    if not ready:
        states = ", ".join(f"{v.index}:{v.state.value}" for v in views) or "no instances"
        raise RouteError(f"no READY instance to run the job ({states})", status=503, reason="no_instance")
    loads = [(instance_load(v, inflight.get(v.index, 0)), v.index, v) for v in ready]
    load, _, best = min(loads, key=lambda t: (t[0], t[1]))
    if load >= max_queue_depth:
        raise RouteError(
            f"every READY instance has {max_queue_depth} or more jobs (MAX_QUEUE_DEPTH); retry later",
            status=503,
            reason="saturated",
        )
    return best


def all_saturated(views: Sequence[InstanceView], inflight: Mapping[int, int], max_queue_depth: int) -> bool:
    """True when at least one instance is READY and every READY one has ``max_queue_depth`` or more."""
    ready = [v for v in views if v.ready]
    return bool(ready) and all(instance_load(v, inflight.get(v.index, 0)) >= max_queue_depth for v in ready)


# ---------------------------------------------------------------- events and history (pure)
@dataclasses.dataclass(frozen=True)
class Event:
    """What one /ws message means for our prompt."""

    kind: Literal["started", "done", "error", "interrupted", "other"]
    error: JobErrorInfo | None = None


def classify_event(message: Mapping[str, Any], prompt_id: str | None) -> Event:
    """Map a ComfyUI /ws JSON message onto our prompt's progress.

    ``executing`` with ``node: null`` or ``execution_success`` = done; ``execution_error`` =
    failed; ``execution_interrupted``; anything else that names our prompt = it has started.
    """
    kind = message.get("type")
    data = message.get("data")
    if not isinstance(data, dict):
        return Event("other")
    pid = data.get("prompt_id")
    if pid is not None and prompt_id is not None and pid != prompt_id:
        return Event("other")
    if kind == "executing":
        if data.get("node") is None:
            return Event("done") if pid is not None or prompt_id is not None else Event("other")
        return Event("started")
    if kind == "execution_success":
        return Event("done")
    if kind == "execution_error":
        return Event("error", _execution_error(data))
    if kind == "execution_interrupted":
        node = data.get("node_id")
        return Event(
            "interrupted",
            JobErrorInfo(
                type="interrupted",
                message="the execution was interrupted" + (f" at node {node}" if node else ""),
                node_id=None if node is None else str(node),
                node_type=data.get("node_type"),
            ),
        )
    if kind in _STARTED_EVENTS and pid:
        return Event("started")
    return Event("other")


_STARTED_EVENTS = frozenset(
    {"execution_start", "execution_cached", "progress", "executed", "progress_state", "node_executing"}
)


@dataclasses.dataclass
class NodeProgress:
    """Which of a prompt's nodes are done, from whichever events the server sends.

    Upstream: ``execution_cached`` (nodes), ``executing`` (a node starts, so the one before it
    is done), ``executed``, ``progress_state`` (``finished`` nodes). The fork adds
    ``node_executing`` per node. Counting by node id makes duplicates harmless.
    """

    total: int
    done_nodes: set[str] = dataclasses.field(default_factory=set)
    current: str | None = None
    completed: bool = False

    @property
    def done(self) -> int:
        return self.total if self.completed else min(self.total, len(self.done_nodes))

    def update(self, message: Mapping[str, Any], prompt_id: str | None) -> None:
        """Apply one /ws message (messages of other prompts are ignored)."""
        kind = message.get("type")
        data = message.get("data")
        if not isinstance(data, dict):
            return
        pid = data.get("prompt_id")
        if prompt_id is None or (pid is not None and pid != prompt_id):
            return
        if kind == "execution_cached" and pid is not None:
            self.done_nodes.update(str(n) for n in data.get("nodes") or [] if n is not None)
        elif kind in {"executing", "node_executing"} and pid is not None:
            node = data.get("node")
            if node is None:
                self.finish()
                return
            node = str(node)
            if self.current is not None and self.current != node:
                self.done_nodes.add(self.current)
            self.current = node
        elif kind == "executed" and data.get("node") is not None:
            self.done_nodes.add(str(data["node"]))
        elif kind == "progress_state" and isinstance(data.get("nodes"), dict):
            for node_id, state in data["nodes"].items():
                if isinstance(state, dict) and state.get("state") == "finished":
                    self.done_nodes.add(str(node_id))

    def finish(self) -> None:
        """The prompt completed: every node counts as done."""
        if self.current is not None:
            self.done_nodes.add(self.current)
        self.current = None
        self.completed = True


def _execution_error(data: Mapping[str, Any]) -> JobErrorInfo:
    node = data.get("node_id")
    node_type = data.get("node_type")
    exc_type = data.get("exception_type") or "error"
    exc_msg = str(data.get("exception_message") or "").strip() or "no message"
    where = f"node {node} ({node_type})" if node is not None else "the workflow"
    return JobErrorInfo(
        type="execution",
        message=f"{where} failed: {exc_type}: {exc_msg}",
        node_id=None if node is None else str(node),
        node_type=node_type,
    )


def history_outcome(entry: Mapping[str, Any]) -> Event:
    """What a finished ``/history/{id}`` entry says: done, error (with node) or interrupted."""
    status = entry.get("status") or {}
    messages = status.get("messages") or [] if isinstance(status, dict) else []
    for item in messages:
        if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict):
            name, data = item
            if name == "execution_error":
                return Event("error", _execution_error(data))
            if name == "execution_interrupted":
                return classify_event({"type": name, "data": data}, None)
    if isinstance(status, dict) and status.get("status_str") == "error":
        return Event("error", JobErrorInfo(type="execution", message="the instance reports the prompt failed"))
    return Event("done")


def history_times(entry: Mapping[str, Any]) -> float | None:
    """Execution seconds from the history's message timestamps (milliseconds), if present."""
    status = entry.get("status") or {}
    start = end = None
    for item in (status.get("messages") or []) if isinstance(status, dict) else []:
        if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict):
            ts = item[1].get("timestamp")
            if not isinstance(ts, int | float):
                continue
            if item[0] == "execution_start":
                start = ts
            elif item[0] in {"execution_success", "execution_error", "execution_interrupted"}:
                end = ts
    if start is None or end is None or end < start:
        return None
    return (end - start) / 1000.0


def history_outputs(entry: Mapping[str, Any]) -> list[OutputFile]:
    """Every file a node reported (images, gifs, videos, audio…), in node order."""
    files: list[OutputFile] = []
    outputs = entry.get("outputs") or {}
    if not isinstance(outputs, dict):
        return files
    for node_id in sorted(outputs, key=lambda n: (0, int(n), "") if str(n).isdigit() else (1, 0, str(n))):
        node_out = outputs[node_id]
        if not isinstance(node_out, dict):
            continue
        for items in node_out.values():
            if not isinstance(items, list):
                continue
            for item in items:
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    files.append(
                        OutputFile(
                            node_id=str(node_id),
                            filename=item["filename"],
                            subfolder=str(item.get("subfolder") or ""),
                            type=str(item.get("type") or "output"),
                        )
                    )
    return files


def prompt_rejection(body: Any, workflow: Workflow) -> JobErrorInfo:
    """A 400 from POST /prompt as one line naming the node and input."""
    if not isinstance(body, dict):
        return JobErrorInfo(type="validation", message="the instance refused the workflow")
    node_errors = body.get("node_errors") or {}
    raw_error = body.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    node_id, field = first_node_error(node_errors) if isinstance(node_errors, dict) else (None, None)
    message = format_node_errors(node_errors, workflow) if isinstance(node_errors, dict) else ""
    if not message:
        message = str(error.get("message") or "the instance refused the workflow")
        details = error.get("details")
        if details:
            message += f" ({details})"
            match = _NODE_ID_IN_DETAILS.search(str(details))
            if match and node_id is None:
                node_id = match.group(1)
    node_type = workflow.get(node_id, {}).get("class_type") if node_id else None
    return JobErrorInfo(type="validation", message=message, node_id=node_id, node_type=node_type, field=field)


def decode_image(item: InputImage) -> bytes:
    """The bytes of an input image; base64 with an optional ``data:…;base64,`` prefix."""
    if not _IMAGE_NAME.match(item.name) or ".." in item.name:
        raise WorkflowError(
            f"images: invalid file name {item.name!r}; use a plain name such as input.png", field="images"
        )
    data = item.image
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise WorkflowError(f"images: {item.name} is not valid base64", field="images") from None


def describe(exc: BaseException) -> str:
    """A short reason for a failed call to an instance."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return "connection refused" if refused else f"cannot connect ({exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# ---------------------------------------------------------------- results store
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

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES

    def to_response(self) -> JobResponse:
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

    def finished(self, job: Job) -> None:
        self._finished[job.id] = self._clock()
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

    def __len__(self) -> int:
        return len(self._jobs)

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self._jobs.values()))


# ---------------------------------------------------------------- metrics
class _InflightCollector(Collector):
    """comfyui_instance_jobs_in_flight{gpu,instance}, read from the manager on scrape."""

    def __init__(self, manager: JobManager) -> None:
        self._manager = manager

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
        counts = self._manager.inflight()
        names = {v.index: v.name for v in self._manager.directory.snapshot()}
        for index in sorted(set(names) | set(counts)):
            family.add_metric([str(index), names.get(index, f"comfyui_gpu{index}")], counts.get(index, 0))
        yield family


# ---------------------------------------------------------------- the manager
class _Down(Exception):  # noqa: N818 - an outcome, not an error to show
    """The instance went away; ``started`` says whether it had begun our prompt."""

    def __init__(self, reason: str, started: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.started = started


class _Rejected(Exception):  # noqa: N818
    def __init__(self, info: JobErrorInfo) -> None:
        super().__init__(info.message)
        self.info = info


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
        self.poll_interval = poll_interval
        self.check_interval = check_interval
        self._clock = clock
        self._wall = wall
        self.store = ResultStore(settings.job_results_max, settings.job_results_ttl, clock)
        self._inflight: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._pruner: asyncio.Task[None] | None = None
        # GPU index -> "upstream" | "fork", learned from each instance's /ws greeting. A known
        # upstream instance is posted to without waiting for its greeting (one round trip less);
        # a fork's client_id message seen later switches it back (and /history covers the job).
        self._dialect: dict[int, str] = {}
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
        registry.register(_InflightCollector(self))

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the HTTP session and the results pruner (call inside the serving event loop)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=60, connect=5),
            )
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

    # ------------------------------------------------------------ submission
    def prepare(self, request: JobRequest) -> Job:
        """Validate and patch the workflow; nothing is sent yet.

        Raises:
            WorkflowError: naming the node and field at fault.
        """
        try:
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
        except WorkflowError:
            self.jobs_total.labels("invalid").inc()
            raise
        timeout = request.timeout or self.settings.job_timeout
        now = self._clock()
        return Job(
            id=uuid.uuid4().hex,
            workflow=workflow,
            images=images,
            return_mode=request.return_,
            gpu=request.gpu,
            timeout=timeout,
            created_at=self._wall(),
            created_mono=now,
            deadline=now + timeout,
        )

    async def submit(self, request: JobRequest) -> Job:
        """Validate, route and start following a job; returns at once (await ``job.done``).

        Raises:
            WorkflowError: the workflow or an override is invalid (HTTP 400).
            RouteError: no instance can take it (HTTP 400 for an unknown gpu, else 503).
            JobError: the manager is not started.
        """
        if self._session is None:
            raise JobError("the job manager is not started; call start() inside the event loop first")
        job = self.prepare(request)
        view = self._route(job, exclude=())
        self.store.add(job)
        task = asyncio.create_task(self._run(job, view), name=f"job-{job.id}")
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
                self.jobs_total.labels("invalid" if exc.status == 400 else "rejected").inc()
            raise
        # Reserve now, in the same event-loop step as the decision, so a burst spreads out.
        self._inflight[view.index] = self._inflight.get(view.index, 0) + 1
        job.instance = view
        job.attempts += 1
        return view

    def _release(self, view: InstanceView) -> None:
        self._inflight[view.index] = max(0, self._inflight.get(view.index, 0) - 1)

    # ------------------------------------------------------------ following a job
    async def _run(self, job: Job, view: InstanceView) -> None:
        current: InstanceView | None = view
        try:
            try:
                await self._attempt(job, view)
            except _Down as down:
                if down.started:
                    raise
                # Not started there: resubmit once to another instance.
                self._release(view)
                current = None
                try:
                    current = self._route(job, exclude=(view.index,), count_refusal=False)
                except RouteError as exc:
                    raise _Down(f"{down.reason}; no other instance to resubmit to ({exc})", started=False) from None
                log.warning("job %s: %s before it started; resubmitted to GPU %d", job.id, down.reason, current.index)
                job.prompt_id = None
                job.progress = None
                job.status = "pending"
                await self._attempt(job, current)
        except _Down as down:
            self._fail(job, "instance", down.reason)
        except _Rejected as rejected:
            self._finish(job, "error", rejected.info)
        except asyncio.CancelledError:
            self._fail(job, "internal", "the job API shut down while the job was in flight")
            raise
        except _HTTP_ERRORS as exc:
            name = job.instance.name if job.instance else "the instance"
            self._fail(job, "internal", f"talking to {name}: {type(exc).__name__}: {exc}")
        finally:
            if current is not None:
                self._release(current)
            if not job.final:
                self._fail(job, "internal", "the job ended without a result")

    async def _attempt(self, job: Job, view: InstanceView) -> None:
        """Send the job to one instance and follow it to a final state.

        Raises:
            _Down: the instance went away (``started`` False: safe to resubmit).
            _Rejected: the instance refused the workflow.
        """
        session = self._session
        assert session is not None
        client_id = uuid.uuid4().hex
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            try:
                async with asyncio.timeout(min(SUBMIT_TIMEOUT, max(0.0, job.deadline - self._clock()))):
                    with contextlib.suppress(*_HTTP_ERRORS):
                        # Connect before queueing so no event of our prompt can be missed.
                        ws = await session.ws_connect(
                            f"{view.base_url}/ws",
                            params={"clientId": client_id},
                            timeout=aiohttp.ClientWSTimeout(ws_close=5),
                        )
                    if ws is not None and self._dialect.get(view.index) != "upstream":
                        # The fork ignores ?clientId= and names its own id: post with that one.
                        own = client_id
                        client_id, dialect = await self._greeting(ws, client_id)
                        if dialect:
                            self._dialect[view.index] = dialect
                        if client_id != own:
                            log.debug("job %s: %s assigned client id %s", job.id, view.name, client_id)
                    await self._upload_images(job, view)
                    job.prompt_id = await self._post_prompt(job, view, client_id)
                    job.progress = NodeProgress(total=len(job.workflow))
            except TimeoutError:
                if self._clock() < job.deadline:
                    raise _Down(
                        f"{view.name} (GPU {view.index}) did not take the prompt within {SUBMIT_TIMEOUT:g} s",
                        started=False,
                    ) from None
                reason = f"{view.name} did not accept job {job.id} within its {job.timeout:g} s deadline"
                self.directory.report_hung(view.index, reason)
                self._finish(job, "timeout", JobErrorInfo(type="timeout", message=reason))
                return
            job.status = "queued"
            event = await self._follow(job, view, ws)
        finally:
            if ws is not None:
                await ws.close()
        if event.kind == "done":
            await self._collect(job, view)
        elif event.kind == "timeout":
            await self._on_timeout(job, view)
        else:
            self._finish(job, "error", event.error)

    @staticmethod
    async def _greeting(ws: aiohttp.ClientWebSocketResponse, client_id: str) -> tuple[str, str]:
        """The id the server delivers our events to, and its dialect ("" when unknown).

        Upstream sends ``status`` with our own ``sid``; the fork sends ``client_id`` with its
        own id first, then ``status``.
        """
        with contextlib.suppress(*_HTTP_ERRORS):
            async with asyncio.timeout(GREETING_TIMEOUT):
                while True:
                    msg = await ws.receive()
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        if msg.type in _WS_CLOSED:
                            break
                        continue
                    message = json.loads(msg.data)
                    data = message.get("data") if isinstance(message, dict) else None
                    if not isinstance(data, dict):
                        continue
                    if message.get("type") == "client_id" and isinstance(data.get("client_id"), str):
                        return str(data["client_id"]), "fork"  # its status follows: not needed
                    if message.get("type") == "status":
                        sid = data.get("sid")
                        if isinstance(sid, str) and sid and sid != client_id:
                            return sid, "fork"
                        return client_id, "upstream"
        # No greeting in time (or the socket closed): keep what we have; /history polling covers it.
        return client_id, ""

    async def _upload_images(self, job: Job, view: InstanceView) -> None:
        session = self._session
        assert session is not None
        for name, data in job.images:
            form = aiohttp.FormData()
            form.add_field("image", data, filename=name, content_type="application/octet-stream")
            form.add_field("overwrite", "true")
            form.add_field("type", "input")
            try:
                async with session.post(f"{view.base_url}/upload/image", data=form) as resp:
                    if resp.status != 200:
                        text = (await resp.text())[:200]
                        raise _Rejected(
                            JobErrorInfo(
                                type="validation",
                                field="images",
                                message=f"{view.name} refused input image {name}: HTTP {resp.status} {text}",
                            )
                        )
            except _HTTP_ERRORS as exc:
                raise _Down(
                    f"{view.name} (GPU {view.index}) unreachable while uploading {name}: {describe(exc)}",
                    started=False,
                ) from None

    async def _post_prompt(self, job: Job, view: InstanceView, client_id: str) -> str:
        session = self._session
        assert session is not None
        payload = {"prompt": job.workflow, "client_id": client_id}
        try:
            async with session.post(f"{view.base_url}/prompt", json=payload) as resp:
                text = await resp.text()
                status = resp.status
        except _HTTP_ERRORS as exc:
            raise _Down(f"{view.name} (GPU {view.index}) unreachable: {describe(exc)}", started=False) from None
        try:
            body = json.loads(text) if text else None
        except ValueError:
            body = None
        if status == 400:
            raise _Rejected(prompt_rejection(body, job.workflow))
        if status != 200 or not isinstance(body, dict) or not body.get("prompt_id"):
            raise _Down(f"{view.name} (GPU {view.index}) answered POST /prompt with HTTP {status}", started=False)
        node_errors = body.get("node_errors")
        if node_errors:
            raise _Rejected(prompt_rejection(body, job.workflow))
        return str(body["prompt_id"])

    def _gone(self, view: InstanceView) -> str | None:
        for v in self.directory.snapshot():
            if v.index == view.index:
                return None if v.state not in GONE_STATES else f"{view.name} (GPU {view.index}) is {v.state.value}"
        return f"{view.name} (GPU {view.index}) is no longer in the directory"

    def _mark_started(self, job: Job) -> None:
        if job.started_mono is None:
            job.started_mono = self._clock()
            job.status = "running"

    async def _follow(self, job: Job, view: InstanceView, ws: aiohttp.ClientWebSocketResponse | None) -> _Outcome:
        if ws is not None:
            outcome = await self._follow_ws(job, view, ws)
            if outcome is not None:
                return outcome
            log.info("job %s: lost the socket to %s; polling /history", job.id, view.name)
        return await self._follow_poll(job, view)

    async def _follow_ws(self, job: Job, view: InstanceView, ws: aiohttp.ClientWebSocketResponse) -> _Outcome | None:
        """Events until a final one; None when the socket dropped.

        The socket alone is never trusted: whenever ``poll_interval`` passes without an event
        of our prompt (events sent to another client id, a proxy that drops frames, a fork
        variant), ``/history`` is read, so a finished prompt is seen within about that time.
        """
        last_news = self._clock()
        while True:
            now = self._clock()
            remaining = job.deadline - now
            if remaining <= 0:
                return _Outcome("timeout")
            gone = self._gone(view)
            if gone:
                raise _Down(gone, started=job.started_mono is not None)
            poll_in = last_news + self.poll_interval - now
            if poll_in <= 0:
                last_news = self._clock()
                outcome = await self._peek_history(job, view)
                if outcome is not None:
                    return outcome
                continue
            try:
                msg = await ws.receive(timeout=min(remaining, self.check_interval, poll_in))
            except TimeoutError:
                continue
            if msg.type == aiohttp.WSMsgType.TEXT:
                try:
                    message = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(message, dict):
                    continue
                if message.get("type") == "client_id":
                    self._dialect[view.index] = "fork"  # it changed since we learned it: greet next time
                event = classify_event(message, job.prompt_id)
                if event.kind != "other":
                    last_news = self._clock()
                if job.progress is not None:
                    job.progress.update(message, job.prompt_id)
                if event.kind == "started":
                    self._mark_started(job)
                elif event.kind == "done":
                    job.ended_mono = self._clock()
                    return _Outcome("done")
                elif event.kind in {"error", "interrupted"}:
                    job.ended_mono = self._clock()
                    return _Outcome(event.kind, event.error)
            elif msg.type in _WS_CLOSED:
                return None

    async def _peek_history(self, job: Job, view: InstanceView) -> _Outcome | None:
        """One /history read while following the socket: the outcome when the prompt is done."""
        try:
            limit = min(POLL_CALL_TIMEOUT, max(0.1, job.deadline - self._clock()))
            entry = await self._history(view, job.prompt_id or "", limit)
        except _HTTP_ERRORS as exc:
            log.debug("job %s: /history of %s failed: %s", job.id, view.name, exc)
            return None
        return None if entry is None else self._ended(job, entry)

    def _ended(self, job: Job, entry: Mapping[str, Any]) -> _Outcome:
        """The outcome of a prompt that is in /history (it has ended)."""
        job.ended_mono = self._clock()
        if job.started_mono is None:
            job.execution_time = history_times(entry)
        event = history_outcome(entry)
        if event.kind in {"error", "interrupted"}:
            return _Outcome(event.kind, event.error)
        return _Outcome("done")

    async def _follow_poll(self, job: Job, view: InstanceView) -> _Outcome:
        """Poll /history (and /queue to learn whether it started) until final."""
        missing = 0
        while True:
            if job.deadline - self._clock() <= 0:
                return _Outcome("timeout")
            gone = self._gone(view)
            if gone:
                raise _Down(gone, started=job.started_mono is not None)
            try:
                limit = min(POLL_CALL_TIMEOUT, job.deadline - self._clock())
                entry = await self._history(view, job.prompt_id or "", limit)
                if entry is not None:
                    return self._ended(job, entry)
                where = await self._queue_position(view, job.prompt_id or "", limit)
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:
                started = job.started_mono is not None
                when = "while running the job" if started else "before the job started"
                reason = f"{view.name} (GPU {view.index}) went away {when}: {describe(exc)}"
                raise _Down(reason, started) from None
            except _HTTP_ERRORS as exc:
                log.debug("job %s: poll of %s failed: %s", job.id, view.name, exc)
                where = "unknown"
            if where == "running":
                self._mark_started(job)
            if where == "missing":
                missing += 1
                if missing >= 2:
                    # Neither queued, running nor in history: the instance restarted and lost it.
                    raise _Down(
                        f"{view.name} (GPU {view.index}) lost prompt {job.prompt_id} (restarted?)",
                        started=job.started_mono is not None,
                    )
            else:
                missing = 0
            await asyncio.sleep(min(self.poll_interval, max(0.0, job.deadline - self._clock())))

    async def _history(self, view: InstanceView, prompt_id: str, limit: float = 60.0) -> dict[str, Any] | None:
        session = self._session
        assert session is not None
        timeout = aiohttp.ClientTimeout(total=max(0.1, limit))
        async with session.get(f"{view.base_url}/history/{prompt_id}", timeout=timeout) as resp:
            if resp.status != 200:
                raise ValueError(f"GET /history answered HTTP {resp.status}")
            body = await resp.json(content_type=None)
        entry = body.get(prompt_id) if isinstance(body, dict) else None
        return entry if isinstance(entry, dict) else None

    async def _queue_position(self, view: InstanceView, prompt_id: str, limit: float = 60.0) -> str:
        session = self._session
        assert session is not None
        timeout = aiohttp.ClientTimeout(total=max(0.1, limit))
        async with session.get(f"{view.base_url}/queue", timeout=timeout) as resp:
            body = await resp.json(content_type=None)
        for key, where in (("queue_running", "running"), ("queue_pending", "pending")):
            for item in body.get(key, []) if isinstance(body, dict) else []:
                if isinstance(item, list) and len(item) > 1 and item[1] == prompt_id:
                    return where
        return "missing"

    async def _collect(self, job: Job, view: InstanceView) -> None:
        """Outputs from /history (retried briefly: ComfyUI stores it just after the last event)."""
        entry = None
        for delay in (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.8):
            if delay:
                await asyncio.sleep(delay)
            try:
                entry = await self._history(view, job.prompt_id or "")
            except _HTTP_ERRORS as exc:
                raise _Down(
                    f"{view.name} (GPU {view.index}) went away before its outputs were read: {describe(exc)}",
                    started=True,
                ) from None
            if entry is not None:
                break
        if entry is None:
            self._fail(job, "internal", f"{view.name} finished prompt {job.prompt_id} but has no history for it")
            return
        event = history_outcome(entry)
        if event.kind in {"error", "interrupted"}:
            self._finish(job, "error", event.error)
            return
        if job.execution_time is None and job.started_mono is not None and job.ended_mono is not None:
            job.execution_time = job.ended_mono - job.started_mono
        if job.execution_time is None:
            job.execution_time = history_times(entry)
        outputs = history_outputs(entry)
        if job.return_mode == "base64":
            outputs = list(await asyncio.gather(*(self._fetch_data(view, f) for f in outputs)))
        job.outputs = outputs
        self._finish(job, "success", None)

    async def _fetch_data(self, view: InstanceView, item: OutputFile) -> OutputFile:
        session = self._session
        assert session is not None
        params = {"filename": item.filename, "subfolder": item.subfolder, "type": item.type}
        try:
            async with session.get(f"{view.base_url}/view", params=params) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                data = await resp.read()
        except _HTTP_ERRORS as exc:
            raise _Down(
                f"{view.name} (GPU {view.index}) failed to serve output {item.filename}: {describe(exc)}",
                started=True,
            ) from None
        return item.model_copy(update={"data": base64.b64encode(data).decode()})

    async def _on_timeout(self, job: Job, view: InstanceView) -> None:
        session = self._session
        assert session is not None
        started = job.started_mono is not None
        stop_timeout = aiohttp.ClientTimeout(total=STOP_CALL_TIMEOUT)
        try:
            if started:
                # A stuck execution is a hung instance: interrupt it and tell the monitor.
                async with session.post(
                    f"{view.base_url}/interrupt", json={"prompt_id": job.prompt_id}, timeout=stop_timeout
                ) as resp:
                    await resp.read()
            else:
                async with session.post(
                    f"{view.base_url}/queue", json={"delete": [job.prompt_id]}, timeout=stop_timeout
                ) as resp:
                    await resp.read()
        except _HTTP_ERRORS as exc:
            log.warning("job %s: could not stop prompt %s on %s: %s", job.id, job.prompt_id, view.name, describe(exc))
        where = "while executing; interrupted" if started else "while still queued; removed from the queue"
        reason = f"job {job.id} (prompt {job.prompt_id}) ran past its {job.timeout:g} s deadline {where}"
        if started:
            self.directory.report_hung(view.index, reason)
        self._finish(job, "timeout", JobErrorInfo(type="timeout", message=f"{reason} on {view.name}"))

    # ------------------------------------------------------------ outcomes
    def _fail(self, job: Job, kind: ErrorType, message: str) -> None:
        self._finish(job, "error", JobErrorInfo(type=kind, message=message))

    def _finish(self, job: Job, status: Literal["success", "error", "timeout"], error: JobErrorInfo | None) -> None:
        if job.final:
            return
        now = self._clock()
        if job.execution_time is None and job.started_mono is not None:
            job.execution_time = (job.ended_mono or now) - job.started_mono
        job.status = status
        job.error = error
        if status == "success" and job.progress is not None:
            job.progress.finish()
        job.images = []  # inputs are not needed any more; the store keeps results only
        job.workflow = {}
        job.finished_mono = now
        job.finished_at = self._wall()
        metric_status = "invalid" if error is not None and error.type == "validation" else status
        self.jobs_total.labels(metric_status).inc()
        if job.started_mono is not None:
            self.queue_wait.observe(max(0.0, job.started_mono - job.created_mono))
        if job.execution_time is not None:
            self.duration.observe(job.execution_time)
        self.store.finished(job)
        job.done.set()
        where = f" on GPU {job.instance.index}" if job.instance else ""
        log.info("job %s%s: %s%s", job.id, where, status, f" ({error.message})" if error else "")


_WS_CLOSED = frozenset(
    {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR}
)


@dataclasses.dataclass(frozen=True)
class _Outcome:
    kind: Literal["done", "error", "interrupted", "timeout"]
    error: JobErrorInfo | None = None


# ---------------------------------------------------------------- HTTP
class _ApiError(Exception):  # noqa: N818 - carries an HTTP answer
    def __init__(self, status: int, body: ErrorResponse, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(body.message)
        self.status = status
        self.body = body
        self.headers = dict(headers or {})


def _error_json(status: int, body: ErrorResponse, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=dict(headers or {}))


def _too_large(limit: int) -> JSONResponse:
    message = f"request body is larger than MAX_REQUEST_BYTES ({limit} bytes)"
    return _error_json(413, ErrorResponse(error="too_large", message=message))


def validation_message(errors: Sequence[Mapping[str, Any]]) -> tuple[str, str | None, str | None]:
    """One line from pydantic/FastAPI errors, plus the node id and field when the path has them."""
    parts: list[str] = []
    node_id = field = None
    for err in list(errors)[:3]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"the body is not valid JSON ({ctx.get('error', 'decode error')})")
            continue
        path = ".".join(loc) or "body"
        parts.append(f"{path}: {err.get('msg', 'invalid')}")
        if loc and loc[0] == "workflow" and len(loc) > 1 and node_id is None:
            node_id, field = loc[1], ".".join(loc[2:]) or None
        elif loc and field is None:
            field = path
    return "; ".join(parts), node_id, field


def _replay(body: bytes) -> Callable[[], Coroutine[Any, Any, dict[str, Any]]]:
    """An ASGI ``receive`` that hands the already-read body to the route's own parser."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


class _JobsRoute(APIRoute):
    """Accepts JSON whatever the Content-Type (``curl -d @workflow.json``), checks the token
    before reading a mutating request, and answers every error with an ErrorResponse."""

    orchestrator_token = ""
    max_request_bytes = 64 * 1024 * 1024

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()
        token = self.orchestrator_token
        max_bytes = self.max_request_bytes

        async def handler(request: Request) -> Response:
            if request.method in {"POST", "PUT", "PATCH", "DELETE"}:
                if not bearer_ok(token, request.headers.get("authorization")):
                    return _error_json(
                        401,
                        ErrorResponse(
                            error="unauthorized",
                            message="missing or wrong bearer token: send Authorization: Bearer $ORCHESTRATOR_TOKEN",
                        ),
                        {"WWW-Authenticate": "Bearer"},
                    )
                declared = request.headers.get("content-length", "").strip()
                if declared.isdigit() and int(declared) > max_bytes:
                    return _too_large(max_bytes)
                chunks: list[bytes] = []
                received = 0
                async for chunk in request.stream():  # counted too: a chunked body declares no length
                    received += len(chunk)
                    if received > max_bytes:
                        return _too_large(max_bytes)
                    chunks.append(chunk)
                raw = b"".join(chunks)
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    return _error_json(
                        400, ErrorResponse(error="validation", message=f"body is not UTF-8 JSON (byte {exc.start})")
                    )
                scope = dict(request.scope)
                ctype = request.headers.get("content-type", "")
                if not ctype or ctype.startswith(("application/x-www-form-urlencoded", "text/plain")):
                    scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                    scope["headers"].append((b"content-type", b"application/json"))
                request = Request(scope, _replay(raw))
            try:
                return await original(request)
            except RequestValidationError as exc:
                message, node_id, field = validation_message(exc.errors())
                return _error_json(
                    400, ErrorResponse(error="validation", message=message, node_id=node_id, field=field)
                )
            except _ApiError as exc:
                return _error_json(exc.status, exc.body, exc.headers)

        return handler


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid workflow, override or gpu (names node and field)"},
    401: {"model": ErrorResponse, "description": "ORCHESTRATOR_TOKEN is set and the bearer token is wrong"},
    413: {"model": ErrorResponse, "description": "The body is larger than MAX_REQUEST_BYTES"},
    503: {
        "model": ErrorResponse,
        "description": "No READY instance, or all have MAX_QUEUE_DEPTH jobs (Retry-After)",
    },
}


def jobs_router(manager: JobManager) -> APIRouter:
    """``POST /jobs`` and ``GET /jobs/{id}`` over ``manager``; mount it on the monitor's app."""

    class _Route(_JobsRoute):
        orchestrator_token = manager.settings.orchestrator_token
        max_request_bytes = manager.settings.max_request_bytes

    router = APIRouter(route_class=_Route, tags=["jobs"])
    retry_after = str(max(1, math.ceil(manager.settings.probe_interval)))

    @router.post(
        "/jobs",
        response_model=JobResponse,
        responses={202: {"model": JobResponse, "description": "Accepted (wait=false)"}, **_ERRORS},
        summary="Run a workflow on the least-busy READY instance",
    )
    async def post_job(body: JobRequest, response: Response) -> JobResponse | JSONResponse:
        try:
            job = await manager.submit(body)
        except WorkflowError as exc:
            return _error_json(
                400, ErrorResponse(error="validation", message=str(exc), node_id=exc.node_id, field=exc.field)
            )
        except RouteError as exc:
            headers = {"Retry-After": retry_after} if exc.status == 503 else {}
            return _error_json(exc.status, ErrorResponse(error=exc.reason, message=str(exc)), headers)
        if not body.wait:
            response.status_code = 202
            response.headers["Location"] = f"/jobs/{job.id}"
            return job.to_response()
        await manager.wait(job)
        answer = job.to_response()
        # The caller gets the file data now; the stored result keeps the names only.
        job.outputs = [o.model_copy(update={"data": None}) if o.data else o for o in job.outputs]
        if job.error is not None and job.error.type == "validation":
            return _error_json(
                400,
                ErrorResponse(
                    error="validation",
                    message=job.error.message,
                    node_id=job.error.node_id,
                    field=job.error.field,
                    job_id=job.id,
                ),
            )
        return answer

    @router.get(
        "/jobs/{job_id}",
        response_model=JobResponse,
        responses={
            400: {"model": ErrorResponse, "description": "Invalid query (wait must be 0-3600 seconds)"},
            404: {"model": ErrorResponse, "description": "Unknown or expired job"},
        },
        summary="A job's state and result",
    )
    async def get_job(
        job_id: str,
        wait: float = Query(default=0, ge=0, le=3600, description="Seconds to wait for the job to finish"),
    ) -> JobResponse:
        job = manager.get(job_id)
        if job is None:
            raise _ApiError(
                404,
                ErrorResponse(
                    error="not_found",
                    message=f"no job {job_id} (unknown, or older than JOB_RESULTS_TTL / beyond JOB_RESULTS_MAX)",
                    job_id=job_id,
                ),
            )
        if wait:
            await manager.wait(job, wait)
        return job.to_response()

    return router
