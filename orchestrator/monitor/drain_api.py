"""The drain endpoints (bearer token when one is set): ``POST /instances/{gpu}/drain`` waits until
the instance holds no prompt (``?timeout=`` seconds, default DRAIN_TIMEOUT; then its prompts are
interrupted) and answers how it ended; ``DELETE /instances/{gpu}/drain`` routes jobs to it again.
The drained state shows in ``/instances`` (``draining``). See :mod:`orchestrator.monitor.drain`.
"""

from __future__ import annotations

from typing import Protocol

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from orchestrator.core.auth import BearerAuth
from orchestrator.core.http import ApiError, documented, route_class
from orchestrator.core.readiness import InstanceStatus
from orchestrator.core.settings import Settings
from orchestrator.monitor.drain import DrainResult


class Draining(Protocol):
    async def drain(self, gpu: int, timeout: float) -> DrainResult: ...

    def undrain(self, gpu: int) -> InstanceStatus: ...


class DrainResponse(BaseModel):
    gpu: int
    name: str
    drained: bool = Field(description="true when it emptied before the timeout")
    interrupted: int = Field(description="prompts cleared or interrupted at the timeout")
    waited: float = Field(description="seconds waited")


class UndrainResponse(BaseModel):
    gpu: int
    name: str
    state: str
    draining: bool


def drain_router(control: Draining, settings: Settings) -> APIRouter:
    routes = APIRouter(route_class=route_class(settings.max_request_bytes))
    auth = BearerAuth(settings.orchestrator_token)
    errors = documented({400: "gpu is not an integer", 404: "no instance on that GPU", 401: "missing or wrong token"})

    @routes.post(
        "/instances/{gpu}/drain", response_model=DrainResponse, responses=errors, dependencies=[Depends(auth)],
        summary="Stop routing jobs to an instance and wait until it is empty (planned restart)",
    )
    async def drain(gpu: int, timeout: float | None = Query(default=None, gt=0, le=86400)) -> DrainResponse:
        try:
            result = await control.drain(gpu, settings.drain_timeout if timeout is None else timeout)
        except KeyError as exc:
            raise ApiError(404, "not_found", str(exc.args[0])) from None
        return DrainResponse(**result.to_dict())

    @routes.delete(
        "/instances/{gpu}/drain", response_model=UndrainResponse, responses=errors, dependencies=[Depends(auth)],
        summary="Route jobs to a drained instance again",
    )
    async def undrain(gpu: int) -> UndrainResponse:
        try:
            s = control.undrain(gpu)
        except KeyError as exc:
            raise ApiError(404, "not_found", str(exc.args[0])) from None
        return UndrainResponse(gpu=s.gpu, name=s.name, state=s.state.value, draining=s.draining)

    return routes
