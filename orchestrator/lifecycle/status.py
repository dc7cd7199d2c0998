"""``status``: one row per instance (supervisord's state joined with the monitor's health), as
frozen values; the table and ``--json`` are both rendered from them.

supervisord is read now, the monitor's view may be up to a tick older: :func:`row_health` never
lets the two contradict each other on one row (a STOPPED program is not shown READY, a new
process not shown READY before the monitor probed it). Failed custom nodes come from the last
nodes sync (``up`` or ``nodes sync``), each with its error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import requests

from orchestrator.core.errors import OrchestratorError
from orchestrator.core.layout import Layout
from orchestrator.core.settings import Settings
from orchestrator.core.states import ProcessInfo, ProcessState
from orchestrator.machine.generation import current_id, process_generation
from orchestrator.machine.orphans import PortHolder, port_holders
from orchestrator.machine.state import load_applied_plan, read_state
from orchestrator.machine.supervisor import Supervisor, socket_in_use

# States whose supervisord message (spawn error or description) is the instance's last error.
_FAILED = frozenset({ProcessState.FATAL, ProcessState.BACKOFF, ProcessState.EXITED})
# Monitor states that say the process exists, and what a non-running supervisord state means.
_PROCESS_UP = frozenset({"STARTING", "RUNNING"})
_HEALTH_OF_RUNNING = frozenset({"STARTING", "READY", "SUSPECT", "UNHEALTHY", "RESTARTING"})
_HEALTH_OF_STOPPED = {"STOPPED": "STOPPED", "STOPPING": "STOPPED", "EXITED": "BACKOFF", "BACKOFF": "BACKOFF",
                      "FATAL": "FATAL"}


def row_health(state: str, pid: int, mon: Mapping[str, Any]) -> tuple[str | None, str]:
    """(HEALTH, reason) for a row whose supervisord STATE and pid were read after the monitor's view.

    The monitor's answer stands unless supervisord has moved on since: a program no longer
    running is shown with the health its state implies; a running one the monitor still thinks
    stopped, or whose pid it has not probed yet, is STARTING.
    """
    health, reason = mon.get("state"), str(mon.get("reason") or "")
    if health is None:
        return None, reason
    if state in _PROCESS_UP:
        seen = mon.get("pid")
        if health not in _HEALTH_OF_RUNNING or (pid and seen and seen != pid and health != "RESTARTING"):
            return "STARTING", f"process {pid} not probed by the monitor yet (supervisord: {state})"
        return str(health), reason
    if health in _HEALTH_OF_RUNNING - {"RESTARTING"}:
        why = f"supervisord reports {state}"
        if health in {"UNHEALTHY", "SUSPECT"} and reason:  # the monitor's finding still says why (a failed GPU)
            why = f"{why}; {reason}"
        return _HEALTH_OF_STOPPED.get(state, "STOPPED"), why
    return str(health), reason


def nodes_section(recorded: Mapping[str, Any], report: Mapping[str, Any] | None) -> dict[str, Any]:
    """The last nodes sync: counts, failed names and their errors (the report of ``up`` or
    ``nodes sync``, newer than what the last ``up`` recorded in status.json)."""
    if not report:
        return dict(recorded)
    errors = {
        str(n.get("name")): str(n.get("error") or "")
        for n in report.get("nodes") or () if isinstance(n, dict) and n.get("status") == "failed"
    }
    import_failed = report.get("import_failed", recorded.get("import_failed")) or {}
    return {"counts": dict(report.get("counts") or {}), "failed": sorted(errors), "errors": errors,
            "import_failed": dict(import_failed) if isinstance(import_failed, Mapping) else {}}


@dataclasses.dataclass(frozen=True)
class InstanceRow:
    """One ComfyUI instance as supervisord and the monitor see it."""

    gpu: int
    uuid: str
    name: str
    port: int
    pid: int  # 0 when not running
    state: str  # supervisord's state name; STOPPED when it does not know the program
    uptime_seconds: float
    restarts: int | None  # None: the monitor did not answer
    health: str | None
    reason: str
    failed_custom_nodes: tuple[str, ...]
    comfyui_version: str | None
    last_error: str
    generation: str | None = None  # the generation its process started with (core.generation)
    current: bool = True  # False while it runs an older generation than the last `up` applied

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failed_custom_nodes"] = list(self.failed_custom_nodes)
        return out


@dataclasses.dataclass(frozen=True)
class MachineStatus:
    """The whole machine: supervisord, the code that runs, provisioning results, every instance."""

    supervisord_running: bool
    supervisord_pid: int
    monitor_answering: bool
    comfy: Mapping[str, Any]  # provision.repos.state.code_report
    nodes: Mapping[str, Any]  # the last nodes sync: counts, failed
    stages: Mapping[str, Any]  # the last up's stage timings, seconds
    instances: tuple[InstanceRow, ...]
    programs: Mapping[str, Mapping[str, Any]]  # the other programs: name -> state, pid
    # While supervisord is not running: who holds the plan's ports (ours = an earlier generation).
    port_holders: tuple[PortHolder, ...] = ()
    socket_held: bool = False  # supervisord did not answer, but a process listens on its socket
    warnings: tuple[str, ...] = ()  # damaged state files, one line each
    generation: str | None = None  # the generation the last `up` applied

    @property
    def orphans(self) -> tuple[PortHolder, ...]:
        return tuple(h for h in self.port_holders if h.ours)

    @property
    def foreign(self) -> tuple[PortHolder, ...]:
        return tuple(h for h in self.port_holders if not h.ours)

    def to_dict(self) -> dict[str, Any]:
        return {
            "supervisord": {"running": self.supervisord_running, "pid": self.supervisord_pid,
                            "socket_held": self.socket_held},
            "orphans": [h.to_dict() for h in self.orphans],
            "foreign_port_holders": [h.to_dict() for h in self.foreign],
            "warnings": list(self.warnings),
            "monitor_answering": self.monitor_answering,
            "comfy": dict(self.comfy),
            "nodes": dict(self.nodes),
            "stages": dict(self.stages),
            "instances": [i.to_dict() for i in self.instances],
            "programs": {k: dict(v) for k, v in self.programs.items()},
            "generation": self.generation,
        }


def monitor_instances(settings: Settings) -> dict[int, dict[str, Any]]:
    """The monitor's ``/instances`` by GPU index; empty when it does not answer within 1 s."""
    host = "127.0.0.1" if settings.orchestrator_listen in {"0.0.0.0", "::"} else settings.orchestrator_listen  # noqa: S104 - a comparison, not a bind
    try:
        resp = requests.get(f"http://{host}:{settings.orchestrator_port}/instances", timeout=1.0)
        data = resp.json()
    except (requests.RequestException, ValueError):
        return {}
    items = data.get("instances", data) if isinstance(data, dict) else data
    out: dict[int, dict[str, Any]] = {}
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict) and "gpu" in item:
                out[int(item["gpu"])] = item
    return out


