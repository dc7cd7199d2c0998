"""How many jobs this machine can take now, its heartbeat in Redis, and the fleet's view of them.

:func:`free_slots` is the one place the number is decided. It reads the monitor's
``GET /scaling`` (READY instances, as ``comfyui_machine_ready_instances``; none while the machine
drains) and the worker's own count of jobs in flight: the queue
worker is the machine's job source, and its own count is exact where the probe's queue figures
lag by up to PROBE_INTERVAL (a finished job would hold its slot until the next probe).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from typing import Any

import redis
import requests

from orchestrator.core.layout import Layout
from orchestrator.fleet.queue import DEAD_STREAM, GROUP, MACHINE_PREFIX, STREAM, machine_key
from orchestrator.machine.fs import read_json
from orchestrator.machine.generation import current_id

# Jobs handed to one READY instance at once. One: a second job would wait in that instance's
# queue while another machine of the fleet may be idle; the queue is where jobs wait.
SLOTS_PER_INSTANCE = 1


@dataclasses.dataclass(frozen=True)
class Capacity:
    """What the monitor reported: instances planned and READY (None: the monitor did not answer)."""

    gpus: int
    ready: int
    monitor_up: bool


def free_slots(capacity: Capacity, inflight: int, per_instance: int = SLOTS_PER_INSTANCE) -> int:
    """Jobs the worker may take now: READY instances × ``per_instance`` minus its jobs in flight."""
    return max(0, capacity.ready * per_instance - inflight) if capacity.monitor_up else 0


def capacity_from_scaling(load: Mapping[str, Any]) -> Capacity:
    """A :class:`Capacity` from ``GET /scaling`` (the monitor's one count of READY instances, the
    same as ``comfyui_machine_ready_instances``); a draining machine has none to offer."""
    ready = 0 if load.get("draining") else int(load.get("ready_instances") or 0)
    return Capacity(gpus=int(load.get("instances") or 0), ready=ready, monitor_up=True)


def read_capacity(session: requests.Session, api_url: str, headers: Mapping[str, str], gpus: int) -> Capacity:
    """This machine's capacity from its monitor; nothing READY when the monitor does not answer."""
    try:
        resp = session.get(f"{api_url}/scaling", headers=dict(headers), timeout=(2, 5))
        resp.raise_for_status()
        load = resp.json()
    except (requests.RequestException, ValueError):
        return Capacity(gpus=gpus, ready=0, monitor_up=False)
    if not isinstance(load, dict):
        return Capacity(gpus=gpus, ready=0, monitor_up=False)
    return capacity_from_scaling(load)


def plan_hash(layout: Layout) -> str:
    """A short hash of the applied plan (plan.json): machines on different generations differ."""
    try:
        data = json.loads(layout.plan_file.read_text())
    except (OSError, ValueError):
        return ""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def versions(layout: Layout) -> dict[str, str]:
    """What a machine runs, for comparing machines: its plan, its instances' generation (the
    fingerprint of everything they see) and its lock hash (``orchestrator.lock`` or what ``up``
    installed); "" where not known."""
    status = read_json(layout.status_file, {})
    lock = status.get("lock") if isinstance(status, dict) else None
    return {
        "plan_hash": plan_hash(layout),
        "generation": current_id(layout) or "",
        "lock_hash": str(lock.get("hash") or "") if isinstance(lock, dict) else "",
    }


def heartbeat(
    client: redis.Redis, machine_id: str, fields: Mapping[str, str | int | float], ttl: float
) -> None:
    """Write this machine's hash and let it expire after ``ttl`` unless the next beat comes."""
    key = machine_key(machine_id)
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
    pipe.pexpire(key, max(1, int(ttl * 1000)))
    pipe.execute()


def forget(client: redis.Redis, machine_id: str) -> None:
    """Drop this machine's heartbeat (a clean stop)."""
    client.delete(machine_key(machine_id))


@dataclasses.dataclass(frozen=True)
class FleetStatus:
    """Every live machine's last heartbeat, and the queue's figures."""

    machines: tuple[dict[str, Any], ...]
    waiting: int  # entries not yet delivered to any worker
    leased: int  # delivered and not acknowledged
    dead: int  # entries in the dead-letter stream

    def to_dict(self) -> dict[str, Any]:
        return {
            "machines": list(self.machines),
            "jobs_waiting": self.waiting,
            "jobs_leased": self.leased,
            "jobs_dead": self.dead,
        }


_INTS = ("gpus", "ready_instances", "free_slots", "jobs_running", "worker_pid")


def fleet_status(client: redis.Redis, now: float | None = None) -> FleetStatus:
    """Read every machine's heartbeat (expired ones are gone) and the queue's counts."""
    now = time.time() if now is None else now
    machines = []
    for key in sorted(client.scan_iter(match=f"{MACHINE_PREFIX}*", count=500)):
        raw: dict[str, str] = client.hgetall(key)  # type: ignore[assignment]
        if not raw:
            continue  # expired between SCAN and HGETALL
        row: dict[str, Any] = dict(raw)
        for name in _INTS:
            if name in row:
                row[name] = int(row[name])
        if "updated_at" in row:
            row["age_seconds"] = round(max(0.0, now - float(row.pop("updated_at"))), 1)
        machines.append(row)
    waiting = leased = 0
    groups: list[dict[str, Any]] = client.xinfo_groups(STREAM) if client.exists(STREAM) else []
    for group in groups:
        if group.get("name") == GROUP:
            leased = int(group.get("pending") or 0)
            # Finished entries are deleted (queue.FINISH), so the stream holds waiting + leased.
            waiting = max(0, int(client.xlen(STREAM)) - leased)
    dead = int(client.xlen(DEAD_STREAM)) if client.exists(DEAD_STREAM) else 0
    return FleetStatus(tuple(machines), waiting, leased, dead)
