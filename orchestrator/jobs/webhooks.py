"""Signed job callbacks: each status change of a job that has ``webhook: {url, secret?}`` is
POSTed to that URL, at least once, in order per job.

::

    watch ─► watcher (every 0.1 s, at once on job.done) ─► outbox ─► sender ─► POST, retried
             queued, running (+progress at most every       (a newer progress event replaces
             WEBHOOK_PROGRESS_INTERVAL), success/error/      one still waiting; statuses and
             timeout (never skipped)                         the final event never are)

A status passed between two looks (a prompt queued and started within 0.1 s) is still sent,
before the next one, from what the job records (a prompt id: it was queued; a start time: it
ran). Each POST carries ``Idempotency-Key: <job id>:<sequence>`` (the same on every retry),
``X-Orchestrator-Event``, ``X-Orchestrator-Timestamp`` (unix seconds, new per attempt) and, with
a secret, ``X-Orchestrator-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">``. 2xx is
delivered; 408, 429, 5xx, timeouts and connection errors are retried with exponential backoff up
to WEBHOOK_RETRIES / WEBHOOK_MAX_SECONDS; any other status (redirects included) is a permanent
failure. Failures are counted and logged once per job, naming the URL's origin only. Once an
event of a job is given up, its later non-final events are dropped (counted as failed) so that
the final event, which is always tried, is not kept waiting behind them.

With a job journal, ``<id>.webhook.json`` (0600) beside the job's record keeps the URL, secret
and last sequence, so a restarted monitor resumes the job's events (re-sending an undelivered
one under its own key) and still delivers the final event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import tenacity
from prometheus_client import CollectorRegistry, Counter

from orchestrator.core.settings import REDACTED, Settings
from orchestrator.jobs.schemas import FINAL_STATUSES, WebhookIn
from orchestrator.jobs.store import Job, ResultStore
from orchestrator.machine.fs import atomic_write, read_json

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.1  # how often a job's status and progress are looked at
POST_TIMEOUT = 10.0  # seconds for one POST (connect + answer)
OUTCOMES = ("delivered", "retried", "failed")
_STEPS = ("queued", "running")  # the non-final statuses that are sent, in their order
_SUFFIX = ".webhook.json"


@dataclasses.dataclass(frozen=True)
class Target:
    url: str
    secret: str | None

    @classmethod
    def of(cls, webhook: WebhookIn) -> Target:
        return cls(webhook.url, webhook.secret.get_secret_value() if webhook.secret else None)

    @property
    def origin(self) -> str:
        """``scheme://host[:port]``: what logs name (a path or query may carry a token)."""
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"

    def redact(self, text: str) -> str:
        text = text.replace(self.url, self.origin)
        return text.replace(self.secret, REDACTED) if self.secret else text


@dataclasses.dataclass(frozen=True)
class Event:
    name: str  # queued | running | success | error | timeout
    job: dict[str, Any]  # the JobResponse (file data left out)

    @property
    def final(self) -> bool:
        return self.name in FINAL_STATUSES


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 keyed by ``secret`` over ``<timestamp>.<body>``."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def snapshot(job: Job, name: str) -> Event:
    """The event ``name`` with the job as GET /jobs/{id} shows it (status ``name``, no file data)."""
    response = job.to_response()
    outputs = [o.model_copy(update={"data": None}) for o in response.outputs]
    update: dict[str, Any] = {"outputs": outputs}
    if name != response.status:
        update["status"] = name
    return Event(name, response.model_copy(update=update).model_dump(mode="json"))


def missed(job: Job, seen: str | None) -> list[str]:
    """The statuses to send now, in order, after ``seen`` was the last one sent."""
    status = job.status
    if status == seen or status == "pending":
        return []
    passed = {"queued": job.prompt_id is not None, "running": job.started_mono is not None}
    start = _STEPS.index(seen) + 1 if seen in _STEPS else 0
    end = _STEPS.index(status) if status in _STEPS else len(_STEPS)
    return [step for step in _STEPS[start:end] if passed[step]] + [status]


