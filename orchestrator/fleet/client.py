"""Submit a workflow to the fleet's queue and wait for its result (``orchestrator submit``)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis
from pydantic import ValidationError

from orchestrator.core.errors import ConfigError
from orchestrator.fleet import queue
from orchestrator.jobs.schemas import JobRequest


def check_body(body: Any) -> dict[str, Any]:
    """The job body, validated as ``POST /jobs`` would (before it is queued).

    Raises:
        ConfigError: one line naming the first invalid field.
    """
    try:
        JobRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ConfigError(f"invalid job: {where}: {first['msg']}") from None
    if not isinstance(body, dict):  # model_validate accepted it, so it is a mapping
        raise ConfigError("invalid job: expected a JSON object with a workflow")
    return dict(body)


def enqueue(client: redis.Redis, body: dict[str, Any], job_id: str | None = None) -> str:
    """Put a job on the stream; its id (a new one unless given: the same id is one result)."""
    job_id = job_id or uuid.uuid4().hex
    client.xadd(queue.STREAM, {"id": job_id, "body": json.dumps(body), "submitted_at": f"{time.time():.6f}"})
    return job_id


def result(client: redis.Redis, job_id: str) -> dict[str, Any] | None:
    """The job's terminal result, or None while it has none."""
    raw = client.get(queue.result_key(job_id))
    return json.loads(str(raw)) if raw else None


def wait_result(client: redis.Redis, job_id: str, timeout: float) -> dict[str, Any] | None:
    """Block until the job's result is written (or ``timeout`` seconds pass: None)."""
    deadline = time.monotonic() + timeout
    while True:
        found = result(client, job_id)
        if found is not None:
            return found
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # BLPOP wakes at once when the worker writes the result; short turns re-check the key.
        client.blpop([queue.done_key(job_id)], timeout=max(0.01, min(left, 5.0)))


def submit(
    client: redis.Redis, body: dict[str, Any], *, timeout: float = 600.0, job_id: str | None = None
) -> dict[str, Any] | None:
    """Enqueue ``body`` and wait for its result; None when none came within ``timeout``."""
    return wait_result(client, enqueue(client, check_body(body), job_id), timeout)
