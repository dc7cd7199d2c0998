"""One queued job run on this machine's job API, and what its answer means for the queue. Pure
but for the HTTP call.

A terminal answer (success, the workflow's own error, its timeout, a validation error) is the
job's result: it is written once and acknowledged. A failure of the machine (the monitor does not
answer, no instance is free, an instance went away mid-job, a 5xx) is not: the attempt's error is
kept, the lease lapses, and another machine (or this one, later) takes the job again, up to
JOB_MAX_ATTEMPTS deliveries.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from typing import Any

import requests

from orchestrator.jobs.schemas import FINAL_STATUSES

# Job API error types that are the machine's fault, not the workflow's: worth another machine.
RETRY_ERROR_TYPES = frozenset({"instance", "internal"})


@dataclasses.dataclass(frozen=True)
class Outcome:
    """``final``: ``result`` is the job's terminal result; otherwise ``error`` says why to retry."""

    final: bool
    result: dict[str, Any] | None
    error: str


def job_body(raw: str) -> dict[str, Any]:
    """The POST /jobs body of a queued job: always waits, files by name unless it asked for base64."""
    body = json.loads(raw)
    if not isinstance(body, dict):
        raise ValueError("the queued body is not a JSON object")  # noqa: TRY004 - one error kind for bad bodies
    body["wait"] = True
    return body


def classify(status_code: int, answer: Any) -> tuple[bool, str]:
    """(terminal, error message) for a job API answer."""
    if not isinstance(answer, dict):
        return False, f"the job API answered HTTP {status_code} without a JSON body"
    if status_code == 400:
        return True, str(answer.get("message") or "invalid job")
    if status_code != 200:
        return False, f"the job API answered HTTP {status_code}: {answer.get('message') or answer.get('error')}"
    status = answer.get("status")
    error = answer.get("error") or {}
    if status not in FINAL_STATUSES:
        return False, f"the job API answered status {status!r}"
    if status == "error" and error.get("type") in RETRY_ERROR_TYPES:
        return False, f"{error.get('type')} error: {error.get('message')}"
    return True, str(error.get("message") or "") if status != "success" else ""


def run_on_machine(
    session: requests.Session,
    url: str,
    headers: Mapping[str, str],
    body: dict[str, Any],
    *,
    job_id: str,
    machine: str,
    attempt: int,
    default_timeout: float,
) -> Outcome:
    """POST the job to this machine's job API and wait for its answer."""
    started = time.time()
    timeout = body.get("timeout")
    limit = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else default_timeout
    try:
        resp = session.post(url, json=body, headers=dict(headers), timeout=(5, limit + 30))
    except requests.RequestException as exc:
        return Outcome(False, None, f"the job API on {machine} is unreachable: {type(exc).__name__}")
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    final, message = classify(resp.status_code, answer)
    if not final:
        return Outcome(False, None, message)
    if resp.status_code == 400:
        detail = {k: v for k, v in answer.items() if k != "error"}
        answer = {"status": "error", "error": {"type": "validation", **detail}}
    result = {
        "id": job_id,
        "status": answer.get("status"),
        "machine": machine,
        "attempt": attempt,
        "started_at": started,
        "finished_at": time.time(),
        "job": answer,
        "error": answer.get("error") if answer.get("status") != "success" else None,
    }
    return Outcome(True, result, message)


def dead_result(job_id: str, machine: str, attempts: int, error: str) -> dict[str, Any]:
    """The terminal result of a job that ran out of attempts."""
    return {
        "id": job_id,
        "status": "failed",
        "machine": machine,
        "attempt": attempts,
        "started_at": None,
        "finished_at": time.time(),
        "job": None,
        "error": {"type": "dead_letter", "message": f"gave up after {attempts - 1} attempt(s): {error}"},
    }
