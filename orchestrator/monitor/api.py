"""The monitor's HTTP API (FastAPI): health, readiness, instances, GPUs, metrics, restarts.

``create_app`` builds the app around a :class:`ControlPlane` (the monitor, or a fake in tests)
and a metrics registry; other parts add their routers (the job API). Every handler answers from
cached state and never waits on an instance. Mutating endpoints need ``Authorization: Bearer``
when ``ORCHESTRATOR_TOKEN`` is set (``core.auth.BearerAuth``); ``monitor.preflight.check_listen``
refuses a non-loopback address without it. Every error answer has the one shape of ``core.http``:
``{"error": code, "message": ...}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from fastapi import APIRouter, Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator import __version__
from orchestrator.core.auth import BearerAuth
from orchestrator.core.http import ApiError, documented, http_error_handler, route_class
from orchestrator.core.instances import InstanceView
from orchestrator.core.readiness import GpuStatus, InstanceStatus, Liveness, Readiness
from orchestrator.core.scaling import MachineLoad, machine_load
from orchestrator.core.settings import Settings
from orchestrator.monitor.metrics import ExpositionCache, TextRenderer

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]
Probe = Callable[[], Awaitable[Response]]
Responses = dict[int | str, dict[str, Any]]
_UNKNOWN_GPU = {400: "gpu is not an integer", 404: "no instance on that GPU"}


class ControlPlane(Protocol):
    """What the API needs from the monitor."""

    def liveness(self) -> Liveness: ...

    def readiness(self) -> Readiness: ...

    def instance_statuses(self) -> list[InstanceStatus]: ...

    def instance_status(self, gpu: int) -> InstanceStatus:
        """Raises KeyError for a GPU this machine does not run."""
        ...

    def gpu_statuses(self) -> list[GpuStatus]: ...

    def request_restart(self, gpu: int, reason: str) -> InstanceStatus:
        """Raises KeyError for a GPU this machine does not run."""
        ...


# ---------------------------------------------------------------- response models
class InstanceModel(BaseModel):
    gpu: int = Field(description="GPU index")
    name: str = Field(description="supervisord program, comfyui_gpu{N}")
    port: int
    state: str = Field(description="STARTING, READY, SUSPECT, UNHEALTHY, RESTARTING, BACKOFF, FATAL or STOPPED")
    reason: str = Field(description="why the instance is in this state")
    since: float = Field(description="epoch seconds the state was entered")
    ready: bool
    up: bool = Field(description="supervisord reports the process RUNNING")
    process_state: str = Field(description="supervisord's process state")
    pid: int | None
    start_time: float | None = Field(description="epoch seconds the process started")
    uptime_seconds: float | None
    restarts: int = Field(description="new processes after the first one (crashes and restarts)")
    failed_custom_nodes: list[str]
    queue_pending: int | None
    queue_running: int | None
    queue_depth: int
    last_probe: float | None = Field(description="epoch seconds of the last probe")
    probe_duration_seconds: float | None
    device: str | None = Field(description="the device /system_stats reports")
    comfyui_version: str | None = Field(
        default=None, description="system.comfyui_version the running process reports (/system_stats)"
    )
    generation: str | None = Field(default=None, description="the generation its process started with")
    current: bool = Field(default=True, description="false while it runs an older generation than the last `up`")
    draining: bool = Field(default=False, description="taken out of job routing for a planned restart")


class InstancesResponse(BaseModel):
    instances: list[InstanceModel]
    node_import_failed: dict[str, str] = Field(
        default_factory=dict, description="Custom nodes that failed the import check before start: first error line"
    )


class InstanceBrief(BaseModel):
    gpu: int
    name: str
    state: str
    reason: str


class ReadyResponse(BaseModel):
    ready: bool
    ready_count: int
    required: int
    reason: str
    instances: list[InstanceBrief]


class HealthResponse(BaseModel):
    alive: bool
    supervisord: bool = Field(description="supervisord answered the last poll")
    last_poll_age_seconds: float | None
    reason: str
    version: str


class GpuModel(BaseModel):
    index: int
    uuid: str
    pci_bus_id: str
    name: str
    memory_total_bytes: int
    driver_version: str
    mock: bool
    sampled_at: float | None = Field(description="epoch seconds of the latest sample")
    failed: bool | None
    error: str | None
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None
    sm_clock_mhz: float | None
    memory_clock_mhz: float | None
    health: str = Field(default="unknown", description="ok, or failed (a critical Xid: no jobs are routed to it)")
    health_reason: str | None = Field(default=None, description="why the GPU failed")
    last_xid: int | None = Field(default=None, description="the last Xid NVML reported since the monitor started")
    xid_events: int = Field(default=0, description="Xid events since the monitor started")
    fault_events: bool = Field(default=False, description="the monitor listens for this GPU's Xid/ECC events")


class GpusResponse(BaseModel):
    gpus: list[GpuModel]


class ComfyCodeModel(BaseModel):
    url: str = Field(description="origin of $ROOT/ComfyUI, credentials removed")
    ref: str = Field(description="the branch checked out (the commit when detached)")
    commit: str = Field(description="HEAD of $ROOT/ComfyUI, read from the tree")
    wanted: str = Field(description="the branch or commit the last `up` was configured for")
    fallback: bool = Field(description="true when the tree is not what was configured")


class StatusResponse(BaseModel):
    ready: bool
    reason: str
    instances: list[InstanceModel]
    gpus: list[GpuModel]
    comfy: ComfyCodeModel | None = Field(
        default=None, description="The code checked out; each instance's comfyui_version is what it runs"
    )
    lock_hash: str | None = Field(
        default=None, description="Hash of the lock the last `up` installed (up --locked) or recorded"
    )
    node_import_failed: dict[str, str] = Field(
        default_factory=dict, description="Custom nodes that failed the import check before start: first error line"
    )


class ScalingResponse(BaseModel):
    jobs_waiting: int = Field(description="jobs accepted or queued, not executing yet")
    jobs_running: int = Field(description="jobs executing (at most one per instance)")
    free_slots: int = Field(description="jobs this machine would accept now (0 while draining)")
    ready_instances: int
    instances: int
    max_queue_depth: int
    draining: bool = Field(description="shutting down: new jobs are refused, running ones finish")


class RestartResponse(BaseModel):
    gpu: int
    name: str
    accepted: bool
    state: str


def _instance(s: InstanceStatus, redact: Callable[[str], str]) -> InstanceModel:
    return InstanceModel(
        gpu=s.gpu, name=s.name, port=s.port, state=s.state.value, reason=redact(s.reason), since=s.since,
        ready=s.ready, up=s.up, process_state=s.process_state, pid=s.pid, start_time=s.start_time,
        uptime_seconds=None if s.uptime is None else round(s.uptime, 3), restarts=s.restarts,
        failed_custom_nodes=list(s.failed_custom_nodes), queue_pending=s.queue_pending,
        queue_running=s.queue_running, queue_depth=s.queue_depth, last_probe=s.last_probe,
        probe_duration_seconds=s.probe_duration, device=s.device, comfyui_version=s.comfyui_version,
        generation=s.generation, current=s.current, draining=s.draining,
    )


def _gpu(st: GpuStatus) -> GpuModel:
    g, s = st.gpu, st.sample
    return GpuModel(
        index=g.index, uuid=g.uuid, pci_bus_id=g.pci_bus_id, name=g.name, memory_total_bytes=g.memory_total,
        driver_version=g.driver_version, mock=g.mock, sampled_at=st.sampled_at,
        failed=None if s is None else s.failed, error=(s.error or None) if s is not None else None,
        utilization_percent=s.utilization if s else None, memory_used_bytes=s.memory_used if s else None,
        memory_free_bytes=s.memory_free if s else None, temperature_celsius=s.temperature if s else None,
        power_watts=s.power if s else None, sm_clock_mhz=s.sm_clock if s else None,
        memory_clock_mhz=s.memory_clock if s else None,
        **_health(st),
    )


def _health(st: GpuStatus) -> dict[str, Any]:
    h = st.health
    if h is None:
        return {}
    return {"health": "failed" if h.failed else "ok", "health_reason": h.reason or None, "last_xid": h.last_xid,
            "xid_events": h.xid_events, "fault_events": h.listening}


def _ready(r: Readiness, redact: Callable[[str], str]) -> ReadyResponse:
    return ReadyResponse(
        ready=r.ready, ready_count=r.ready_count, required=r.required, reason=redact(r.reason),
        instances=[InstanceBrief(gpu=s.gpu, name=s.name, state=s.state.value, reason=redact(s.reason))
                   for s in r.instances],
    )


def _comfy_code(settings: Settings, redact: Callable[[str], str]) -> ComfyCodeModel | None:
    from orchestrator.core.layout import Layout
    from orchestrator.machine.fs import read_json
    from orchestrator.provision.repos.state import code_report

    layout = Layout(settings.root)
    if not layout.comfy_dir.is_dir():
        return None
    recorded = read_json(layout.status_file, {}) or {}
    code = code_report(layout.comfy_dir, recorded.get("comfy", {}) if isinstance(recorded, dict) else {})
    return ComfyCodeModel(
        url=redact(code["url"]), ref=code["ref"], commit=code["commit"], wanted=code["wanted"],
        fallback=code["fallback"],
    )


def _provisioned(settings: Settings, redact: Callable[[str], str]) -> dict[str, Any]:
    """The lock hash and the import-check failures that the last `up` recorded in status.json."""
    from orchestrator.core.layout import Layout
    from orchestrator.machine.fs import read_json

    recorded = read_json(Layout(settings.root).status_file, {}) or {}
    if not isinstance(recorded, dict):
        return {}
    lock, nodes = recorded.get("lock") or {}, recorded.get("nodes") or {}
    failed = nodes.get("import_failed") if isinstance(nodes, dict) else None
    return {
        "lock_hash": lock.get("hash") if isinstance(lock, dict) else None,
        "node_import_failed": {str(k): redact(str(v)) for k, v in (failed or {}).items()},
    }


# ---------------------------------------------------------------- the app
def create_app(
    control: ControlPlane,
    settings: Settings,
    registry: CollectorRegistry,
    *,
    routers: Sequence[APIRouter] = (),
    lifespan: Lifespan | None = None,
    scaling: Callable[[], MachineLoad] | None = None,
) -> FastAPI:
    """The monitor's FastAPI app. ``routers`` are mounted as they are (e.g. the job API).

    ``scaling``: the machine's load (the job manager's, with its in-flight jobs and drain flag);
    by default the instances' probed queues alone. While it says ``draining``, /readyz is 503.
    """
    app = FastAPI(
        title="ComfyUI orchestrator monitor",
        version=__version__,
        description="Health, readiness and control of the ComfyUI instances on this machine.",
        lifespan=lifespan,
    )
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    routes = APIRouter(route_class=route_class(settings.max_request_bytes))
    auth = BearerAuth(settings.orchestrator_token)
    redact = settings.redact
    renderer = TextRenderer()
    exposition = ExpositionCache(lambda: renderer.render(registry), settings.metrics_cache)

    async def health() -> JSONResponse:
        live = control.liveness()
        body = HealthResponse(
            alive=live.alive, supervisord=live.supervisord, reason=redact(live.reason), version=__version__,
            last_poll_age_seconds=None if live.last_cycle_age is None else round(live.last_cycle_age, 3),
        )
        return JSONResponse(body.model_dump(), status_code=200 if live.alive else 503)

    def load() -> MachineLoad:
        if scaling is not None:
            return scaling()
        views = [InstanceView(s.gpu, s.name, s.port, s.state, s.queue_pending or 0, s.queue_running or 0)
                 for s in control.instance_statuses()]
        return machine_load(views, {}, settings.max_queue_depth)

    async def ready() -> JSONResponse:
        r = control.readiness()
        if scaling is not None and scaling().draining:
            r = dataclasses.replace(r, ready=False, reason="draining: the machine is shutting down")
        return JSONResponse(_ready(r, redact).model_dump(), status_code=200 if r.ready else 503)

    not_alive: Responses = {503: {"model": HealthResponse, "description": "supervisord does not answer"}}
    not_ready: Responses = {503: {"model": ReadyResponse, "description": "too few instances are READY"}}
    for path, summary in (("/healthz", "The monitor is alive and supervisord answers"), ("/health", "Alias")):
        routes.add_api_route(
            path, health, methods=["GET"], summary=summary, response_model=HealthResponse, responses=not_alive
        )
    for path, summary in (("/readyz", "Enough instances are READY"), ("/ready", "Alias")):
        routes.add_api_route(
            path, ready, methods=["GET"], summary=summary, response_model=ReadyResponse, responses=not_ready
        )

    @routes.get("/instances", response_model=InstancesResponse, summary="Every instance: state, reason, queue")
    async def instances() -> InstancesResponse:
        return InstancesResponse(
            instances=[_instance(s, redact) for s in control.instance_statuses()],
            node_import_failed=_provisioned(settings, redact).get("node_import_failed", {}),
        )

    def unknown_gpu(exc: KeyError) -> ApiError:
        return ApiError(404, "not_found", str(exc.args[0]))

    @routes.get(
        "/instances/{gpu}", response_model=InstanceModel, responses=documented(_UNKNOWN_GPU), summary="One instance"
    )
    async def instance(gpu: int) -> InstanceModel:
        try:
            return _instance(control.instance_status(gpu), redact)
        except KeyError as exc:
            raise unknown_gpu(exc) from None

    @routes.post(
        "/instances/{gpu}/restart",
        response_model=RestartResponse,
        status_code=202,
        responses=documented({**_UNKNOWN_GPU, 401: "missing or wrong bearer token"}),
        dependencies=[Depends(auth)],
        summary="Restart an instance through supervisord (needs the token when one is set)",
    )
    async def restart(gpu: int) -> RestartResponse:
        try:
            s = control.request_restart(gpu, "restart requested over HTTP")
        except KeyError as exc:
            raise unknown_gpu(exc) from None
        return RestartResponse(gpu=s.gpu, name=s.name, accepted=True, state=s.state.value)

    @routes.get("/gpus", response_model=GpusResponse, summary="GPUs and their latest telemetry sample")
    async def gpus() -> GpusResponse:
        return GpusResponse(gpus=[_gpu(g) for g in control.gpu_statuses()])

    @routes.get("/status", response_model=StatusResponse, summary="Readiness, instances and GPUs in one answer")
    async def status() -> StatusResponse:
        r = control.readiness()
        return StatusResponse(
            ready=r.ready, reason=redact(r.reason),
            instances=[_instance(s, redact) for s in control.instance_statuses()],
            gpus=[_gpu(g) for g in control.gpu_statuses()],
            comfy=_comfy_code(settings, redact),
            **_provisioned(settings, redact),
        )

    @routes.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
        summary="Prometheus metrics",
    )
    async def metrics() -> Response:
        # Collectors read cached samples only, so this runs on the loop without blocking it;
        # concurrent scrapes share one rendering (METRICS_CACHE).
        return Response(exposition.get(), media_type=CONTENT_TYPE_LATEST)

    @routes.get("/scaling", response_model=ScalingResponse, summary="Autoscaling signals (KEDA metrics-api)")
    async def scaling_signals() -> ScalingResponse:
        return ScalingResponse(**load().to_dict())

    app.include_router(routes)
    for router in routers:
        app.include_router(router)
    # The probe handlers, for ProbeFastPath (the routes above stay declared: OpenAPI lists them).
    app.state.probes = {"/healthz": health, "/health": health, "/readyz": ready, "/ready": ready,
                        "/metrics": metrics}
    return app


class ProbeFastPath:
    """A plain ASGI layer in front of the app that answers ``GET`` of the probe paths itself.

    Health checks, load balancers and scrapers hit /healthz, /readyz and /metrics far more often
    than anything else; FastAPI's routing, dependency solving and middleware stack cost more than
    these handlers. Here an exact ``GET`` path runs the same handler the FastAPI route runs (same
    body, status and headers) and sends its response; every other request, and the lifespan,
    goes to the app unchanged.
    """

    def __init__(self, app: ASGIApp, probes: Mapping[str, Probe]) -> None:
        self.app = app
        self.probes = dict(probes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            probe = self.probes.get(scope["path"])
            if probe is not None:
                response = await probe()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def with_fast_probes(app: FastAPI) -> ProbeFastPath:
    """``app`` (from :func:`create_app`) behind a :class:`ProbeFastPath` for its probe routes."""
    return ProbeFastPath(app, app.state.probes)
