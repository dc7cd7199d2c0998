"""`worker` (the Redis queue consumer), `submit` (enqueue and wait) and `fleet status`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from orchestrator.cli.output import print_json, print_line, table
from orchestrator.core.errors import ConfigError, JobError
from orchestrator.core.settings import Settings

log = logging.getLogger(__name__)


def queue_url(settings: Settings, args: argparse.Namespace) -> str:
    """``--queue`` or JOB_QUEUE_URL (under supervisord: JOB_QUEUE_URL, from the 0600 env file)."""
    return str(getattr(args, "queue", None) or settings.job_queue_url)


def machine_id(settings: Settings) -> str:
    return settings.machine_id or socket.gethostname()


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Consume the fleet's job stream on this machine until SIGTERM/SIGINT."""
    from orchestrator.fleet.queue import connect
    from orchestrator.fleet.worker import QueueWorker, WorkerConfig
    from orchestrator.jobs.runpod import instance_count, job_api_url

    client = connect(queue_url(settings, args), ping=False)  # the worker waits for a Redis that is down
    config = WorkerConfig(
        machine_id=machine_id(settings), api_url=job_api_url(settings), token=settings.orchestrator_token,
        lease=settings.job_lease_seconds, max_attempts=settings.job_max_attempts,
        result_ttl=settings.job_results_ttl, heartbeat_ttl=settings.fleet_heartbeat_ttl,
        job_timeout=settings.job_timeout, gpus=instance_count(settings), root=str(settings.root),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("queue worker %s taking jobs for %s", config.consumer, config.api_url)
    QueueWorker(client, config).run(stop)
    return 0


def _read_body(source: str) -> dict[str, Any]:
    text = Path(source).read_text() if source != "-" else sys.stdin.read()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{source}: not JSON ({exc.args[0]})") from None
    if isinstance(data, dict) and "workflow" not in data and all(isinstance(v, dict) for v in data.values()):
        data = {"workflow": data}  # a bare API-format workflow
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object (a job body or a workflow in API format)")
    return data


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    """Enqueue a job (a POST /jobs body or a bare workflow) and print its result."""
    from orchestrator.fleet.client import check_body, enqueue, wait_result
    from orchestrator.fleet.queue import connect

    try:
        body = check_body(_read_body(args.file))
    except OSError as exc:
        raise ConfigError(f"{args.file}: cannot read it ({exc.strerror})") from None
    client = connect(queue_url(settings, args))
    job_id = enqueue(client, body)
    if args.no_wait:
        print_json({"id": job_id}) if args.json else print_line(job_id)
        return 0
    result = wait_result(client, job_id, args.timeout)
    if result is None:
        raise JobError(f"job {job_id}: no result within {args.timeout:g} s (it stays queued)")
    if args.json:
        print_json(result)
    else:
        error = result.get("error") or {}
        files = [o.get("filename") for o in (result.get("job") or {}).get("outputs") or []]
        where = f"machine={result.get('machine')}  attempt={result.get('attempt')}"
        print_line(f"{job_id}  {result.get('status')}  {where}")
        for line in [*files, *([error.get("message")] if error else [])]:
            print_line(f"  {line}")
    return 0 if result.get("status") == "success" else 1


def cmd_fleet_status(settings: Settings, args: argparse.Namespace) -> int:
    """Every live machine's heartbeat and the queue's counts."""
    from orchestrator.fleet.capacity import fleet_status
    from orchestrator.fleet.queue import connect

    status = fleet_status(connect(queue_url(settings, args)))
    if args.json:
        print_json(status.to_dict())
        return 0
    rows = [
        [m.get("machine_id", "?"), m.get("gpus", ""), m.get("ready_instances", ""), m.get("free_slots", ""),
         m.get("jobs_running", ""), m.get("monitor", ""), str(m.get("generation", ""))[:12],
         str(m.get("lock_hash", ""))[:12], f"{m.get('age_seconds', '')}s"]
        for m in status.machines
    ]
    header = ["MACHINE", "GPUS", "READY", "FREE", "RUNNING", "MONITOR", "GENERATION", "LOCK", "SEEN"]
    print_line(table(rows, header) if rows else "no live machine (no heartbeat within FLEET_HEARTBEAT_TTL)")
    print_line(f"jobs: {status.waiting} waiting, {status.leased} leased, {status.dead} dead-lettered")
    return 0