class _Retry(Exception):
    pass


class _Permanent(Exception):
    pass


class Outbox:
    """Events waiting to be sent; a newer progress event replaces one still waiting."""

    def __init__(self) -> None:
        self.events: collections.deque[Event] = collections.deque()
        self.ready = asyncio.Event()

    def put(self, event: Event, *, progress: bool = False) -> None:
        if progress and self.events and self.events[-1].name == "running":
            self.events[-1] = event
        else:
            self.events.append(event)
        self.ready.set()

    async def get(self) -> Event:
        while not self.events:
            self.ready.clear()
            await self.ready.wait()
        return self.events.popleft()


@dataclasses.dataclass
class _Resume:
    sequence: int = 0  # the last sequence number given out
    seen: str | None = None  # the last status handed to the sender


class Webhooks:
    """The webhook deliverers of one job manager.

    Args:
        settings: WEBHOOK_RETRIES, WEBHOOK_MAX_SECONDS, WEBHOOK_PROGRESS_INTERVAL are read here.
        registry: where ``comfyui_webhook_deliveries_total{outcome}`` is registered.
        directory: the job journal's folder (None: nothing kept across restarts).
        backoff: the first retry's wait in seconds (doubling, at most 60 s, plus jitter).
    """

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        directory: Path | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        backoff: float = 1.0,
    ) -> None:
        self.retries = settings.webhook_retries
        self.max_seconds = settings.webhook_max_seconds
        self.progress_interval = settings.webhook_progress_interval
        self.files = StateFiles(directory)
        self.backoff = backoff
        self._clock = clock
        self._wall = wall
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._complained: set[str] = set()
        self.deliveries = Counter(
            "comfyui_webhook_deliveries",
            "Job webhook POSTs: events delivered, attempts retried, events given up",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.deliveries.labels(outcome)

    # ------------------------------------------------------------ lifecycle
    async def start(self, store: ResultStore) -> None:
        """Open the HTTP session; resume the events of the journal's jobs that are still kept."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT))
            for job, target, resume in self.files.resume(store):
                self._spawn(job, target, resume)

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None

    def watch(self, job: Job, webhook: WebhookIn | None) -> None:
        """Send the job's status changes to ``webhook`` (if any) from now until its final event."""
        if webhook is None:
            return
        target = Target.of(webhook)
        self.files.save(job.id, target, 0, None, delivered=True)
        self._spawn(job, target, _Resume())

    def _spawn(self, job: Job, target: Target, resume: _Resume) -> None:
        task = asyncio.create_task(self._run(job, target, resume), name=f"webhook-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ one job
    async def _run(self, job: Job, target: Target, resume: _Resume) -> None:
        outbox = Outbox()
        watcher = asyncio.create_task(self._watch(job, outbox, resume.seen))
        try:
            sequence, gave_up = resume.sequence, False
            while True:
                event = await outbox.get()
                if gave_up and not event.final:  # the receiver is failing: keep the way clear for the end
                    self.deliveries.labels("failed").inc()
                    continue
                sequence += 1
                self.files.save(job.id, target, sequence, event.name, delivered=False)
                delivered = await self._deliver(job.id, target, event, sequence)
                if event.final:
                    self._complained.discard(job.id)
                    self.files.forget(job.id)
                    return
                if delivered:
                    self.files.save(job.id, target, sequence, event.name, delivered=True)
                gave_up = not delivered
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, job: Job, outbox: Outbox, seen: str | None) -> None:
        progress: tuple[int, int] | None = None
        progress_at = float("-inf")
        while True:
            if job.status == "pending":
                seen = None  # resubmitted to another instance: its queued/running come again
            for name in missed(job, seen):
                outbox.put(snapshot(job, name))
                seen = name
                progress, progress_at = _progress(job), self._clock()
            if job.final:
                return
            now = self._clock()
            if seen == "running" and _progress(job) != progress and now - progress_at >= self.progress_interval:
                outbox.put(snapshot(job, "running"), progress=True)
                progress, progress_at = _progress(job), now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(job.done.wait(), WATCH_INTERVAL)

    async def _deliver(self, job_id: str, target: Target, event: Event, sequence: int) -> bool:
        """POST the event until delivered or given up; True when delivered."""
        body = json.dumps(
            {"id": job_id, "event": event.name, "sequence": sequence, "job": event.job}, separators=(",", ":")
        ).encode()
        key = f"{job_id}:{sequence}"
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(self.retries + 1) | tenacity.stop_after_delay(self.max_seconds),
            wait=tenacity.wait_exponential(multiplier=self.backoff, max=60) + tenacity.wait_random(0, self.backoff),
            retry=tenacity.retry_if_exception_type(_Retry),
            before_sleep=lambda state: self.deliveries.labels("retried").inc(),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post(target, event.name, key, body)
        except (_Retry, _Permanent) as exc:
            self.deliveries.labels("failed").inc()
            tries = retrying.statistics.get("attempt_number", 1)
            self._complain(job_id, f"webhook {event.name} event to {target.origin} not delivered "
                                   f"after {tries} attempt(s): {target.redact(str(exc))}")
            return False
        self.deliveries.labels("delivered").inc()
        return True

    async def _post(self, target: Target, name: str, key: str, body: bytes) -> None:
        if self._session is None:
            raise _Permanent("the webhook deliverer is closed")
        timestamp = str(int(self._wall()))
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": key,
            "X-Orchestrator-Event": name,
            "X-Orchestrator-Timestamp": timestamp,
        }
        if target.secret:
            headers["X-Orchestrator-Signature"] = sign(target.secret, timestamp, body)
        try:
            async with self._session.post(target.url, data=body, headers=headers, allow_redirects=False) as reply:
                status = reply.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from None
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status}")
        raise _Permanent(f"HTTP {status} (not retried)")

    def _complain(self, job_id: str, message: str) -> None:
        if job_id in self._complained:
            log.debug("job %s: %s", job_id, message)
            return
        self._complained.add(job_id)
        log.warning("job %s: %s", job_id, message)



