"""``POST /jobs`` and ``GET /jobs/{id}``: the job API's FastAPI router over a JobManager.

Errors use the one shape of ``core.http`` (``{"error": code, "message": ..., "node_id"?,
"field"?, "job_id"?}``); POST needs the bearer token when ORCHESTRATOR_TOKEN is set.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import JSONResponse

from orchestrator.core.auth import BearerAuth
from orchestrator.core.http import ApiError, documented, error_json, route_class
from orchestrator.core.routing import RouteError
from orchestrator.core.workflow import WorkflowError
from orchestrator.jobs.schemas import JobRequest, JobResponse
from orchestrator.jobs.tracker import JobManager

_POST_ERRORS = documented(
    {
        400: "Invalid workflow, override or gpu (names node and field)",
        401: "ORCHESTRATOR_TOKEN is set and the bearer token is wrong",
        413: "The body is larger than MAX_REQUEST_BYTES",
        503: "No READY instance, or all have MAX_QUEUE_DEPTH jobs (Retry-After)",
    }
)
_GET_ERRORS = documented({400: "Invalid query (wait must be 0-3600 seconds)", 404: "Unknown or expired job"})


def jobs_router(manager: JobManager) -> APIRouter:
    """``POST /jobs`` and ``GET /jobs/{id}`` over ``manager``; mount it on the monitor's app."""
    settings = manager.settings
    router = APIRouter(route_class=route_class(settings.max_request_bytes), tags=["jobs"])
    auth = BearerAuth(settings.orchestrator_token)
    retry_after = str(max(1, math.ceil(settings.probe_interval)))

    @router.post(
        "/jobs",
        response_model=JobResponse,
        responses={202: {"model": JobResponse, "description": "Accepted (wait=false)"}, **_POST_ERRORS},
        dependencies=[Depends(auth)],
        summary="Run a workflow on the least-busy READY instance",
    )
    async def post_job(body: JobRequest, response: Response) -> JobResponse | JSONResponse:
        try:
            job = await manager.submit(body)
        except WorkflowError as exc:
            return error_json(400, "validation", str(exc), node_id=exc.node_id, field=exc.field)
        except RouteError as exc:
            headers = {"Retry-After": retry_after} if exc.status == 503 else {}
            return error_json(exc.status, exc.reason, str(exc), headers=headers)
        if not body.wait:
            response.status_code = 202
            response.headers["Location"] = f"/jobs/{job.id}"
            return job.to_response()
        await manager.wait(job)
        answer = job.to_response()
        # The caller gets the file data now; the stored result keeps the names only.
        job.outputs = [o.model_copy(update={"data": None}) if o.data else o for o in job.outputs]
        error = job.error
        if error is not None and error.type == "validation":
            return error_json(
                400, "validation", error.message, node_id=error.node_id, field=error.field, job_id=job.id
            )
        return answer

    @router.get("/jobs/{job_id}", response_model=JobResponse, responses=_GET_ERRORS, summary="A job's state and result")
    async def get_job(
        job_id: str,
        wait: float = Query(default=0, ge=0, le=3600, description="Seconds to wait for the job to finish"),
    ) -> JobResponse:
        job = manager.get(job_id)
        if job is None:
            raise ApiError(
                404,
                "not_found",
                f"no job {job_id} (unknown, or older than JOB_RESULTS_TTL / beyond JOB_RESULTS_MAX)",
                job_id=job_id,
            )
        if wait:
            await manager.wait(job, wait)
        return job.to_response()

    return router
