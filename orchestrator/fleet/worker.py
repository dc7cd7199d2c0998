"""``orchestrator worker``: consume the fleet's Redis job stream on this machine.

::

    loop:   free = READY instances - jobs in flight   (capacity.free_slots; 0: take nothing)
            reclaim (XAUTOCLAIM, idle > lease) ─┐  first the jobs of machines that died,
            or read new ones (XREADGROUP)  ─────┴► per job: delivery count > JOB_MAX_ATTEMPTS
                                                   → dead letter; a result exists → ack only;
                                                   else POST /jobs on this machine (a thread)
    renew:  every lease/3, XCLAIM JUSTID each job in flight that we still own (queue.RENEW)
    beat:   every ttl/3, read GET /instances, write the machine's heartbeat hash (with a TTL)

A job whose worker died stays pending; once idle past JOB_LEASE_SECONDS any worker with a free
slot claims it. The result is written once per job id (SET NX) in the same script that
acknowledges it, so a redelivered job that finished is never run again, and two attempts that
both finish (a lease lost to a stall) leave one result.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import redis
import requests

from orchestrator.core.layout import Layout
from orchestrator.fleet import capacity as cap
from orchestrator.fleet import queue
from orchestrator.fleet.outcome import Outcome, dead_result, job_body, run_on_machine

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    machine_id: str
    api_url: str  # this machine's monitor, e.g. http://127.0.0.1:9090
    token: str = ""
    lease: float = 30.0
    max_attempts: int = 3
    result_ttl: float = 3600.0
    heartbeat_ttl: float = 15.0
    job_timeout: float = 600.0
    gpus: int = 1  # instances in the plan (reported while the monitor does not answer)
    root: str = ""

    @property
    def consumer(self) -> str:
        """This process's consumer name: a restarted worker does not renew its predecessor's leases."""
        return f"{self.machine_id}:{os.getpid()}"


class QueueWorker:
    """Takes jobs from the stream while this machine has free slots; see the module doc."""

    def __init__(self, client: redis.Redis, config: WorkerConfig, *, threads: int = 32) -> None:
        self.client = client
        self.config = config
        self.headers = {"Authorization": f"Bearer {config.token}"} if config.token else {}
        self._inflight: dict[str, str] = {}  # stream entry id -> job id
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="job")
        self.capacity = cap.Capacity(config.gpus, 0, False)
        self._next_reclaim = 0.0
        self.started = time.time()

    # ------------------------------------------------------------ helpers
    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # the local monitor: never through a proxy
            self._local.session = session
        return session

    def inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def free(self) -> int:
        return cap.free_slots(self.capacity, self.inflight())

    def refresh(self) -> None:
        """Re-read this machine's capacity from its monitor."""
        self.capacity = cap.read_capacity(self._session(), self.config.api_url, self.headers, self.config.gpus)

    def beat(self) -> None:
        """Refresh the capacity and write this machine's heartbeat."""
        self.refresh()
        c = self.config
        fields: dict[str, str | int | float] = {
            "machine_id": c.machine_id,
            "gpus": self.capacity.gpus,
            "ready_instances": self.capacity.ready,
            "free_slots": self.free(),
            "jobs_running": self.inflight(),
            "monitor": "up" if self.capacity.monitor_up else "down",
            **(cap.versions(Layout(Path(c.root))) if c.root else {}),
            "worker_pid": os.getpid(),
            "updated_at": time.time(),
        }
        cap.heartbeat(self.client, c.machine_id, fields, c.heartbeat_ttl)

    # ------------------------------------------------------------ taking jobs
    def poll(self, block_ms: int = 500) -> int:
        """One turn of the loop: take as many jobs as there are free slots. Returns jobs started."""
        free = self.free()
        if free <= 0:
            return 0
        entries: list[tuple[str, dict[str, str], int]] = []
        now = time.monotonic()
        if now >= self._next_reclaim:
            self._next_reclaim = now + min(1.0, self.config.lease / 4)
            entries = self.reclaim(free)
        if not entries:
            got: Any = self.client.xreadgroup(
                queue.GROUP, self.config.consumer, {queue.STREAM: ">"}, count=free, block=block_ms
            )
            entries = [(msg_id, fields, 1) for _stream, messages in got or [] for msg_id, fields in messages]
        for msg_id, fields, delivered in entries:
            self.start(msg_id, fields, delivered)
        return len(entries)

    def reclaim(self, count: int) -> list[tuple[str, dict[str, str], int]]:
        """Claim entries whose lease lapsed (their worker died or gave them up), with their delivery count."""
        lease_ms = int(self.config.lease * 1000)
        answer: Any = self.client.xautoclaim(
            queue.STREAM, queue.GROUP, self.config.consumer, lease_ms, start_id="0-0", count=count
        )
        claimed = []
        for msg_id, fields in answer[1]:
            if not fields:
                continue
            pending: Any = self.client.xpending_range(queue.STREAM, queue.GROUP, msg_id, msg_id, 1)
            delivered = int(pending[0]["times_delivered"]) if pending else 1
            log.info("reclaimed job %s (delivery %d)", fields.get("id"), delivered)
            claimed.append((msg_id, fields, delivered))
        return claimed

    def start(self, msg_id: str, fields: Mapping[str, str], delivered: int) -> None:
        """Dead-letter, skip (already finished) or run one delivered entry."""
        job_id = fields.get("id") or msg_id
        if self.client.exists(queue.result_key(job_id)):
            queue.finish(self.client, msg_id, job_id, "", 1, completed=False)  # ack only: SET NX keeps the result
            log.info("job %s already has a result: acknowledged without running", job_id)
            return
        if delivered > self.config.max_attempts:
            self.dead_letter(msg_id, job_id, fields, delivered)
            return
        self.client.set(
            queue.error_key(job_id),
            f"machine {self.config.machine_id} stopped before finishing attempt {delivered} (its lease lapsed)",
            ex=max(1, int(self.config.result_ttl)),
        )
        with self._lock:
            self._inflight[msg_id] = job_id
        self._pool.submit(self._run, msg_id, job_id, fields.get("body", ""), delivered)

    def _run(self, msg_id: str, job_id: str, raw: str, delivered: int) -> None:
        try:
            outcome = self._attempt(job_id, raw, delivered)
            if outcome.final and outcome.result is not None:
                queue.finish(
                    self.client, msg_id, job_id, json.dumps(outcome.result), int(self.config.result_ttl), completed=True
                )
            else:
                log.warning("job %s attempt %d failed, left for another delivery: %s", job_id, delivered, outcome.error)
                self.client.set(queue.error_key(job_id), outcome.error, ex=max(1, int(self.config.result_ttl)))
        except redis.RedisError as exc:  # the lease lapses and another delivery finishes it
            log.warning("job %s: the Redis queue failed while finishing it: %s", job_id, type(exc).__name__)
        except Exception:  # one job must not end the worker: log it and let the lease lapse
            log.exception("job %s: unexpected failure", job_id)
        finally:
            with self._lock:
                self._inflight.pop(msg_id, None)
            self._wake.set()

    def _attempt(self, job_id: str, raw: str, delivered: int) -> Outcome:
        try:
            body = job_body(raw)
        except ValueError as exc:
            result = dead_result(job_id, self.config.machine_id, delivered + 1, f"invalid queued body: {exc}")
            return Outcome(True, result, str(exc))
        return run_on_machine(
            self._session(), f"{self.config.api_url}/jobs", self.headers, body, job_id=job_id,
            machine=self.config.machine_id, attempt=delivered, default_timeout=self.config.job_timeout,
        )

    def dead_letter(self, msg_id: str, job_id: str, fields: Mapping[str, str], delivered: int) -> None:
        """Move a job out of attempts to the dead-letter stream with its last error; write its result."""
        error = str(self.client.get(queue.error_key(job_id)) or "no error recorded")
        self.client.xadd(
            queue.DEAD_STREAM,
            {"id": job_id, "body": fields.get("body", ""), "error": error, "attempts": str(delivered - 1),
             "machine": self.config.machine_id},
        )
        result = dead_result(job_id, self.config.machine_id, delivered, error)
        queue.finish(self.client, msg_id, job_id, json.dumps(result), int(self.config.result_ttl), completed=False)
        log.warning("job %s moved to the dead-letter stream after %d attempt(s): %s", job_id, delivered - 1, error)

    # ------------------------------------------------------------ leases and the loop
    def renew_all(self) -> None:
        with self._lock:
            owned = dict(self._inflight)
        for msg_id, job_id in owned.items():
            if not queue.renew(self.client, msg_id, self.config.consumer):
                log.warning("job %s: lease lost to another machine (its result is written once)", job_id)

    def run(self, stop: threading.Event, drain: float = 25.0) -> None:
        """Serve until ``stop`` is set, then wait up to ``drain`` seconds for jobs in flight."""
        _until_redis_answers(self, stop)
        renew_every, beat_every = max(0.2, self.config.lease / 3), min(1.0, self.config.heartbeat_ttl / 3)
        helpers = [
            threading.Thread(target=_every, args=(renew_every, self.renew_all, stop), daemon=True),
            threading.Thread(target=_every, args=(beat_every, self.beat, stop), daemon=True),
        ]
        for t in helpers:
            t.start()
        try:
            while not stop.is_set():
                try:
                    if self.free() <= 0:
                        self._wake.wait(0.2)
                        self._wake.clear()
                        continue
                    self.poll()
                except redis.RedisError as exc:
                    log.warning("the Redis job queue failed: %s; retrying", type(exc).__name__)
                    stop.wait(1.0)
        finally:
            deadline = time.monotonic() + drain
            while self.inflight() and time.monotonic() < deadline:
                self.renew_all()
                time.sleep(0.2)
            self._pool.shutdown(wait=False, cancel_futures=True)
            with contextlib.suppress(redis.RedisError):
                cap.forget(self.client, self.config.machine_id)


def _every(interval: float, action: Callable[[], None], stop: threading.Event) -> None:
    """Call ``action`` every ``interval`` seconds until ``stop``; a failure is logged, not fatal."""
    while not stop.wait(interval):
        try:
            action()
        except (redis.RedisError, OSError) as exc:
            log.warning("%s failed: %s", getattr(action, "__name__", "action"), type(exc).__name__)


def _until_redis_answers(worker: QueueWorker, stop: threading.Event) -> None:
    """Create the group and write the first heartbeat, retrying while Redis is down (at boot:
    exiting would put the program in BACKOFF and fail `up`'s watch stage)."""
    backoff = 1.0
    while not stop.is_set():
        try:
            queue.ensure_group(worker.client)
            worker.beat()
        except redis.RedisError as exc:
            log.warning("the Redis job queue does not answer (%s); retrying in %g s", type(exc).__name__, backoff)
            stop.wait(backoff)
            backoff = min(30.0, backoff * 2)
        else:
            return
