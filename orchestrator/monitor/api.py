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
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator import __version__
from orchestrator.core.auth import BearerAuth
from orchestrator.core.http import ApiError, documented, http_error_handler, route_class
from orchestrator.core.instances import InstanceView
from orchestrator.core.readiness import GpuStatus, InstanceStatus, Liveness, Readiness
from orchestrator.core.scaling import MachineLoad, machine_load
from orchestrator.core.settings import Settings
from orchestrator.monitor.answers import (
    GpusResponse,
    HealthResponse,
    InstanceModel,
    InstancesResponse,
    ReadyResponse,
    RestartResponse,
    ScalingResponse,
    StatusResponse,
    comfy_code_answer,
    gpu_answer,
    instance_answer,
    provisioned,
    ready_answer,
)
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
        return JSONResponse(ready_answer(r, redact).model_dump(), status_code=200 if r.ready else 503)

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
            instances=[instance_answer(s, redact) for s in control.instance_statuses()],
            node_import_failed=provisioned(settings, redact).get("node_import_failed", {}),
        )

    def unknown_gpu(exc: KeyError) -> ApiError:
        return ApiError(404, "not_found", str(exc.args[0]))

    @routes.get(
        "/instances/{gpu}", response_model=InstanceModel, responses=documented(_UNKNOWN_GPU), summary="One instance"
    )
    async def instance(gpu: int) -> InstanceModel:
        try:
            return instance_answer(control.instance_status(gpu), redact)
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
        return GpusResponse(gpus=[gpu_answer(g) for g in control.gpu_statuses()])

    @routes.get("/status", response_model=StatusResponse, summary="Readiness, instances and GPUs in one answer")
    async def status() -> StatusResponse:
        r = control.readiness()
        return StatusResponse(
            ready=r.ready, reason=redact(r.reason),
            instances=[instance_answer(s, redact) for s in control.instance_statuses()],
            gpus=[gpu_answer(g) for g in control.gpu_statuses()],
            comfy=comfy_code_answer(settings, redact),
            **provisioned(settings, redact),
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
