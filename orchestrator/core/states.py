"""Process and instance states, and one supervisord process reading. Bottom of the import graph."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Any


class ProcessState(enum.IntEnum):
    """supervisord's process state codes, as ``getProcessInfo()['state']`` returns them."""

    STOPPED = 0
    STARTING = 10
    RUNNING = 20
    BACKOFF = 30
    STOPPING = 40
    EXITED = 100
    FATAL = 200
    UNKNOWN = 1000

    @classmethod
    def from_code(cls, code: int) -> ProcessState:
        try:
            return cls(code)
        except ValueError:
            return cls.UNKNOWN


RUNNING_STATES = frozenset({ProcessState.RUNNING, ProcessState.BACKOFF, ProcessState.STARTING})
STOPPED_STATES = frozenset(
    {ProcessState.STOPPED, ProcessState.EXITED, ProcessState.FATAL, ProcessState.UNKNOWN}
)


class InstanceState(enum.Enum):
    """The monitor's view of one ComfyUI instance (DESIGN.md, "Instance states")."""

    STARTING = "STARTING"
    READY = "READY"
    UNHEALTHY = "UNHEALTHY"
    RESTARTING = "RESTARTING"
    BACKOFF = "BACKOFF"
    FATAL = "FATAL"
    STOPPED = "STOPPED"
    # READY whose latest probe failed: no new jobs, not counted ready; READY again on the next
    # good probe, restarted (UNHEALTHY) after UNHEALTHY_THRESHOLD failed probes in a row.
    SUSPECT = "SUSPECT"

    @property
    def code(self) -> int:
        """A stable number for the ``comfyui_instance_state`` gauge."""
        return _STATE_CODES[self]


_STATE_CODES = {
    InstanceState.STOPPED: 0,
    InstanceState.STARTING: 1,
    InstanceState.READY: 2,
    InstanceState.UNHEALTHY: 3,
    InstanceState.RESTARTING: 4,
    InstanceState.BACKOFF: 5,
    InstanceState.FATAL: 6,
    InstanceState.SUSPECT: 7,
}


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    name: str
    state: ProcessState
    pid: int
    start: float  # epoch seconds of the last start, 0 if never
    now: float  # supervisord's clock when read
    exitstatus: int
    spawnerr: str
    description: str

    @property
    def uptime(self) -> float:
        return max(0.0, self.now - self.start) if self.state == ProcessState.RUNNING and self.start else 0.0

    @classmethod
    def from_rpc(cls, info: dict[str, Any]) -> ProcessInfo:
        return cls(
            name=str(info["name"]),
            state=ProcessState.from_code(int(info["state"])),
            pid=int(info.get("pid") or 0),
            start=float(info.get("start") or 0),
            now=float(info.get("now") or time.time()),
            exitstatus=int(info.get("exitstatus") or 0),
            spawnerr=str(info.get("spawnerr") or ""),
            description=str(info.get("description") or ""),
        )
