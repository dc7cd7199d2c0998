"""``orchestrator runpod-worker``: a RunPod serverless handler over this machine's job API.

RunPod hands the handler ``{"id": ..., "input": {...}}``. The input is the fleet's serverless
format (``workflow`` plus ``overrides``, or the shorthand ``prompt``/``seed``/``width``/…,
optional base64 ``images``); the handler posts it to ``POST /jobs`` on the local monitor and
answers in the same shape the serverless workers did::

    {"status": "success", "images": [base64...], "filenames": [...],
     "execution_time_seconds": 12.5, "prompt_id": "..."}   (+ "urls": [...] with OUTPUT_UPLOAD)
    {"status": "error", "error_type": "validation|timeout|internal", "error": "...",
     "execution_time_seconds": 0.5}

Locally: ``orchestrator runpod-worker --test_input '{"input": {...}}'`` (the SDK's test mode); the
command itself lives in ``orchestrator.cli.jobs``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from types import ModuleType
from typing import Any

import requests

from orchestrator.core.errors import ConfigError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.machine.fs import read_json

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# Keys of the serverless input that map onto the job API, and their job API names.
INPUT_KEYS = {
    "workflow": "workflow",
    "overrides": "overrides",
    "prompt": "prompt",
    "prompt_node_id": "prompt_node_id",
    "seed": "seed",
    "seed_node_id": "seed_node_id",
    "width": "width",
    "height": "height",
    "size_node_id": "size_node_id",
    "images": "images",
    "timeout": "timeout",
    "gpu": "gpu",
    "return": "return",
}
CONNECT_WAIT = 120.0  # seconds to wait for the local job API to come up (cold start)
CONNECT_TIMEOUT = 5.0  # seconds to open a connection to the job API


class InputError(ValueError):
    """The RunPod input is not in the serverless format."""


# ---------------------------------------------------------------- mapping (pure)
def to_job_request(inp: Any) -> dict[str, Any]:
    """The job API body for a serverless input (always ``wait: true``; base64 images by default).

    Raises:
        InputError: not an object, no workflow, or keys the format does not have.
    """
    if not isinstance(inp, dict):
        raise InputError("input: expected an object with a workflow (ComfyUI API format)")
    unknown = sorted(set(inp) - set(INPUT_KEYS))
    if unknown:
        raise InputError(f"input: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(INPUT_KEYS)}")
    if "workflow" not in inp:
        raise InputError("input.workflow: missing; send the workflow in ComfyUI API format")
    body = {INPUT_KEYS[k]: v for k, v in inp.items() if v is not None}
    body.setdefault("return", "base64")
    body["wait"] = True
    return body


def _error(kind: str, message: str, elapsed: float) -> dict[str, Any]:
    return {
        "status": "error",
        "error_type": kind,
        "error": message,
        "execution_time_seconds": round(elapsed, 3),
    }


def to_output(status_code: int, body: Any, elapsed: float) -> dict[str, Any]:
    """The serverless output shape for a job API answer."""
    if not isinstance(body, dict):
        return _error("internal", f"the job API answered HTTP {status_code} without a JSON body", elapsed)
    if status_code == 400 or (status_code == 200 and (body.get("error") or {}).get("type") == "validation"):
        message = body.get("message") or (body.get("error") or {}).get("message") or "invalid input"
        return _error("validation", str(message), elapsed)
    if status_code != 200:
        message = body.get("message") or f"HTTP {status_code}"
        return _error("internal", f"job API: {message}", elapsed)
    status = body.get("status")
    error = body.get("error") or {}
    if status == "timeout":
        return _error("timeout", str(error.get("message") or "the job ran past its deadline"), elapsed)
    if status != "success":
        return _error("internal", str(error.get("message") or f"job ended with status {status}"), elapsed)
    outputs = [o for o in body.get("outputs") or [] if isinstance(o, dict)]
    saved = [o for o in outputs if o.get("type") == "output"] or outputs
    instance = body.get("instance") or {}
    exec_time = body.get("execution_time_seconds")
    answer = {
        "status": "success",
        "images": [o["data"] for o in saved if o.get("data")],
        "filenames": [o["filename"] for o in saved],
        "execution_time_seconds": round(exec_time if isinstance(exec_time, int | float) else elapsed, 3),
        "prompt_id": body.get("prompt_id"),
        "job_id": body.get("id"),
        "gpu": instance.get("gpu"),
    }
    if any(o.get("url") for o in saved):  # OUTPUT_UPLOAD: where the files went, as the seed's worker answers
        answer["urls"] = [o.get("url") for o in saved]
    return answer


def job_api_url(settings: Settings) -> str:
    """Where this machine's monitor serves the job API."""
    host = settings.orchestrator_listen
    if host in {"0.0.0.0", "::", "[::]", ""}:  # noqa: S104 - a wildcard listen is reached on loopback
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.orchestrator_port}"