def status(settings: Settings) -> MachineStatus:
    """Read supervisord, the monitor and the last ``up``'s records.

    Raises:
        OrchestratorError: nothing was ever started under this ROOT.
    """
    from orchestrator.provision.repos.state import code_report

    layout = Layout(settings.root)
    plan = load_applied_plan(layout)
    if plan is None:
        raise OrchestratorError("nothing has been started here: run `orchestrator up`")
    sup = Supervisor(layout)
    running = sup.is_running()
    procs: dict[str, ProcessInfo] = {p.name: p for p in sup.processes()} if running else {}
    health = monitor_instances(settings) if running else {}
    warnings: list[str] = []
    try:
        prov = read_state(layout.status_file)
    except OrchestratorError as exc:
        prov, warnings = {}, [str(exc)]
    holders: list[PortHolder] = []
    if not running:
        ports = {i.port: i.name for i in plan.instances}
        ports[settings.orchestrator_port] = "monitor"
        holders = port_holders(layout.root, ports)
    current = current_id(layout)
    rows = []
    for inst in plan.instances:
        info = procs.get(inst.name)
        mon = health.get(inst.index, {})
        gen = process_generation(info.pid) if info and info.pid else None
        last_error = ""
        if info and info.state in _FAILED:
            last_error = info.spawnerr or info.description
        state = info.state.name if info else "STOPPED"
        shown, reason = row_health(state, info.pid if info else 0, mon)
        rows.append(
            InstanceRow(
                gpu=inst.index,
                uuid=inst.gpu.uuid,
                name=inst.name,
                port=inst.port,
                pid=info.pid if info else 0,
                state=state,
                uptime_seconds=round(info.uptime, 1) if info else 0.0,
                restarts=mon.get("restarts"),
                health=shown,
                reason=reason,
                failed_custom_nodes=tuple(mon.get("failed_custom_nodes") or ()),
                comfyui_version=mon.get("comfyui_version"),
                last_error=last_error or reason,
                generation=gen,
                current=gen is None or current is None or gen == current,
            )
        )
    others = {n: {"state": p.state.name, "pid": p.pid} for n, p in procs.items() if not n.startswith("comfyui_gpu")}
    return MachineStatus(
        supervisord_running=running,
        supervisord_pid=sup.pid() if running else 0,
        monitor_answering=bool(health),
        comfy=code_report(layout.comfy_dir, _section(prov, "comfy")),
        nodes=nodes_section(_section(prov, "nodes"), _nodes_report(layout, warnings)),
        stages=_section(prov, "stages"),
        instances=tuple(rows),
        programs=others,
        port_holders=tuple(holders),
        socket_held=not running and socket_in_use(layout.socket),
        warnings=tuple(warnings),
        generation=current,
    )


def _section(record: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = record.get(key)
    return value if isinstance(value, dict) else {}


def _nodes_report(layout: Layout, warnings: list[str]) -> dict[str, Any] | None:
    from orchestrator.provision.nodes.report import last_report

    try:
        return last_report(layout)
    except OrchestratorError as exc:
        warnings.append(str(exc))
        return None
