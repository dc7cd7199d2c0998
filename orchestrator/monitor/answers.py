"""The monitor's HTTP answers: the response models of ``monitor.api`` (they are the OpenAPI
schema) and how the monitor's values become them (secrets redacted on the way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from orchestrator.core.readiness import GpuStatus, InstanceStatus, Readiness
from orchestrator.core.settings import Settings


class InstanceModel(BaseModel):
    gpu: int = Field(description="GPU index")
    name: str = Field(description="supervisord program, comfyui_gpu{N}")
    port: int
    state: str = Field(description="STARTING, READY, SUSPECT, UNHEALTHY, RESTARTING, BACKOFF, FATAL or STOPPED")
    reason: str = Field(description="why the instance is in this state")
    since: float = Field(description="epoch seconds the state was entered")
    ready: bool
    up: bool = Field(description="supervisord reports the process RUNNING")
    process_state: str = Field(description="supervisord's process state")
    pid: int | None
    start_time: float | None = Field(description="epoch seconds the process started")
    uptime_seconds: float | None
    restarts: int = Field(description="new processes after the first one (crashes and restarts)")
    failed_custom_nodes: list[str]
    queue_pending: int | None
    queue_running: int | None
    queue_depth: int
    last_probe: float | None = Field(description="epoch seconds of the last probe")
    probe_duration_seconds: float | None
    device: str | None = Field(description="the device /system_stats reports")
    comfyui_version: str | None = Field(
        default=None, description="system.comfyui_version the running process reports (/system_stats)"
    )
    generation: str | None = Field(default=None, description="the generation its process started with")
    current: bool = Field(default=True, description="false while it runs an older generation than the last `up`")
    draining: bool = Field(default=False, description="taken out of job routing for a planned restart")


class InstancesResponse(BaseModel):
    instances: list[InstanceModel]
    node_import_failed: dict[str, str] = Field(
        default_factory=dict, description="Custom nodes that failed the import check before start: first error line"
    )


class InstanceBrief(BaseModel):
    gpu: int
    name: str
    state: str
    reason: str


class ReadyResponse(BaseModel):
    ready: bool
    ready_count: int
    required: int
    reason: str
    instances: list[InstanceBrief]


class HealthResponse(BaseModel):
    alive: bool
    supervisord: bool = Field(description="supervisord answered the last poll")
    last_poll_age_seconds: float | None
    reason: str
    version: str


class GpuModel(BaseModel):
    index: int
    uuid: str
    pci_bus_id: str
    name: str
    memory_total_bytes: int
    driver_version: str
    mock: bool
    sampled_at: float | None = Field(description="epoch seconds of the latest sample")
    failed: bool | None
    error: str | None
    utilization_percent: float | None
    memory_used_bytes: int | None
    memory_free_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None
    sm_clock_mhz: float | None
    memory_clock_mhz: float | None
    health: str = Field(default="unknown", description="ok, or failed (a critical Xid: no jobs are routed to it)")
    health_reason: str | None = Field(default=None, description="why the GPU failed")
    last_xid: int | None = Field(default=None, description="the last Xid NVML reported since the monitor started")
    xid_events: int = Field(default=0, description="Xid events since the monitor started")
    fault_events: bool = Field(default=False, description="the monitor listens for this GPU's Xid/ECC events")


class GpusResponse(BaseModel):
    gpus: list[GpuModel]


class ComfyCodeModel(BaseModel):
    url: str = Field(description="origin of $ROOT/ComfyUI, credentials removed")
    ref: str = Field(description="the branch checked out (the commit when detached)")
    commit: str = Field(description="HEAD of $ROOT/ComfyUI, read from the tree")
    wanted: str = Field(description="the branch or commit the last `up` was configured for")
    fallback: bool = Field(description="true when the tree is not what was configured")


class StatusResponse(BaseModel):
    ready: bool
    reason: str
    instances: list[InstanceModel]
    gpus: list[GpuModel]
    comfy: ComfyCodeModel | None = Field(
        default=None, description="The code checked out; each instance's comfyui_version is what it runs"
    )
    lock_hash: str | None = Field(
        default=None, description="Hash of the lock the last `up` installed (up --locked) or recorded"
    )
    node_import_failed: dict[str, str] = Field(
        default_factory=dict, description="Custom nodes that failed the import check before start: first error line"
    )


class ScalingResponse(BaseModel):
    jobs_waiting: int = Field(description="jobs accepted or queued, not executing yet")
    jobs_running: int = Field(description="jobs executing (at most one per instance)")
    free_slots: int = Field(description="jobs this machine would accept now (0 while draining)")
    ready_instances: int
    instances: int
    max_queue_depth: int
    draining: bool = Field(description="shutting down: new jobs are refused, running ones finish")


class RestartResponse(BaseModel):
    gpu: int
    name: str
    accepted: bool
    state: str


def instance_answer(s: InstanceStatus, redact: Callable[[str], str]) -> InstanceModel:
    return InstanceModel(
        gpu=s.gpu, name=s.name, port=s.port, state=s.state.value, reason=redact(s.reason), since=s.since,
        ready=s.ready, up=s.up, process_state=s.process_state, pid=s.pid, start_time=s.start_time,
        uptime_seconds=None if s.uptime is None else round(s.uptime, 3), restarts=s.restarts,
        failed_custom_nodes=list(s.failed_custom_nodes), queue_pending=s.queue_pending,
        queue_running=s.queue_running, queue_depth=s.queue_depth, last_probe=s.last_probe,
        probe_duration_seconds=s.probe_duration, device=s.device, comfyui_version=s.comfyui_version,
        generation=s.generation, current=s.current, draining=s.draining,
    )


def gpu_answer(st: GpuStatus) -> GpuModel:
    g, s = st.gpu, st.sample
    return GpuModel(
        index=g.index, uuid=g.uuid, pci_bus_id=g.pci_bus_id, name=g.name, memory_total_bytes=g.memory_total,
        driver_version=g.driver_version, mock=g.mock, sampled_at=st.sampled_at,
        failed=None if s is None else s.failed, error=(s.error or None) if s is not None else None,
        utilization_percent=s.utilization if s else None, memory_used_bytes=s.memory_used if s else None,
        memory_free_bytes=s.memory_free if s else None, temperature_celsius=s.temperature if s else None,
        power_watts=s.power if s else None, sm_clock_mhz=s.sm_clock if s else None,
        memory_clock_mhz=s.memory_clock if s else None,
        **gpu_health(st),
    )


def gpu_health(st: GpuStatus) -> dict[str, Any]:
    h = st.health
    if h is None:
        return {}
    return {"health": "failed" if h.failed else "ok", "health_reason": h.reason or None, "last_xid": h.last_xid,
            "xid_events": h.xid_events, "fault_events": h.listening}


def ready_answer(r: Readiness, redact: Callable[[str], str]) -> ReadyResponse:
    return ReadyResponse(
        ready=r.ready, ready_count=r.ready_count, required=r.required, reason=redact(r.reason),
        instances=[InstanceBrief(gpu=s.gpu, name=s.name, state=s.state.value, reason=redact(s.reason))
                   for s in r.instances],
    )


def comfy_code_answer(settings: Settings, redact: Callable[[str], str]) -> ComfyCodeModel | None:
    from orchestrator.core.layout import Layout
    from orchestrator.machine.fs import read_json
    from orchestrator.provision.repos.state import code_report

    layout = Layout(settings.root)
    if not layout.comfy_dir.is_dir():
        return None
    recorded = read_json(layout.status_file, {}) or {}
    code = code_report(layout.comfy_dir, recorded.get("comfy", {}) if isinstance(recorded, dict) else {})
    return ComfyCodeModel(
        url=redact(code["url"]), ref=code["ref"], commit=code["commit"], wanted=code["wanted"],
        fallback=code["fallback"],
    )


def provisioned(settings: Settings, redact: Callable[[str], str]) -> dict[str, Any]:
    """The lock hash and the import-check failures that the last `up` recorded in status.json."""
    from orchestrator.core.layout import Layout
    from orchestrator.machine.fs import read_json

    recorded = read_json(Layout(settings.root).status_file, {}) or {}
    if not isinstance(recorded, dict):
        return {}
    lock, nodes = recorded.get("lock") or {}, recorded.get("nodes") or {}
    failed = nodes.get("import_failed") if isinstance(nodes, dict) else None
    return {
        "lock_hash": lock.get("hash") if isinstance(lock, dict) else None,
        "node_import_failed": {str(k): redact(str(v)) for k, v in (failed or {}).items()},
    }


# ---------------------------------------------------------------- the app