def instance_count(settings: Settings) -> int:
    """Instances in the applied plan (how many jobs this worker can run at once); 1 if unknown."""
    plan = read_json(Layout(settings.root).plan_file, {})
    instances = plan.get("instances") if isinstance(plan, dict) else None
    return max(1, len(instances)) if isinstance(instances, list) else 1


class ReadyConcurrency:
    """The SDK's ``concurrency_modifier``: as many jobs at once as the machine has READY instances.

    Reads ``ready_instances`` from the monitor's ``GET /scaling`` at most every ``ttl`` seconds
    (the SDK calls this on its event loop before each fetch, so the call is short and cached).
    Until the monitor first answers, and whenever it does not, the last value holds; the first is
    the planned instance count. Never below 1 (the SDK reads 0 as an unbounded queue).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        base_url: str | None = None,
        session: requests.Session | None = None,
        ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = (base_url or job_api_url(settings)).rstrip("/") + "/scaling"
        self.session = session or requests.Session()
        self.session.trust_env = False  # the local monitor: never through a proxy
        self.ttl = ttl
        self.clock = clock
        self.value = instance_count(settings)
        self._at: float | None = None

    def __call__(self, current: int) -> int:
        now = self.clock()
        if self._at is None or now - self._at >= self.ttl:
            self._at = now
            try:
                ready = self.session.get(self.url, timeout=(1.0, 1.0)).json()["ready_instances"]
            except (requests.RequestException, ValueError, KeyError, TypeError):
                return self.value
            if isinstance(ready, int) and not isinstance(ready, bool):
                self.value = max(1, ready)
        return self.value


# ---------------------------------------------------------------- the handler
def make_handler(
    settings: Settings,
    *,
    base_url: str | None = None,
    session: requests.Session | None = None,
    connect_wait: float = CONNECT_WAIT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Handler:
    """The RunPod handler: ``await handler({"input": {...}})`` → the serverless output shape.

    Each job's ``POST /jobs`` runs in a worker thread (``requests`` is synchronous), so the SDK
    can run as many jobs at once as the machine has instances. ``session``: for tests (a mock
    adapter); by default each job opens its own.
    """
    url = (base_url or job_api_url(settings)).rstrip("/") + "/jobs"
    token = settings.orchestrator_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def post(http: requests.Session, body: dict[str, Any], deadline: float, limit: float) -> requests.Response:
        """POST /jobs; wait for a monitor still starting, retry 503s until the deadline."""
        started = clock()
        while True:
            try:
                resp = http.post(url, json=body, headers=headers, timeout=(CONNECT_TIMEOUT, limit + 30))
            except requests.Timeout:
                raise
            except requests.ConnectionError:
                if clock() - started >= min(connect_wait, deadline - started):
                    raise
                sleep(1.0)
                continue
            if resp.status_code != 503 or clock() >= deadline:
                return resp
            sleep(min(_retry_after(resp.headers.get("retry-after")), max(0.0, deadline - clock())))
            if clock() >= deadline:
                return resp

    def call(body: dict[str, Any], deadline: float, limit: float) -> requests.Response:
        if session is not None:
            return post(session, body, deadline, limit)
        with requests.Session() as http:
            return post(http, body, deadline, limit)

    async def handler(job: dict[str, Any]) -> dict[str, Any]:
        started = clock()
        try:
            body = to_job_request(job.get("input") if isinstance(job, Mapping) else None)
        except InputError as exc:
            return _error("validation", str(exc), clock() - started)
        timeout = body.get("timeout")
        limit = float(timeout) if isinstance(timeout, int | float) and timeout > 0 else settings.job_timeout
        try:
            resp = await asyncio.to_thread(call, body, started + limit, limit)
        except requests.Timeout:
            return _error("timeout", f"no answer from the job API within {limit:g} s", clock() - started)
        except requests.RequestException as exc:
            return _error("internal", f"the job API at {url} is unreachable: {exc}", clock() - started)
        if resp.status_code == 503:
            return _error("timeout", f"no instance became free within {limit:g} s", clock() - started)
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        return to_output(resp.status_code, answer, clock() - started)

    return handler


def _retry_after(value: str | None) -> float:
    try:
        return min(30.0, max(0.5, float(value or 1)))
    except ValueError:
        return 1.0


def import_runpod() -> ModuleType:
    """The RunPod SDK (an optional dependency).

    Raises:
        ConfigError: it is not installed, naming the extra to install.
    """
    try:
        import runpod  # noqa: PLC0415 - optional dependency, imported only for this command
    except ImportError:
        raise ConfigError(
            "the runpod package is not installed: pip install 'comfy-orchestrator[runpod]' (or pip install runpod)"
        ) from None
    module: ModuleType = runpod
    return module