class StateFiles:
    """``<id>.webhook.json`` (0600) beside each job's journal record: URL, secret, last sequence."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    def _path(self, job_id: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{job_id}{_SUFFIX}"

    def save(self, job_id: str, target: Target, sequence: int, event: str | None, *, delivered: bool) -> None:
        path = self._path(job_id)
        if path is None:
            return
        body = {"url": target.url, "secret": target.secret, "sequence": sequence, "event": event,
                "delivered": delivered}
        try:
            atomic_write(path, json.dumps(body), mode=0o600, durable=False)
        except OSError as exc:
            log.warning("job %s: could not keep its webhook state under %s: %s", job_id, self.directory, exc)

    def forget(self, job_id: str) -> None:
        path = self._path(job_id)
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def resume(self, store: ResultStore) -> list[tuple[Job, Target, _Resume]]:
        """The kept jobs' targets and where their events resume; the files of dropped jobs go."""
        resumed: list[tuple[Job, Target, _Resume]] = []
        if self.directory is None or not self.directory.is_dir():
            return resumed
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            job_id = path.name[: -len(_SUFFIX)]
            try:
                saved = read_json(path)
                target = Target(str(saved["url"]), saved.get("secret") or None)
                sequence, event, delivered = int(saved["sequence"]), saved.get("event"), bool(saved["delivered"])
            except (ValueError, TypeError, KeyError):
                log.warning("%s is damaged; its job's webhook events are not resumed", path)
                self.forget(job_id)
                continue
            job = store.get(job_id)
            if job is None:
                self.forget(job_id)
            elif not delivered and isinstance(event, str):  # send it again under the same key
                before = {"queued": None, "running": "queued"}.get(event, "running")
                resumed.append((job, target, _Resume(sequence - 1, before)))
            else:
                resumed.append((job, target, _Resume(sequence, event if isinstance(event, str) else None)))
        return resumed


def _progress(job: Job) -> tuple[int, int] | None:
    return None if job.progress is None else (job.progress.done, job.progress.total)
